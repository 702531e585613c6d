"""Co-registered raster pairs for the commands that take them (``adapt``, ``eval``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence


def raster_pairs(
    inputs: dict[str, tuple[Any, Sequence[str], Sequence[int] | None]],
    footprint_m: float,
    stride_m: float | None,
    split: str,
    val_fraction: float,
    split_axis: str,
) -> tuple[Any, str]:
    """A :class:`~xstars_models.data.GeoPairDataset` of windows ``footprint_m`` metres wide,
    each sensor's read at its spec's GSD, and a one-line description of it.

    ``inputs`` maps sensor name -> (its SensorSpec, raster files, 1-based bands or None)."""
    from ..data import GeoPairDataset, RasterSource

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
