"""Training data: paired multi-sensor data sets and augmentations. Every data set hands over raw
digital numbers (float32, C x H x W); the model's sensor stems normalise them, once."""

from .augment import MultiCropAugment
from .geo_pairs import GeoPairDataset, RasterSource
from .msc_france import MSCFrancePairs

__all__ = ["GeoPairDataset", "MSCFrancePairs", "MultiCropAugment", "RasterSource"]
