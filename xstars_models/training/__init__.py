"""Training: X-STARS pretraining from scratch, continual pretraining to a new sensor, and the
global-embedding whitening fit on training images."""

from .config import TrainConfig
from .recipes import adapt, pretrain
from .whitening import fit_global_whitening

__all__ = ["TrainConfig", "adapt", "fit_global_whitening", "pretrain"]
