"""Training losses: DINO self-distillation, iBOT's masked-token loss, MSAD dense cross-sensor
alignment, the anti-collapse terms (KoLeo, CLS InfoNCE), and the gap between two sensors'
embeddings."""

from .dino import DINOLoss
from .ibot import MaskedTokenLoss, check_mask_ratio, random_patch_mask
from .msad import MSADLoss
from .spread import info_nce, koleo, sensor_gap

__all__ = ["DINOLoss", "MSADLoss", "MaskedTokenLoss", "check_mask_ratio", "info_nce", "koleo", "random_patch_mask", "sensor_gap"]
