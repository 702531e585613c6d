"""Tiling in token units: where tiles start, the blending ramps of overlaps, and the strip plan."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..devices import check_device
from ..errors import InvalidInputError, InvalidOptionError, user_stacklevel
from .reading import Scene

if TYPE_CHECKING:
    import torch

    from ..model import XStarsBase
    from ..precision import Precision
    from .options import SceneOptions


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
    """The tiling of a scene into tiles of ``tile_tokens`` (rows, cols), all in tokens but
    ``patch_px``.

    Attributes:
        patch_px: the sensor's patch size, in pixels at its GSD (the side of one token).
        grid_tokens: the scene's (rows, cols) of whole tokens.
        tile_tokens: (rows, cols) of a tile; the scene's when it is smaller than the tile asked for.
        row_starts: first token row of each row of tiles (a *strip*), top to bottom.
        col_starts: first token column of each column of tiles, left to right.
    """

    patch_px: int
    grid_tokens: tuple[int, int]
    tile_tokens: tuple[int, int]
    row_starts: list[int]
    col_starts: list[int]

    @classmethod
    def build(cls, scene: Scene, patch_px: int, tile_px: int, overlap_px: int, sensor: str) -> Plan:
        """Tiles of ``tile_px`` every ``tile_px - overlap_px`` pixels (at the sensor's GSD), both
        whole numbers of ``patch_px``; see :mod:`xstars_models.scenes` ("Tiles")."""
        for name, value, lowest in (("tile", tile_px, patch_px), ("overlap", overlap_px, 0)):
            if value < lowest or value % patch_px:
                raise InvalidOptionError(
                    f"{{{name}}} px: must be a whole number of sensor {sensor!r}'s {patch_px} px "
                    f"patches (at least {lowest} px), e.g. {max(lowest, patch_px * round(float(value) / patch_px))} px.",
                    field=name,
                    settings={name: value},
                )
        if overlap_px >= tile_px:
            raise InvalidOptionError(
                "{overlap} px must be smaller than {tile} px.",
                field="overlap",
                settings={"overlap": int(overlap_px), "tile": int(tile_px)},
            )
        grid = (scene.height // patch_px, scene.width // patch_px)
        if min(grid) < 1:
            raise InvalidInputError(
                f"{scene.what}: {scene.height} x {scene.width} px at sensor {sensor!r}'s GSD is smaller "
                f"than one {patch_px} x {patch_px} px patch.",
                field="source",
            )
        dropped = (scene.height - grid[0] * patch_px, scene.width - grid[1] * patch_px)
        if any(dropped):
            warnings.warn(
                f"{scene.what}: {scene.height} x {scene.width} px is not a multiple of sensor {sensor!r}'s "
                f"{patch_px} px patch; the last {dropped[0]} rows and {dropped[1]} columns are not embedded.",
                UserWarning,
                stacklevel=user_stacklevel(),
            )
        tokens, stride = tile_px // patch_px, (tile_px - overlap_px) // patch_px
        tile = (min(tokens, grid[0]), min(tokens, grid[1]))
        return cls(patch_px, grid, tile, _tile_starts(grid[0], tile[0], stride), _tile_starts(grid[1], tile[1], stride))

    @property
    def tiles(self) -> int:
        return len(self.row_starts) * len(self.col_starts)


def run_setup(model: XStarsBase, sensor: str, options: SceneOptions) -> tuple[torch.device, int, Precision]:
    """Where a scene run computes (the model is moved to ``options.device`` first), its tile side
    in pixels (``options.tile``, else :func:`default_tile`), and the precision resolved for that
    device, timed for ``"auto"`` on a CPU on tiles of that size."""
    if options.device is not None:
        model.to(check_device(options.device))  # "auto" is resolved here, where the scene is computed
    target = model.device
    tile_px = default_tile(model, sensor) if options.tile is None else options.tile
    tokens = (tile_px // model.check_sensor(sensor).patch_size) ** 2
    return target, tile_px, model.resolve_precision(options.precision, target, tokens=tokens, batch_size=options.batch_size)


def default_tile(model: XStarsBase, sensor: str) -> int:
    """Default tile side in pixels: the trunk's pretraining token grid (``img_size / patch``) times
    the sensor's patch size, so position embeddings are used as trained; larger tiles also cost
    more per pixel, as attention grows with the square of the tokens per tile."""
    from ..data.footprint import pretraining_grid

    return pretraining_grid(model) * model.check_sensor(sensor).patch_size
