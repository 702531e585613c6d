"""Writers: the partial output of an unfinished run (kept as :mod:`.partial` says) and its
carried-over accumulator rows, and the final files, streamed strip by strip: a Cloud-Optimised
GeoTIFF for maps, GeoParquet for per-tile vectors (its layout: :mod:`.geoparquet`). Both writers
are a :class:`SceneWriter`; the strip runner knows them only as a :class:`StripWriter` (which an
in-memory collector of tiles, :mod:`.tiles`, is too).

The map COG
    float32, one band per feature dimension, described ``emb_000``, ``emb_001``... (three digits
    at least, more for 1000 features or more), one pixel per token, NaN as nodata; DEFLATE with
    the floating-point predictor, 128 x 128 pixel-interleaved blocks. Its dataset tags record the
    model and the run: ``xstars_model`` (id or folder), ``xstars_revision`` (when loaded from the
    Hub), ``xstars_model_sha256`` (of ``model.safetensors`` as ``save_pretrained`` writes it),
    ``xstars_stem_sha256`` (of the sensor's ``stem-<sensor>.safetensors``, for a sensor other than
    the primary), ``xstars_sensor``, ``xstars_patch_px``, ``xstars_tile_px``,
    ``xstars_overlap_px`` (pixels at the sensor's GSD), ``xstars_precision``, ``xstars_source``
    and, when windows were resampled, ``xstars_resample_scale``.

    Tiles start every ``tile - overlap`` pixels along each axis and the last one is shifted inward
    to end at the scene's edge, so it may overlap its neighbour by more than ``overlap``; tokens
    covered by several tiles are their weighted mean, the weights ramping linearly across each
    overlap (:func:`.tiling.ramps`), so the map has no seams there either."""

from __future__ import annotations

import glob
import io
import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from ..io import import_rasterio, quiet_georef
from ..serialization import atomic_open, atomic_path, atomic_write_bytes
from .blend import TokenBlend
from .failures import GdalLog, chain_messages, io_errors, writing
from .geoparquet import TileStrip, import_pyarrow, write_geoparquet
from .partial import Partial, Progress
from .reading import Scene
from .tiling import Plan

if TYPE_CHECKING:
    from affine import Affine

__all__ = [
    "COG_BLOCK", "ClsWriter", "MapWriter", "Partial", "Progress", "SceneWriter", "StripWriter", "band_names",
    "check_complete", "tile_geometry",
]

# COG tiles of the feature map, in tokens (the smallest GDAL accepts). All feature bands of a tile
# are stored together (pixel interleaving, what reading the vectors of a place wants).
COG_BLOCK = 128


class StripWriter(Protocol):
    """What the strip runner hands tiles to: for each strip (row of tiles) in order
    :meth:`begin_strip`, :meth:`add` for each batch and :meth:`commit`."""

    def begin_strip(self, token_missing: torch.Tensor, tile_missing: np.ndarray) -> None:
        """Missing-pixel fractions of the strip's tokens (tile rows x scene width, in tokens) and
        of its tiles (one per tile column)."""

    def add(self, strip: int, cols: list[int], tokens: torch.Tensor) -> None:
        """The final tokens (B x (prefix + h*w) x D) of tiles ``cols`` (indexes into the plan's
        tile columns) of strip ``strip``."""

    def commit(self, strip: int) -> Path | None:
        """The end of strip ``strip``; returns the carry saved for the next strip, if any."""


