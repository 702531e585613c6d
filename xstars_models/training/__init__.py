"""Training: X-STARS pretraining from scratch, continual pretraining to a new sensor, and the
global-embedding whitening fit on training images. ``TrainConfig`` holds a run's settings, one
group per part of the recipe (``OptimConfig``, ``DINOConfig``...)."""

from .config import TrainConfig
from .groups import AnchorConfig, ContrastConfig, CropsConfig, DINOConfig, IBOTConfig, MonitorConfig, MSADConfig, OptimConfig
from .recipes import adapt, pretrain
from .whitening import fit_global_whitening

__all__ = [
    "AnchorConfig", "ContrastConfig", "CropsConfig", "DINOConfig", "IBOTConfig", "MSADConfig", "MonitorConfig", "OptimConfig",
    "TrainConfig", "adapt", "fit_global_whitening", "pretrain",
]
