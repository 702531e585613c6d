"""Training data: paired multi-sensor data sets and augmentations. Every data set hands over raw
digital numbers (float32, C x H x W); the model's sensor stems normalise them, once.

The georeferenced data set needs rasterio (the ``geo`` extra), as does its planner
(:func:`plan_pairs`, which decides where the footprints lie before the data set reads them); they
are imported on first use so that the rest of the package works without it.
"""

from typing import Any

from .augment import MultiCropAugment
from .file_pairs import check_raster_gsd, raster_pairs
from .footprint import default_footprint_m, pretraining_grid
from .msc_france import MSCFrancePairs

__all__ = [
    "GeoPairDataset", "MSCFrancePairs", "MultiCropAugment", "PairPlan", "RasterSource", "SensorRead",
    "check_raster_gsd", "default_footprint_m", "plan_pairs", "pretraining_grid", "raster_pairs",
]

_GEO = ("GeoPairDataset", "PairPlan", "RasterSource", "SensorRead", "plan_pairs")


def __getattr__(name: str) -> Any:
    if name in _GEO:
        from . import geo_pairs

        return getattr(geo_pairs, name)
    # The module ``__getattr__`` protocol: hasattr() and ``from ... import`` expect AttributeError.
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