class SceneWriter(StripWriter, Protocol):
    """Where the tiles of a scene go, strip by strip, into an output file. The runner calls
    :meth:`start` once, then for each strip (row of tiles) in order :meth:`begin_strip`,
    :meth:`add` for each batch and :meth:`commit`, and :meth:`finish` after the last.

    The ``commit`` contract: when ``commit(strip)`` returns, everything of strips up to ``strip``
    that no later strip changes has been handed to the operating system in the partial data
    (``<out>.partial``), and what the next strip adds to (the carry) is saved atomically (temporary
    name, then rename) and returned, or ``None`` when there is none. Only after that does the runner
    record the strip as done (:meth:`Partial.commit`, atomic too), so a run killed at any point
    resumes from the last recorded strip: :meth:`start` restores that strip's carry and drops what
    later strips wrote, and redoing a strip writes the same values again. :meth:`finish` turns
    the partial data into ``out`` under a temporary name renamed into place
    (:func:`xstars_models.serialization.atomic_path`), so ``out`` never exists half-written.
    After a failure the runner keeps the partial data only if a strip was recorded
    (:meth:`Partial.keep_resumable`).

    Attributes:
        transform: the affine transform of the output's pixels (tokens for a map, the scene's
            pixels at the sensor's GSD for tile vectors).
    """

    transform: Affine

    def start(self, record: dict[str, Any] | None) -> None:
        """Reopen the partial data at the recorded progress (``record``), or, with ``None``,
        prepare a new one, which the first :meth:`commit` creates (so that a run that fails
        before it leaves nothing)."""

    def commit(self, strip: int) -> Path | None:
        """Write strip ``strip`` to the partial data; returns the carry saved for the next strip.

        Raises:
            OutputWriteError: a failed write, naming the cause (ENOSPC...) and the file."""

    def finish(self, out: Path) -> Path:
        """Write the final file ``out`` from the partial data, remove the latter, return ``out``.

        Raises:
            OutputWriteError: a failed write, naming the cause; ``out`` is not written and the
                partial data and its record are kept for a rerun."""


class MapWriter(TokenBlend):
    """Accumulates weighted features of one strip of tiles (:class:`~.blend.TokenBlend`) and
    writes finished token rows into the partial GeoTIFF; at the end copies it into a
    DEFLATE-compressed, tiled Cloud-Optimised GeoTIFF (with average-resampled overviews when
    ``overviews``)."""

    def __init__(
        self, plan: Plan, scene: Scene, dim: int, prefix: int, device: torch.device, partial: Partial,
        tags: dict[str, str], overviews: bool = False,
    ) -> None:
        from affine import Affine

        super().__init__(plan, dim, prefix, device)
        self.partial = partial
        self.transform = scene.transform @ Affine.scale(plan.patch_px)
        self.profile = dict(
            driver="GTiff", dtype="float32", count=dim, height=plan.grid_tokens[0], width=plan.grid_tokens[1],
            crs=scene.crs, transform=self.transform, nodata=float("nan"), interleave="band",
            BIGTIFF="IF_SAFER",
        )
        self.tags = tags
        self.overviews = overviews
        self._created = False  # the partial GeoTIFF, by start (resuming) or the first commit

    def start(self, record: dict[str, Any] | None) -> None:
        self._created = record is not None
        if record is None:
            return
        done = record["strips_done"]
        self.base = self.plan.row_starts[done] if done < len(self.plan.row_starts) else self.plan.grid_tokens[0]
        if record["carry"] is not None:
            with np.load(self.partial.base.parent / record["carry"]) as carry:
                rows = len(carry["wsum"])
                self.acc[:rows] = torch.from_numpy(carry["acc"]).to(self.acc.device)
                self.wsum[:rows] = torch.from_numpy(carry["wsum"]).to(self.wsum.device)

    def _create(self) -> None:
        """Create the partial GeoTIFF. Uncompressed, it is laid out in full (NaN) at creation, so
        later windowed writes in "r+" mode overwrite blocks in place and the file never grows."""
        rasterio = import_rasterio()
        size = 4 * self.dim * self.plan.grid_tokens[0] * self.plan.grid_tokens[1]
        with writing(self.partial.base, size) as log:
            with quiet_georef(), rasterio.open(self.partial.base, "w", **self.profile) as dst:
                dst.update_tags(**self.tags)
                for band, name in enumerate(band_names(self.dim), start=1):
                    dst.set_band_description(band, name)
            # GDAL writes the blocks when it closes the file, and only logs a failure there.
            log.check(missing=size - self.partial.base.stat().st_size)
        self._created = True

    def commit(self, strip: int) -> Path | None:
        """Write the token rows no later strip touches, keep the rest; returns the saved carry."""
        rasterio = import_rasterio()
        from rasterio.windows import Window

        done = self.next_row(strip) - self.base
        rows = self.blended(slice(0, done))
        if not self._created:
            self._create()
        with writing(self.partial.base, rows.nbytes) as log:
            with quiet_georef(), rasterio.open(self.partial.base, "r+") as dst:
                dst.write(rows, window=Window(0, self.base, self.plan.grid_tokens[1], done))
            log.check()  # GDAL writes cached blocks on closing, and only logs a failure there
        kept = self.advance(strip)
        # The kept rows are what the next strip adds to; without overlap there are none.
        if kept == 0 or not bool(self.wsum[:kept].any()):
            return None
        buffer = io.BytesIO()
        np.savez(buffer, acc=self.acc[:kept].cpu().numpy(), wsum=self.wsum[:kept].cpu().numpy())
        path = self.partial.carry(strip + 1)
        with writing(path, buffer.getbuffer().nbytes):
            atomic_write_bytes(path, buffer.getvalue())
        return path

    def finish(self, out: Path) -> Path:
        """Copy the partial GeoTIFF into the COG ``out`` (through a temporary name) and remove it.
        GDAL copies block by block, within its capped cache."""
        from rasterio.shutil import copy as gdal_copy

        # GDAL compresses one block per thread: with torch's thread count (the cores this process
        # was given) the copy took 0.68 s instead of 1.24 s for a 41 MB map on 2 cores, about a
        # fifth of a bf16 scene. ALL_CPUS would oversubscribe hosts shared by several workers.
        options = dict(
            driver="COG", COMPRESS="DEFLATE", PREDICTOR="YES", BLOCKSIZE=COG_BLOCK, BIGTIFF="IF_SAFER",
            OVERVIEWS="NONE", NUM_THREADS=str(torch.get_num_threads()),
        )
        if self.overviews:
            # Halve until the coarsest level fits in one tile (at least one level).
            levels = max(1, math.ceil(math.log2(max(self.plan.grid_tokens) / COG_BLOCK)))
            options.update(OVERVIEWS="IGNORE_EXISTING", OVERVIEW_COUNT=levels, OVERVIEW_RESAMPLING="AVERAGE")
        # The COG's size is not known before; the partial GeoTIFF's bounds it, compressed or not.
        size = self.partial.base.stat().st_size
        with self.partial.finishing(out, len(self.plan.row_starts)), writing(out, size) as log, quiet_georef(), \
                atomic_path(out) as tmp:
            try:
                gdal_copy(self.partial.base, tmp, **options)
                log.check()
                check_complete(tmp, log)
            except BaseException:
                # GDAL's own temporary files beside it (the overviews' "<tmp>.ovr.tmp").
                for leftover in tmp.parent.glob(glob.escape(tmp.name) + ".*"):
                    leftover.unlink(missing_ok=True)
                raise
        self.partial.base.unlink()
        return out


