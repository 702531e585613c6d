"""Training losses: DINO self-distillation and MSAD dense cross-sensor alignment."""

from .dino import DINOLoss
from .msad import MSADLoss

__all__ = ["DINOLoss", "MSADLoss"]
