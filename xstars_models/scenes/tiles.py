"""A scene, or a block of its strips (rows of tiles), embedded into memory: the CLS vector of each
embedded tile with its place in the scene's tile grid and its footprint in the scene's CRS and in
EPSG:4326 (longitude, latitude). This is what an archive worker (:mod:`xstars_models.archive`)
turns into one part of a GeoParquet dataset. It runs the code of
:func:`~xstars_models.scenes.embed_scene` (``output="cls"``): the same opening, tiling, precision,
whitening and strip runner, into a collector instead of a file, so its vectors are the ones
``embed_scene`` writes. Nothing is written to disk (no output, no partial run to resume: a block
is small; a failed one is redone whole), except, when asked, the block's piece of the scene's
feature map (:mod:`.maprows`).

Footprints in EPSG:4326 are the tile's four corners transformed, joined by straight lines in
longitude/latitude. A tile's edges are straight in its scene's CRS, so in longitude/latitude they
bend slightly; over a tile (a few km) the gap between the curve and the straight edge is a few
millimetres for UTM, so the edges are not densified (and every ring keeps 5 points). The exact
footprint is recoverable from ``native_bounds`` and ``crs``. Not handled: tiles that cross the
antimeridian (their ring would span the globe) or contain a pole.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..errors import InvalidInputError, InvalidOptionError, InvalidTypeError
from ..io import GDAL_CACHE_BYTES, import_rasterio
from ..precision import inference_copy
from ..serialization import atomic_path
from .maprows import MapRows
from .options import SceneOptions
from .reading import Scene
from .sources import open_scene, scene_inputs
from .strips import run_strips
from .tiling import Plan, default_tile, run_setup
from .writers import Progress, StripWriter, tile_geometry

if TYPE_CHECKING:
    from ..model import XStarsBase

__all__ = ["SceneGrid", "TileTable", "embed_tiles", "scene_grid"]

_LONLAT = "EPSG:4326"


@dataclass(frozen=True)
class SceneGrid:
    """The tile grid of a scene (within its area of interest) with given options.

    Attributes:
        strips: rows of tiles.
        tiles_per_strip: columns of tiles.
        crs: the scene's CRS: ``"EPSG:<code>"`` where it has an EPSG code, else its WKT.
        bounds_4326: (west, south, east, north) in degrees of longitude and latitude: the
            envelope of the area the tiles cover (edges densified).
        resample_scale: (x, y) input pixels per sensor pixel when windows are resampled
            (``resample=True`` and another pixel size), else ``None``.
    """

    strips: int
    tiles_per_strip: int
    crs: str
    bounds_4326: tuple[float, float, float, float]
    resample_scale: tuple[float, float] | None = None

    @property
    def tiles(self) -> int:
        return self.strips * self.tiles_per_strip


@dataclass
class TileTable:
    """Embedded tiles of (a block of strips of) one scene, one entry per tile, in the order
    embedded (strip by strip, left to right). Tiles left out for nodata (``max_nodata``) have
    no entry.

    Attributes:
        row: int32 (n,): the tile's row (strip) in the whole scene's tile grid.
        col: int32 (n,): the tile's column.
        embedding: float32 (n, D): the CLS vectors (whitened with ``whiten=True``).
        native_bounds: float64 (n, 4): minx, miny, maxx, maxy of the footprint in the scene's CRS.
        rings_4326: float64 (n, 5, 2): the footprint's corners as (longitude, latitude) in
            degrees, closed (last = first) and counter-clockwise.
        bbox_4326: float64 (n, 4): xmin, ymin, xmax, ymax of each ring (degrees).
        crs: the scene's CRS, as :attr:`SceneGrid.crs`.
        skipped: tiles of the strips embedded that were left out for nodata.
        precision: what ran (``"fp32"``, ``"bf16"`` or ``"int8"``): ``options.precision``
            resolved for the device, ``"auto"`` included; empty for a table not made by
            :func:`embed_tiles`.
    """

    row: np.ndarray
    col: np.ndarray
    embedding: np.ndarray
    native_bounds: np.ndarray
    rings_4326: np.ndarray
    bbox_4326: np.ndarray
    crs: str
    skipped: int
    precision: str = ""


def scene_grid(model: XStarsBase, source: Any, sensor: str, options: SceneOptions) -> SceneGrid:
    """The tile grid that :func:`embed_tiles` (and ``embed_scene``) uses for ``source`` with
    ``options`` (``tile``, ``overlap``, ``bounds``/``bounds_crs``/``window``, ``resample``).
    Opens the scene (reads its header, not its pixels).

    Raises:
        InvalidInputError: (``field="source"``) a scene without a CRS, or one that does not fit
            the sensor; and everything ``embed_scene`` raises on opening and tiling a scene.
    """
    options = _checked(options)
    with _opened(model, source, sensor, options) as (scene, plan, crs):
        first = tile_geometry(plan, scene, 0)[1]
        last = tile_geometry(plan, scene, len(plan.row_starts) - 1)[1]
        corners = np.concatenate([first, last]).reshape(-1, 2)
        from rasterio.warp import transform_bounds

        west, south, east, north = transform_bounds(
            scene.crs, _LONLAT, *corners.min(axis=0), *corners.max(axis=0), densify_pts=100)
        return SceneGrid(len(plan.row_starts), len(plan.col_starts), crs, (west, south, east, north), scene.scale)


def embed_tiles(
    model: XStarsBase, source: Any, sensor: str, options: SceneOptions, strips: range | None = None, *,
    map_piece: str | os.PathLike[str] | None = None,
) -> TileTable:
    """Embed strips ``strips`` (default: all) of ``source``'s tile grid (:func:`scene_grid`)
    into memory, as ``embed_scene(model, source, sensor, output="cls", options=...)`` would
    embed them: same tiles, same vectors, same precision.

    Args:
        model: the encoder (``XStarsBase``); moved to ``options.device`` when given.
        source: what ``embed_scene`` takes: a raster file, an ``http(s)://`` COG URL, a STAC Item
            (or the path or URL of its JSON), or a C x H x W array with ``options.crs``.
        sensor: which of ``model.sensors`` the imagery comes from.
        options: the scene options; ``output``, ``resume``, ``overwrite`` and ``overviews`` do not
            apply (the vectors are CLS tokens; a map piece has no overviews).
        strips: a range (step 1) of strip indices within ``range(scene_grid(...).strips)``.
        map_piece: also write the strips' piece of the scene's feature map (see
            :mod:`.maprows`) to this GeoTIFF: float32, one band per feature, one pixel per token,
            georeferenced as the map's rows it holds, uncompressed, not whitened; written under
            a temporary name and renamed when complete. Needs at least one strip.

    Raises:
        InvalidInputError: (``field="source"``) a scene without a CRS (footprints in EPSG:4326
            need one), or whose corners cannot be placed in EPSG:4326.
        InvalidOptionError: ``strips`` that is not a part of the grid, or empty with a
            ``map_piece`` (``field="strips"``); ``whiten=True`` for a model without a fitted
            whitening, or with a ``map_piece`` (``field="whiten"``); and
            everything ``embed_scene`` raises for its options.
    """
    options = _checked(options)
    model.check_sensor(sensor)
    if map_piece is not None and options.whiten:
        raise InvalidOptionError(
            "{whiten} applies to the CLS vectors; a feature map is not whitened (embed_scene has no whitened "
            "map). Write the map piece without whiten.",
            field="whiten",
            settings={"whiten": True},
        )
    whitening = model.check_whiten("cls", sensor=sensor) if options.whiten else None
    target, tile_px, resolved = run_setup(model, sensor, options)
    with _opened(model, source, sensor, options) as (scene, plan, crs):
        count = len(plan.row_starts)
        todo = range(count) if strips is None else strips
        if not isinstance(todo, range) or todo.step != 1 or not 0 <= todo.start <= todo.stop <= count:
            raise InvalidOptionError(
                f"strips must be a range (step 1) within the scene's {count} strips, range(0, {count}); got {strips!r}.",
                field="strips",
            )
        if map_piece is not None and not todo:
            raise InvalidOptionError(f"strips {todo!r} is empty: a map piece needs at least one strip.", field="strips")
        collector = _Collector(plan, scene, model.embed_dim, _whitened(whitening, sensor))
        progress = Progress(strips_done=todo.start)
        encoder = inference_copy(model, resolved.name)

        def run(writer: StripWriter, done: Progress, stop: int) -> None:
            run_strips(encoder, scene, plan, writer, None, done, sensor=sensor, options=options, device=target,
                       autocast=resolved.autocast, stop=stop)

        if map_piece is None:
            run(collector, progress, todo.stop)
        else:
            with atomic_path(Path(map_piece)) as tmp:
                rows = MapRows(plan, scene, model, target, todo, tmp)
                try:
                    # The strips above the block that reach into its rows: the map's, not the table's.
                    run(rows, Progress(strips_done=rows.first_strip), todo.start)
                    run(_Both(collector, rows), progress, todo.stop)
                finally:
                    rows.close()
        return collector.table(crs, progress.skipped, resolved.name)


def _whitened(whitening: Any, sensor: str) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """What ``embed_scene`` applies to the CLS vectors (B x D) with ``whiten=True``: the model's
    whitening for ``sensor``; ``None`` without one."""
    if whitening is None:
        return None
    return lambda cls: whitening.apply(cls, "cls", sensor)


def _checked(options: SceneOptions) -> SceneOptions:
    if not isinstance(options, SceneOptions):
        raise InvalidTypeError(f"options must be a SceneOptions, got {type(options).__name__}.", field="options")
    return options


@contextlib.contextmanager
def _opened(model: XStarsBase, source: Any, sensor: str, options: SceneOptions) -> Iterator[tuple[Scene, Plan, str]]:
    """The scene opened as ``embed_scene`` opens it (GDAL's cache capped), its tile plan and its
    CRS's name; the scene's datasets are closed on leaving."""
    rasterio = import_rasterio()
    stem = model.check_sensor(sensor)
    tile_px = default_tile(model, sensor) if options.tile is None else options.tile
    inputs = scene_inputs(source, stem.spec)
    with contextlib.ExitStack() as stack:
        stack.enter_context(rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_BYTES))
        scene = open_scene(inputs.source, stem.spec, sensor, options, stack)
        crs = _crs_name(scene)
        plan = Plan.build(scene, stem.patch_size, tile_px, options.overlap, sensor)
        yield scene, plan, crs


def _crs_name(scene: Scene) -> str:
    """``"EPSG:<code>"`` of the scene's CRS where it has one, else its WKT.

    Raises:
        InvalidInputError: (``field="source"``) the scene has no CRS.
    """
    if scene.crs is None:
        raise InvalidInputError(
            f"{scene.what} has no CRS, so its tiles cannot be placed on the globe (footprints in EPSG:4326); "
            "give the file georeferencing, or an array source its crs= and transform=.",
            field="source",
        )
    code = scene.crs.to_epsg()
    return f"EPSG:{code}" if code is not None else str(scene.crs.to_wkt())


class _Collector:
    """A :class:`~.writers.StripWriter` that keeps each embedded tile's strip, column and vector
    in memory, and each strip's footprints as it is committed."""

    def __init__(self, plan: Plan, scene: Scene, dim: int, vectors: Callable[[torch.Tensor], torch.Tensor] | None
                 ) -> None:
        self.plan, self.scene, self.dim, self.vectors = plan, scene, dim, vectors
        self.rows: list[np.ndarray] = []
        self.cols: list[np.ndarray] = []
        self.embeddings: list[np.ndarray] = []
        self.rings: list[np.ndarray] = []
        self._strip_cols: list[int] = []

    def begin_strip(self, token_missing: torch.Tensor, tile_missing: np.ndarray) -> None:
        self._strip_cols = []

    def add(self, strip: int, cols: list[int], tokens: torch.Tensor) -> None:
        # As ClsWriter.add: the CLS token in float32 on the CPU, then the whitening if any.
        cls = tokens[:, 0].float().cpu()
        self.embeddings.append((cls if self.vectors is None else self.vectors(cls)).numpy().astype(np.float32))
        self._strip_cols.extend(cols)

    def commit(self, strip: int) -> None:
        cols = np.asarray(self._strip_cols, np.int64)
        self.rows.append(np.full(len(cols), strip, np.int32))
        self.cols.append(cols.astype(np.int32))
        self.rings.append(tile_geometry(self.plan, self.scene, strip)[1][cols])

    def table(self, crs: str, skipped: int, precision: str) -> TileTable:
        rings = np.concatenate(self.rings) if self.rings else np.zeros((0, 5, 2))
        native = np.concatenate([rings.min(axis=1), rings.max(axis=1)], axis=1)
        lonlat = _to_lonlat(self.scene, rings)
        return TileTable(
            row=np.concatenate(self.rows) if self.rows else np.zeros(0, np.int32),
            col=np.concatenate(self.cols) if self.cols else np.zeros(0, np.int32),
            embedding=np.concatenate(self.embeddings) if self.embeddings else np.zeros((0, self.dim), np.float32),
            native_bounds=native,
            rings_4326=lonlat,
            bbox_4326=np.concatenate([lonlat.min(axis=1), lonlat.max(axis=1)], axis=1),
            crs=crs,
            skipped=int(skipped),
            precision=precision,
        )


def _to_lonlat(scene: Scene, rings: np.ndarray) -> np.ndarray:
    """``rings`` (n x 5 x 2, closed, in the scene's CRS) as (longitude, latitude), each made
    counter-clockwise (a south-up scene's rings turn the other way).

    Raises:
        InvalidInputError: (``field="source"``) corners that have no longitude/latitude.
    """
    if len(rings) == 0:
        return np.zeros((0, 5, 2))
    from rasterio.warp import transform

    xs, ys = transform(scene.crs, _LONLAT, rings[..., 0].ravel(), rings[..., 1].ravel())
    lonlat = np.stack([np.asarray(xs, np.float64), np.asarray(ys, np.float64)], axis=-1).reshape(rings.shape)
    if not np.isfinite(lonlat).all():
        raise InvalidInputError(
            f"{scene.what}: some tile corners have no longitude/latitude (outside the domain of the scene's CRS, "
            f"{scene.crs.to_string()}).",
            field="source",
        )
    lonlat[:, -1] = lonlat[:, 0]  # closed exactly, whatever the rounding
    x, y = lonlat[..., 0], lonlat[..., 1]
    clockwise = (x[:, :-1] * y[:, 1:] - x[:, 1:] * y[:, :-1]).sum(axis=1) < 0
    return np.where(clockwise[:, None, None], lonlat[:, ::-1], lonlat)


class _Both:
    """A :class:`~.writers.StripWriter` handing every call to two writers."""

    def __init__(self, first: StripWriter, second: StripWriter) -> None:
        self.writers = (first, second)

    def begin_strip(self, token_missing: torch.Tensor, tile_missing: np.ndarray) -> None:
        for writer in self.writers:
            writer.begin_strip(token_missing, tile_missing)

    def add(self, strip: int, cols: list[int], tokens: torch.Tensor) -> None:
        for writer in self.writers:
            writer.add(strip, cols, tokens)

    def commit(self, strip: int) -> None:
        for writer in self.writers:
            writer.commit(strip)