def band_names(dim: int) -> list[str]:
    """The map's band descriptions: ``emb_000`` to ``emb_<dim - 1>``, zero-padded to one width
    (three digits at least) so that they sort in band order."""
    width = max(3, len(str(dim - 1)))
    return [f"emb_{k:0{width}d}" for k in range(dim)]


def check_complete(path: Path, log: GdalLog) -> None:
    """Raise the :class:`~xstars_models.errors.OutputWriteError` of a GeoTIFF whose directory or
    blocks (at any overview level) do not all lie inside the file. GDAL's COG copy with several
    threads may return as if it succeeded when its writes failed (a full disk): their errors
    reach neither the caller nor the log."""
    rasterio = import_rasterio()
    size = path.stat().st_size
    try:
        with quiet_georef(), rasterio.open(path) as dataset:
            levels = [None, *range(len(dataset.overviews(1)))]
        for level in levels:
            with quiet_georef(), rasterio.open(path, overview_level=level) as dataset:
                # Pixel interleaving: band 1's blocks hold every band.
                for (row, col), _ in dataset.block_windows(1):
                    offset = int(dataset.get_tag_item(f"BLOCK_OFFSET_{col}_{row}", "TIFF", bidx=1) or 0)
                    length = int(dataset.get_tag_item(f"BLOCK_SIZE_{col}_{row}", "TIFF", bidx=1) or 0)
                    if offset == 0 or length == 0 or offset + length > size:
                        where = "" if level is None else f" of overview {level + 1}"
                        raise OSError(f"block ({row}, {col}){where} is not in the {size} bytes written")
    except io_errors() as err:
        log.messages.extend(chain_messages(err))
        log.check(missing=max(1, log.needed - size))


