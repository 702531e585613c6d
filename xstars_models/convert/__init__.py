"""Convert a checkpoint written by the official X-STARS training code into an :class:`XStars` model
(:func:`convert_official_checkpoint`; the file format is described in :mod:`.official`)."""

from .official import OFFICIAL_ARCHS, OFFICIAL_SENSORS, convert_official_checkpoint

__all__ = ["OFFICIAL_ARCHS", "OFFICIAL_SENSORS", "convert_official_checkpoint"]
