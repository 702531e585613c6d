"""Tiling in token units: where tiles start, the blending ramps of overlaps, and the strip plan."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..errors import user_stacklevel
from .reading import Scene

if TYPE_CHECKING:

    from ..model import XStarsBase


def _tile_starts(total: int, size: int, stride: int) -> list[int]:
    """Starts of tiles of ``size`` every ``stride`` along ``total``, the last shifted inward so
    that it ends at ``total`` (all in tokens; ``size <= total``)."""
    return list(range(0, total - size, stride)) + [total - size]


def ramps(starts: list[int], size: int) -> list[np.ndarray]:
    """Per-tile weights along one axis: 1 inside, a linear ramp across the overlap with each
    neighbour; neighbours' ramps over the same overlap sum to one."""
    centres = np.arange(size, dtype=np.float64) + 0.5
    ramps = []
    for i, start in enumerate(starts):
        weight = np.ones(size)
        if i > 0 and starts[i - 1] + size > start:
            weight = np.minimum(weight, centres / (starts[i - 1] + size - start))
        if i + 1 < len(starts) and start + size > starts[i + 1]:
            weight = np.minimum(weight, (size - centres) / (start + size - starts[i + 1]))
        ramps.append(weight.astype(np.float32))
    return ramps


@dataclass(frozen=True)
class Plan:
    """The tiling of a scene of ``grid`` tokens into tiles of ``tile`` tokens (rows, cols)."""

    patch: int
    grid: tuple[int, int]
    tile: tuple[int, int]
    rows: list[int]
    cols: list[int]

    @classmethod
    def build(cls, scene: Scene, patch: int, tile_px: int, overlap_px: int, sensor: str) -> Plan:
        for name, value, lowest in (("tile", tile_px, patch), ("overlap", overlap_px, 0)):
            if not isinstance(value, (int, np.integer)) or value < lowest or value % patch:
                raise ValueError(
                    f"{name}={value!r} px: must be a whole number of sensor {sensor!r}'s {patch} px "
                    f"patches (at least {lowest} px), e.g. {max(lowest, patch * round(float(value) / patch))} px."
                )
        if overlap_px >= tile_px:
            raise ValueError(f"overlap={overlap_px} px must be smaller than tile={tile_px} px.")
        grid = (scene.height // patch, scene.width // patch)
        if min(grid) < 1:
            raise ValueError(
                f"{scene.what}: {scene.height} x {scene.width} px at sensor {sensor!r}'s GSD is smaller "
                f"than one {patch} x {patch} px patch."
            )
        dropped = (scene.height - grid[0] * patch, scene.width - grid[1] * patch)
        if any(dropped):
            warnings.warn(
                f"{scene.what}: {scene.height} x {scene.width} px is not a multiple of sensor {sensor!r}'s "
                f"{patch} px patch; the last {dropped[0]} rows and {dropped[1]} columns are not embedded.",
                UserWarning,
                stacklevel=user_stacklevel(),
            )
        tokens, stride = tile_px // patch, (tile_px - overlap_px) // patch
        tile = (min(tokens, grid[0]), min(tokens, grid[1]))
        return cls(patch, grid, tile, _tile_starts(grid[0], tile[0], stride), _tile_starts(grid[1], tile[1], stride))

    @property
    def tiles(self) -> int:
        return len(self.rows) * len(self.cols)


def default_tile(model: XStarsBase, sensor: str) -> int:
    """Default tile side in pixels: the trunk's pretraining token grid (``img_size / patch``) times
    the sensor's patch size, so position embeddings are used as trained; larger tiles also cost
    more per pixel, as attention grows with the square of the tokens per tile."""
    from ..data.footprint import pretraining_grid

    return pretraining_grid(model) * model.check_sensor(sensor).patch_size