class ClsWriter:
    """Appends each strip's tile records (nodata fraction, CLS vector) to a raw float32 file;
    at the end streams them into GeoParquet with each tile's footprint and input-pixel window."""

    def __init__(
        self, plan: Plan, scene: Scene, dim: int, partial: Partial, meta: dict[str, Any],
        vectors: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        """``vectors`` maps a batch's CLS tokens (B x D, CPU float32) to the vectors written
        (e.g. the model's whitening); default: the CLS tokens themselves."""
        import_pyarrow()  # fail before embedding anything, not at the end
        self.plan, self.scene, self.dim, self.partial, self.meta = plan, scene, dim, partial, meta
        self.vectors = vectors
        self.record = 1 + dim
        self.transform = scene.transform
        self._strip = np.full((len(plan.col_starts), self.record), np.nan, np.float32)

    def start(self, record: dict[str, Any] | None) -> None:
        if record is None:
            return  # the first commit creates the file
        with open(self.partial.base, "ab") as fh:
            # Records past the last committed strip are from an interrupted strip: drop them.
            fh.truncate(record["strips_done"] * len(self.plan.col_starts) * self.record * 4)

    def begin_strip(self, token_missing: torch.Tensor, tile_missing: np.ndarray) -> None:
        self._strip[:] = np.nan
        self._strip[:, 0] = tile_missing

    def add(self, strip: int, cols: list[int], tokens: torch.Tensor) -> None:
        cls = tokens[:, 0].float().cpu()
        self._strip[cols, 1:] = (cls if self.vectors is None else self.vectors(cls)).numpy()

    def commit(self, strip: int) -> None:
        with writing(self.partial.base, self._strip.nbytes), open(self.partial.base, "ab") as fh:
            fh.write(self._strip.tobytes())
            fh.flush()
            os.fsync(fh.fileno())

    def finish(self, out: Path) -> Path:
        n_rows, n_cols = len(self.plan.row_starts), len(self.plan.col_starts)
        strip_bytes = n_cols * self.record * 4

        def strips() -> Iterator[TileStrip]:
            with open(self.partial.base, "rb") as fh:
                for i in range(n_rows):
                    records = np.frombuffer(fh.read(strip_bytes), np.float32).reshape(n_cols, self.record)
                    windows, rings = tile_geometry(self.plan, self.scene, i)
                    yield (
                        np.arange(i * n_cols, (i + 1) * n_cols), np.full(n_cols, i), np.arange(n_cols),
                        np.asarray(np.isfinite(records[:, 1:]).all(1)), records[:, 0], windows, records[:, 1:], rings,
                    )

        corners = np.concatenate([tile_geometry(self.plan, self.scene, i)[1] for i in (0, n_rows - 1)])
        bbox = [float(v) for v in (*corners.reshape(-1, 2).min(0), *corners.reshape(-1, 2).max(0))]
        size = self.partial.base.stat().st_size
        with self.partial.finishing(out, n_rows), writing(out, size), atomic_open(out) as handle:
            write_geoparquet(handle, strips(), self.dim, self.scene.crs, bbox, self.meta)
        self.partial.base.unlink()
        return out


def tile_geometry(plan: Plan, scene: Scene, i: int) -> tuple[np.ndarray, np.ndarray]:
    """Input-pixel windows (row, col, height, width; integers, in the whole input, area of
    interest included; n x 4) and footprint rings (closed, counter-clockwise on a north-up map, in
    the scene's CRS; n x 5 x 2) of the tiles of tile-row ``i`` of ``plan``.

    A scene read at its own pixel size has exact windows. A resampled one (``scene.scale`` input
    pixels per sensor pixel) gives a tile a fractional extent in input pixels; its window is then
    the input pixels that extent touches (start rounded down, end up), and its ring is exact."""
    p, (th, tw) = plan.patch_px, plan.tile_tokens
    sx, sy = scene.scale or (1.0, 1.0)
    row0, col0 = scene.origin
    t = scene.transform
    windows, rings = [], []
    for c in plan.col_starts:
        r0, c0, h, w = plan.row_starts[i] * p, c * p, th * p, tw * p
        corners = [t @ (c0, r0), t @ (c0, r0 + h), t @ (c0 + w, r0 + h), t @ (c0 + w, r0)]
        # The 1e-9 absorbs float error in scales such as 10 / 3 (a start of 2.9999999999 is 3).
        top, left = math.floor(r0 * sy + 1e-9), math.floor(c0 * sx + 1e-9)
        bottom, right = math.ceil((r0 + h) * sy - 1e-9), math.ceil((c0 + w) * sx - 1e-9)
        windows.append((row0 + top, col0 + left, bottom - top, right - left))
        rings.append(corners + corners[:1])
    return np.asarray(windows, np.int64), np.asarray(rings, np.float64)
