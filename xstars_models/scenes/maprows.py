"""A block's piece of a scene's feature map (:func:`~.tiles.embed_tiles` with ``map_piece``).

``embed_scene(output="map")`` blends overlapping tiles into one token grid (each tile's tokens
weighted by linear ramps across its overlaps, :func:`.tiling.ramps`). A block of strips ``[start,
stop)`` owns the map's token rows from the first row of strip ``start`` to the first row of strip
``stop`` (the last block: to the end). It also embeds the strips above it that reach into those
rows (with overlap: usually one), so that each owned row gets every tile's contribution, added in
the order :class:`~.writers.MapWriter` adds them. The pieces of all blocks, stacked in block order,
are the scene's map. The cost: those strips are embedded twice (with ``overlap=0``, never)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..io import import_rasterio, quiet_georef
from .blend import TokenBlend
from .failures import writing
from .reading import Scene
from .tiling import Plan

if TYPE_CHECKING:
    from ..model import XStarsBase

__all__ = ["MapRows"]


class MapRows(TokenBlend):
    """A :class:`~.writers.StripWriter` that blends tiles into the feature map's token rows as
    :class:`~.writers.MapWriter` does (the same :class:`~.blend.TokenBlend` sums, in the same
    order) and writes the rows that the strips ``owned`` own (see the module's notes) into a
    GeoTIFF of those rows at ``path``. It is handed the strips from :attr:`first_strip` (the first
    that reaches into those rows) to the last owned one; nothing is carried to disk between strips
    (a failed block is redone whole). Call :meth:`close` at the end."""

    def __init__(self, plan: Plan, scene: Scene, model: XStarsBase, device: torch.device, owned: range,
                 path: Path) -> None:
        from affine import Affine

        rasterio = import_rasterio()
        th, width = plan.tile_tokens[0], plan.grid_tokens[1]
        last = owned.stop
        self.rows = (plan.row_starts[owned.start], plan.row_starts[last] if last < len(plan.row_starts)
                     else plan.grid_tokens[0])
        self.first_strip = next(i for i, start in enumerate(plan.row_starts) if start + th > self.rows[0])
        # The band starts at the first strip's first row.
        super().__init__(plan, model.embed_dim, model.trunk.num_prefix_tokens, device,
                         base=plan.row_starts[self.first_strip])
        self.path = path
        height = self.rows[1] - self.rows[0]
        self.size = 4 * self.dim * height * width
        with writing(path, self.size), quiet_georef():
            self.dataset = rasterio.open(
                path, "w", driver="GTiff", dtype="float32", count=self.dim, height=height, width=width,
                crs=scene.crs, transform=scene.transform @ Affine.scale(plan.patch_px) @ Affine.translation(0, self.rows[0]),
                nodata=float("nan"), interleave="pixel", BIGTIFF="IF_SAFER",
            )

    def commit(self, strip: int) -> None:
        """Write the owned rows no later strip touches; keep the rest."""
        from rasterio.windows import Window

        low, high = max(self.base, self.rows[0]), min(self.next_row(strip), self.rows[1])
        if low < high:
            rows = self.blended(slice(low - self.base, high - self.base))
            with writing(self.path, rows.nbytes):
                self.dataset.write(rows, window=Window(0, low - self.rows[0], self.plan.grid_tokens[1], high - low))
        self.advance(strip)

    def close(self) -> None:
        """Close the GeoTIFF (GDAL writes its last blocks then, and only logs a failure)."""
        with writing(self.path, self.size) as log:
            self.dataset.close()
            log.check()
