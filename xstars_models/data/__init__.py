"""Training data: paired multi-sensor data sets and augmentations. Every data set hands over raw
digital numbers (float32, C x H x W); the model's sensor stems normalise them, once."""

from .augment import MultiCropAugment

__all__ = ["MultiCropAugment"]
