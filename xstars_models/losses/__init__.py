"""Training losses: DINO self-distillation, MSAD dense cross-sensor alignment, and the
anti-collapse terms (KoLeo, CLS InfoNCE)."""

from .dino import DINOLoss
from .msad import MSADLoss
from .spread import info_nce, koleo

__all__ = ["DINOLoss", "MSADLoss", "info_nce", "koleo"]
