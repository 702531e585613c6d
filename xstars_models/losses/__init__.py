"""Training losses: DINO self-distillation, MSAD dense cross-sensor alignment, and the
anti-collapse terms (KoLeo, CLS InfoNCE), and the gap between two sensors' embeddings."""

from .dino import DINOLoss
from .msad import MSADLoss
from .spread import info_nce, koleo, sensor_gap

__all__ = ["DINOLoss", "MSADLoss", "info_nce", "koleo", "sensor_gap"]
