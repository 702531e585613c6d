"""Raster I/O, in one place: importing rasterio (the ``geo`` extra), the GDAL settings the package
reads with, pixel sizes and the GSD check, the choice of resampling, which pixels are missing, and
windows read from mosaics of files; also reading JSON files (:mod:`.jsonfile`) and refusing an
output that would overwrite an input (:mod:`.outputs`), and locking an output while a run writes it
(:mod:`.lock`). The data sets (:mod:`xstars_models.data`),
whole-scene embedding (:mod:`xstars_models.scenes`), the CLI and the samples all read through
here, so they agree on what a missing pixel is and on how a window is resampled."""

from .jsonfile import read_json
from .missing import fill_missing, missing_mask
from .rasters import (
    GDAL_CACHE_BYTES,
    GSD_SAME,
    GSD_WARN,
    REMOTE_GDAL_OPTIONS,
    gsd_mismatch,
    gsd_scale,
    import_rasterio,
    pixel_size_m,
    quiet_georef,
    read_raster,
    read_window,
    resampling_for,
)

__all__ = [
    "GDAL_CACHE_BYTES", "GSD_SAME", "GSD_WARN", "REMOTE_GDAL_OPTIONS", "fill_missing", "gsd_mismatch", "gsd_scale",
    "import_rasterio", "missing_mask", "pixel_size_m", "quiet_georef", "read_json", "read_raster", "read_window",
    "resampling_for",
]
