"""Training: X-STARS pretraining from scratch and continual pretraining to a new sensor."""

from .config import TrainConfig
from .recipes import adapt, pretrain

__all__ = ["TrainConfig", "adapt", "pretrain"]
