"""Ground geometry for cutting co-registered tiles: bounding-box intersection, a regular grid of
square windows snapped to a raster's pixel grid, and a spatial train/val split into contiguous
strips. Pure arithmetic on ``(left, bottom, right, top)`` boxes in CRS units (metres for the
projected rasters this package handles); no file access."""

from __future__ import annotations

import math
from collections.abc import Iterable

from ..errors import InvalidOptionError
from ..io.mosaic import Bounds

__all__ = ["Bounds", "grid_windows", "intersect_bounds", "split_regions"]

SPLITS = ("train", "val", "all")
AXES = ("x", "y")

# Tolerance, in metres, for floating-point round-off when comparing coordinates that should be
# equal (a window edge on a raster edge): far below any ground sampling distance.
_EPS_M = 1e-6


def intersect_bounds(boxes: Iterable[Bounds]) -> Bounds | None:
    """The common part of ``boxes``, or ``None`` when they do not overlap with positive area."""
    boxes = list(boxes)
    left = max(b[0] for b in boxes)
    bottom = max(b[1] for b in boxes)
    right = min(b[2] for b in boxes)
    top = min(b[3] for b in boxes)
    if right - left <= _EPS_M or top - bottom <= _EPS_M:
        return None
    return (left, bottom, right, top)


def split_regions(
    extent: Bounds,
    split: str = "all",
    val_fraction: float = 0.2,
    axis: str = "y",
    gap_m: float = 0.0,
    blocks: int = 1,
) -> list[Bounds]:
    """The part(s) of ``extent`` that belong to ``split``.

    ``extent`` is cut along ``axis`` into ``blocks`` equal contiguous blocks; the last
    ``val_fraction`` of each block (its high-coordinate end: east for ``"x"``, north for ``"y"``)
    is validation, the rest training, minus a buffer of ``gap_m`` metres on each side of every
    validation strip so that no training window comes nearer than ``gap_m`` to validation ground.
    The validation strips cover exactly ``val_fraction`` of the extent's area; ``"all"`` is the
    whole extent.
    """
    if split not in SPLITS:
        raise InvalidOptionError(f"split must be one of {SPLITS}, got {split!r}.", field="split")
    if split == "all":
        return [extent]
    if axis not in AXES:
        raise InvalidOptionError(f"split_axis must be 'x' or 'y', got {axis!r}.", field="split_axis")
    if not 0.0 < val_fraction < 1.0:
        raise InvalidOptionError(f"val_fraction must be strictly between 0 and 1, got {val_fraction}.", field="val_fraction")
    if gap_m < 0:
        raise InvalidOptionError(f"gap_m must be >= 0 metres, got {gap_m}.", field="gap_m")
    if blocks < 1:
        raise InvalidOptionError(f"split_blocks must be >= 1, got {blocks}.", field="split_blocks")
    lo, hi = (extent[0], extent[2]) if axis == "x" else (extent[1], extent[3])
    block = (hi - lo) / blocks
    val = [(lo + (k + 1 - val_fraction) * block, lo + (k + 1) * block) for k in range(blocks)]
    if split == "val":
        intervals = val
    else:
        intervals, start = [], lo
        for v_lo, v_hi in val:
            intervals.append((start, v_lo - gap_m))
            start = v_hi + gap_m
        intervals.append((start, hi))
        intervals = [(a, b) for a, b in intervals if b - a > _EPS_M]
    if axis == "x":
        return [(a, extent[1], b, extent[3]) for a, b in intervals]
    return [(extent[0], a, extent[2], b) for a, b in intervals]


def grid_windows(
    region: Bounds,
    tile_m: float,
    stride_m: float,
    origin: tuple[float, float],
    res: tuple[float, float],
) -> list[Bounds]:
    """Square windows of ``tile_m`` metres every ``stride_m`` metres that fit inside ``region``.

    The first window's top-left corner is the first corner of the pixel grid (``origin`` = the
    top-left corner of a raster, ``res`` = its pixel size in metres, x then y) inside the region,
    so that windows of a whole number of that raster's pixels read it without resampling.
    Windows run left to right, then top to bottom; the order is deterministic.
    """
    if not tile_m > 0:
        raise InvalidOptionError(f"Tile footprint must be > 0 metres, got {tile_m}.", field="tile_m")
    if not stride_m > 0:
        raise InvalidOptionError(f"Stride must be > 0 metres, got {stride_m}.", field="stride_m")
    left, bottom, right, top = region
    x0, y0 = origin
    rx, ry = res
    first_left = x0 + math.ceil((left - x0) / rx - _EPS_M) * rx
    first_top = y0 - math.ceil((y0 - top) / ry - _EPS_M) * ry
    n_cols = math.floor((right - first_left - tile_m) / stride_m + _EPS_M) + 1
    n_rows = math.floor((first_top - tile_m - bottom) / stride_m + _EPS_M) + 1
    windows = []
    for row in range(max(n_rows, 0)):
        win_top = first_top - row * stride_m
        for col in range(max(n_cols, 0)):
            win_left = first_left + col * stride_m
            windows.append((win_left, win_top - tile_m, win_left + tile_m, win_top))
    return windows

