"""Pairs of co-registered rasters given as lists of files, one list per sensor, cut into windows
of the same ground footprint: what ``xstars adapt`` and ``xstars eval`` train and evaluate on."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import InvalidInputError
from ..io import GSD_WARN, gsd_mismatch, import_rasterio, pixel_size_m

__all__ = ["check_raster_gsd", "raster_pairs"]


def raster_pairs(
    inputs: dict[str, tuple[Any, Sequence[str], Sequence[int] | None]],
    footprint_m: float,
    stride_m: float | None,
    split: str,
    val_fraction: float,
    split_axis: str,
    resample: bool = False,
) -> tuple[Any, str]:
    """A :class:`~xstars_models.data.GeoPairDataset` of windows ``footprint_m`` metres wide,
    each sensor's read at its spec's GSD, and a one-line description of it.

    ``inputs`` maps sensor name -> (its SensorSpec, raster files, 1-based bands or None). A raster
    whose pixel size is more than 10% off its sensor's GSD is refused unless ``resample`` (the
    windows are then resampled to the GSD), as ``embed_scene`` does."""
    from .geo_pairs import GeoPairDataset, RasterSource

    if not resample:
        for name, (spec, files, _) in inputs.items():
            for file in files:
                check_raster_gsd(file, spec.gsd_m, name, field="inputs")
    sources = {
        name: RasterSource(files, bands, round(footprint_m / spec.gsd_m)) for name, (spec, files, bands) in inputs.items()
    }
    pairs = GeoPairDataset(
        sources, footprint_m=footprint_m, stride_m=stride_m, split=split, val_fraction=val_fraction, split_axis=split_axis
    )
    files = " <-> ".join(f"{name} {' '.join(Path(f).name for f in files)}" for name, (_, files, _) in inputs.items())
    area = {"train": "training area", "val": "held-out area", "all": "whole area"}[split]
    description = (
        f"{files}: {len(pairs)} pairs of {footprint_m:g} m ({area}; {val_fraction:g} of it held out along {split_axis})"
    )
    return pairs, description


def check_raster_gsd(path: str | Path, gsd_m: float, sensor: str, *, field: str = "path") -> None:
    """Refuse a raster whose pixel size (metres) is more than 10% off ``gsd_m``: its windows would
    be resampled silently to a scale the model never saw at that size.

    Raises:
        InvalidInputError: naming both sizes and the two ways out; its ``field`` is ``field``,
            the caller's argument that carried ``path``.
    """
    with import_rasterio().open(path) as src:
        if src.crs is None or src.crs.is_geographic:  # no metric pixel size to compare
            return
        pixel_m = pixel_size_m(src.transform, src.crs)
    worst = gsd_mismatch(pixel_m, gsd_m)
    if worst > GSD_WARN:
        raise InvalidInputError(
            f"{path}: pixel size {pixel_m[0]:g} m but sensor {sensor!r} has a GSD of {gsd_m:g} m ({worst:.0%} apart). "
            f"Give the sensor's real GSD (spec.with_gsd({pixel_m[0]:g}); for the new sensor of `xstars adapt`: "
            f"--gsd {pixel_m[0]:g}), or pass {{resample}} to read windows resampled to {gsd_m:g} m.",
            field=field,
            settings={"resample": True},
        )
