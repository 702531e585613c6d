"""How much of each footprint every sensor misses, without reading any footprint: one indexing
read of each file counts its valid pixels per cell of a grid that tiles every footprint
(:meth:`~xstars_models.io.mosaic.Mosaic.valid_counts`), and a footprint's count is the sum of its
cells'. Needs rasterio (the ``geo`` extra)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from ..io.mosaic import EPS_PX, Bounds, CellGrid
from .raster_source import SensorPlan

__all__ = ["missing_fractions"]


def missing_fractions(
    windows: Sequence[Bounds], origin: tuple[float, float], ref_px: float, sensors: Mapping[str, SensorPlan]
) -> list[dict[str, float]]:
    """Each window's fraction (0-1) of missing native pixels per sensor.

    Args:
        windows: (left, bottom, right, top) in metres, whose edges lie a whole number of
            ``ref_px``-metre pixels from ``origin`` where they can (they then share large cells).
        origin: (x, y) in metres of the reference raster's top-left corner.
        ref_px: the reference raster's pixel size in metres.
        sensors: how each sensor is read; each file is read once, at its own resolution.
    """
    unit = _common_cell_px([v for w in windows for v in (w[0] - origin[0], origin[1] - w[3], w[2] - w[0])], ref_px)
    cell_m = unit * ref_px
    left, top = min(w[0] for w in windows), max(w[3] for w in windows)
    right, bottom = max(w[2] for w in windows), min(w[1] for w in windows)
    grid = CellGrid((left, top), cell_m, (max(1, round((top - bottom) / cell_m)), max(1, round((right - left) / cell_m))))
    fractions: list[dict[str, float]] = [{} for _ in windows]
    for name, sensor in sensors.items():
        mosaic = sensor.mosaic()
        counts = mosaic.valid_counts(grid)
        mosaic.close()
        first = sensor.files[0]
        for window, missing in zip(windows, fractions):
            rows, cols = grid.cells_of(window)
            expected = _centres(window[0], window[2], first.bounds[0], first.res[0]) * _centres(
                -window[3], -window[1], -first.bounds[3], first.res[1]
            )
            missing[name] = float(min(1.0, max(0.0, 1.0 - counts[rows, cols].sum() / max(expected, 1))))
    return fractions


def _centres(low: float, high: float, origin: float, res: float) -> int:
    """How many centres of pixels ``res`` wide whose edges start at ``origin`` lie in [low, high)
    (the file's pixel lattice, continued beyond the file: pixels outside it count as missing)."""
    return math.ceil((high - origin) / res - 0.5 - EPS_PX) - math.ceil((low - origin) / res - 0.5 - EPS_PX)


def _common_cell_px(offsets_m: list[float], px: float) -> int:
    """The largest whole number of ``px``-metre pixels dividing every offset (metres), or 1 when
    some offset is not a whole number of pixels."""
    whole = []
    for offset in offsets_m:
        n = round(offset / px)
        if abs(offset / px - n) > EPS_PX * max(1, abs(n)):
            return 1
        whole.append(abs(n))
    return max(1, math.gcd(*whole))
