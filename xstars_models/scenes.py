"""Whole scenes: a GeoTIFF (or a large C x H x W array) in, georeferenced embeddings out.

:func:`embed_scene` cuts a scene into tiles, embeds them in batches and writes either a dense
feature map — a float32 GeoTIFF with one band per feature dimension and one pixel per token — or
one vector per tile with its footprint (``.npz`` plus a ``.geojson``).

Ground sampling distance (GSD)
    The pixel size in the scene's metadata (its affine transform, in the CRS's linear unit,
    converted to metres) is compared with the sensor's ``gsd_m``:

    * within 1 %: used as is;
    * otherwise, with ``resample=True``: every window is read resampled to the sensor's GSD
      (``average`` when the file is finer than the sensor, ``bilinear`` when coarser); the scale is
      recorded in :attr:`SceneResult.resample_scale` and in the output's metadata;
    * otherwise, within 10 %: used as is with a ``UserWarning`` naming both GSDs;
    * otherwise: ``ValueError`` naming both GSDs and the ``resample=True`` option.

    Scenes in a geographic CRS (degrees) are refused: reproject them to a projected CRS first.
    Scenes without georeferencing (no CRS and an identity transform) are taken to be at the
    sensor's GSD; the output is then in the input's pixel coordinates.

Tiles
    ``tile`` and ``overlap`` are in pixels at the sensor's GSD and must be whole numbers of the
    sensor's patch size. Along each axis tiles start every ``tile - overlap`` pixels and the last one
    is shifted inward to end at the scene edge, so every tile is full size unless the scene itself is
    smaller than a tile (then the tile is the scene). Pixels beyond a whole number of patches
    (bottom rows, right columns) are not embedded, with a warning.

Stitching (``output="map"``)
    Where tiles overlap, a token's feature is the weighted mean of the tiles covering it. A tile's
    weight ramps linearly across its overlap with each neighbour (a cross-fade: where two tiles
    overlap their weights sum to one), so seams do not show. Without overlap every token comes from
    exactly one tile and equals ``model.embed(tile, sensor, output="map")`` there.

Nodata
    A pixel is missing when all its bands equal the file's nodata value (else the sensor spec's
    ``nodata``), or when any band is NaN or infinite. Tiles with more than ``max_nodata`` of their
    pixels missing, or all of them, are not embedded. In the map, tokens covered only by such tiles,
    and tokens whose pixels are all missing, are NaN (the output's nodata value); in ``cls`` output
    such tiles have NaN vectors and ``valid`` False.

Memory
    The scene is processed one row of tiles (a *strip*) at a time, and nothing is kept for rows
    already done: the next strip is read in a background thread while the current one is embedded,
    the features of the strip are added into an accumulator one tile high and one scene wide (in
    tokens), and the rows of it that no later tile touches are written to the output window by
    window. Peak memory therefore depends on the scene's width, the tile size, the batch size and
    the feature dimension, never on the scene's height. GDAL's block cache is capped at 64 MiB
    during the call so that it cannot grow with the scene either. ``cls`` outputs are streamed into
    the ``.npz`` and ``.geojson`` strip by strip too. (An array source is, of course, in memory
    already.)

Resuming
    Outputs are written under temporary names beside ``out`` — ``<out>.partial`` (the map GeoTIFF,
    or the raw tile vectors for ``cls``) and ``<out>.partial.json`` — and renamed into place at the
    end. After each strip the partial output is flushed to disk, the accumulator rows that the next
    strip still adds to are saved (``<out>.partial.carry-<strip>.npz``, only with overlapping
    tiles), and the JSON records the number of finished strips together with the settings and a
    fingerprint of the input (path, size and modification time of a file, or a hash of an array)
    and of the model's weights. A later call with ``resume=True`` continues after the last finished
    strip and refuses, naming the differing settings, if any of them changed; ``resume=False``
    discards a partial run and starts over. ``batch_size``, ``device`` and ``compile`` may change
    between runs.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import time
import warnings
import zipfile
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from .sensors import SensorSpec
from .serialization import atomic_write_bytes

if TYPE_CHECKING:
    from affine import Affine

    from .model import XStars

__all__ = ["SCENE_OUTPUTS", "SceneResult", "default_tile", "embed_scene"]

SCENE_OUTPUTS = ("map", "cls")

GSD_SAME = 0.01  # relative GSD difference used without comment
GSD_WARN = 0.10  # ... used with a warning when resample=False; beyond it, an error

# GDAL caches every block it reads or writes up to this size; its default (5 % of RAM) would let
# the cache grow with the scene.
_GDAL_CACHE_BYTES = 64 * 2**20
_PARTIAL_FORMAT = "xstars-scene-partial/1"


@dataclass(frozen=True)
class SceneResult:
    """What :func:`embed_scene` wrote.

    Attributes:
        path: the feature-map GeoTIFF (``map``) or the ``.npz`` of tile vectors (``cls``).
        footprints: the ``.geojson`` of tile footprints (``cls``), else ``None``.
        output: ``"map"`` or ``"cls"``.
        shape: ``map``: (feature bands, token rows, token columns); ``cls``: (tiles, feature dim).
        tiles: number of tiles in the scene.
        embedded: tiles embedded by this call.
        skipped: tiles not embedded because of nodata (over the whole run, earlier calls included).
        resumed: tiles finished by an earlier, interrupted call and not redone.
        transform: affine transform of the map (one pixel per token: the scene's transform at the
            sensor's GSD scaled by the patch size); for ``cls``, of the scene at the sensor's GSD.
        crs: the scene's CRS as WKT, or ``None``.
        resample_scale: (x, y) input pixels per sensor pixel when windows were resampled, else
            ``None``.
        seconds: wall-clock time of this call.
    """

    path: Path
    footprints: Path | None
    output: str
    shape: tuple[int, int, int] | tuple[int, int]
    tiles: int
    embedded: int
    skipped: int
    resumed: int
    transform: Affine
    crs: str | None
    resample_scale: tuple[float, float] | None
    seconds: float


def _rasterio() -> Any:
    try:
        import rasterio
    except ImportError:
        raise ImportError(
            "Embedding scenes reads and writes GeoTIFFs with rasterio, which is not installed: "
            "pip install 'xstars-models[geo]'."
        ) from None
    return rasterio


# --------------------------------------------------------------------------------------------
# The scene: windows of digital numbers at the sensor's GSD.


def _check_gsd(
    pixel_m: tuple[float, float], gsd_m: float, sensor: str, what: str, resample: bool
) -> tuple[float, float] | None:
    """The (x, y) read scale (input pixels per sensor pixel) when windows must be resampled,
    ``None`` when the input is used as is; warns or raises as the module documentation says."""
    worst = max(abs(size / gsd_m - 1.0) for size in pixel_m)
    if worst <= GSD_SAME:
        return None
    if resample:
        return (gsd_m / pixel_m[0], gsd_m / pixel_m[1])
    shown = f"{pixel_m[0]:g} m" if math.isclose(*pixel_m, rel_tol=1e-9) else f"{pixel_m[0]:g} x {pixel_m[1]:g} m"
    if worst <= GSD_WARN:
        warnings.warn(
            f"{what}: pixel size {shown} differs from sensor {sensor!r}'s {gsd_m:g} m GSD by "
            f"{worst:.1%}; embedding it as is (pass resample=True to resample to {gsd_m:g} m).",
            UserWarning,
            stacklevel=6,
        )
        return None
    raise ValueError(
        f"{what}: pixel size {shown} but sensor {sensor!r} has a GSD of {gsd_m:g} m "
        f"({worst:.0%} apart). Pass resample=True to read windows resampled to {gsd_m:g} m, "
        "or embed with a sensor at the imagery's GSD."
    )


class _Scene:
    """Metadata of the scene at the sensor's GSD and a reader of its strips."""

    def __init__(
        self,
        what: str,
        dataset: Any,
        array: np.ndarray | None,
        transform: Affine,
        crs: Any,
        nodata: float | None,
        spec: SensorSpec,
        sensor: str,
        resample: bool,
        fingerprint: dict[str, Any],
    ) -> None:
        from affine import Affine

        self.what = what
        self.fingerprint = fingerprint
        self.crs = crs
        self.nodata = nodata
        self._dataset = dataset
        self._array = array
        count, height, width = array.shape if array is not None else (dataset.count, dataset.height, dataset.width)
        dtype = np.dtype(array.dtype if array is not None else dataset.dtypes[0])
        if count != spec.num_bands:
            raise ValueError(
                f"{what}: {count} bands, but sensor {sensor!r} has {spec.num_bands} bands "
                f"{list(spec.band_names)} (in that order)."
            )
        if dtype.kind != "f" and dtype.name != spec.dtype:
            raise ValueError(
                f"{what}: {dtype.name} pixels, but sensor {sensor!r} expects {spec.dtype} digital "
                "numbers (or floats in the same units)."
            )
        self.dtype = dtype
        self.scale = self._gsd_scale(transform, crs, spec, sensor, resample)
        if self.scale is None:
            self.height, self.width = height, width
            self.transform = transform
        else:
            # Whole sensor pixels that lie inside the input.
            self.height = int(math.floor(height / self.scale[1] + 1e-9))
            self.width = int(math.floor(width / self.scale[0] + 1e-9))
            self.transform = transform @ Affine.scale(*self.scale)

    def _gsd_scale(
        self, transform: Affine, crs: Any, spec: SensorSpec, sensor: str, resample: bool
    ) -> tuple[float, float] | None:
        if crs is None and transform.is_identity:
            if self._array is None:  # a file; arrays without a transform are expected
                warnings.warn(
                    f"{self.what} has no georeferencing; taking its pixels to be at sensor {sensor!r}'s "
                    f"{spec.gsd_m:g} m GSD. The output is in the input's pixel coordinates.",
                    UserWarning,
                    stacklevel=5,
                )
            return None
        if crs is not None and crs.is_geographic:
            raise ValueError(
                f"{self.what} is in a geographic CRS ({crs.to_string()}, degrees), so its GSD in metres "
                f"is unknown; reproject it to a projected CRS (e.g. UTM) at sensor {sensor!r}'s "
                f"{spec.gsd_m:g} m GSD."
            )
        to_metres = 1.0
        if crs is not None:
            with contextlib.suppress(Exception):  # CRSs without a linear unit: assume metres
                to_metres = float(crs.linear_units_factor[1])
        pixel_m = (math.hypot(transform.a, transform.d) * to_metres, math.hypot(transform.b, transform.e) * to_metres)
        return _check_gsd(pixel_m, spec.gsd_m, sensor, self.what, resample)

    def read(self, row: int, height: int, width: int) -> np.ndarray:
        """Pixels [row, row + height) x [0, width) at the sensor's GSD, C x height x width, in the
        input's data type (a fresh array)."""
        if self._array is not None:
            return np.array(self._array[:, row : row + height, :width])
        from rasterio.enums import Resampling
        from rasterio.windows import Window

        if self.scale is None:
            return self._dataset.read(window=Window(0, row, width, height))
        sx, sy = self.scale
        return self._dataset.read(
            window=Window(0, row * sy, width * sx, height * sy),
            out_shape=(self._dataset.count, height, width),
            # Averaging when shrinking keeps every input pixel's contribution; bilinear when enlarging.
            resampling=Resampling.average if min(sx, sy) > 1 else Resampling.bilinear,
        )


def _open_scene(
    source: str | os.PathLike | np.ndarray,
    spec: SensorSpec,
    sensor: str,
    resample: bool,
    transform: Affine | None,
    crs: Any,
    stack: contextlib.ExitStack,
) -> _Scene:
    rasterio = _rasterio()
    from affine import Affine

    if isinstance(source, np.ndarray):
        if source.ndim != 3:
            raise ValueError(
                f"Scene arrays must be C x H x W; got shape {source.shape} for sensor {sensor!r}."
            )
        crs = rasterio.crs.CRS.from_user_input(crs) if crs is not None else None
        transform = transform if transform is not None else Affine.identity()
        data = np.ascontiguousarray(source)
        fingerprint = {
            "array_sha256": hashlib.sha256(memoryview(data).cast("B")).hexdigest(),
            "shape": list(data.shape),
            "dtype": data.dtype.name,
        }
        what = f"array {tuple(data.shape)}"
        nodata = spec.nodata
        scene = _Scene(what, None, data, transform, crs, nodata, spec, sensor, resample, fingerprint)
        if scene.scale is not None:
            # Resampled reads go through GDAL, so the array becomes an in-memory dataset.
            memfile = stack.enter_context(rasterio.io.MemoryFile())
            dataset = stack.enter_context(
                memfile.open(
                    driver="GTiff", width=data.shape[2], height=data.shape[1], count=data.shape[0],
                    dtype=data.dtype.name, transform=transform, crs=crs,
                )
            )
            dataset.write(data)
            scene._dataset, scene._array = dataset, None
        return scene
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(
            f"source must be a GeoTIFF path or a C x H x W numpy array, got {type(source).__name__}."
        )
    if transform is not None or crs is not None:
        raise ValueError(f"{source}: transform= and crs= are for array sources; a file has its own.")
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"Scene {path} does not exist.")
    dataset = stack.enter_context(rasterio.open(path))
    stat = path.stat()
    fingerprint = {"path": str(path.resolve()), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    nodata = dataset.nodata if dataset.nodata is not None else spec.nodata
    return _Scene(str(path), dataset, None, dataset.transform, dataset.crs, nodata, spec, sensor, resample, fingerprint)


# --------------------------------------------------------------------------------------------
# Tiling in token units.


def _tile_starts(total: int, size: int, stride: int) -> list[int]:
    """Starts of tiles of ``size`` every ``stride`` along ``total``, the last shifted inward so
    that it ends at ``total`` (all in tokens; ``size <= total``)."""
    return list(range(0, total - size, stride)) + [total - size]


def _ramps(starts: list[int], size: int) -> list[np.ndarray]:
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
class _Plan:
    """The tiling of a scene of ``grid`` tokens into tiles of ``tile`` tokens (rows, cols)."""

    patch: int
    grid: tuple[int, int]
    tile: tuple[int, int]
    rows: list[int]
    cols: list[int]

    @classmethod
    def build(cls, scene: _Scene, patch: int, tile_px: int, overlap_px: int, sensor: str) -> _Plan:
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
                stacklevel=3,
            )
        tokens, stride = tile_px // patch, (tile_px - overlap_px) // patch
        tile = (min(tokens, grid[0]), min(tokens, grid[1]))
        return cls(patch, grid, tile, _tile_starts(grid[0], tile[0], stride), _tile_starts(grid[1], tile[1], stride))

    @property
    def tiles(self) -> int:
        return len(self.rows) * len(self.cols)


def default_tile(model: XStars, sensor: str) -> int:
    """Default tile side in pixels: the trunk's pretraining token grid (``img_size / patch``) times
    the sensor's patch size, so position embeddings are used as trained; larger tiles also cost
    more per pixel, as attention grows with the square of the tokens per tile."""
    grid = getattr(model.trunk.patch_embed, "grid_size", None) or (14, 14)
    return int(max(grid)) * model.check_sensor(sensor).patch_size


# --------------------------------------------------------------------------------------------
# Writers: the partial output, its carried-over accumulator rows, and the final files.


class _Partial:
    """The files of an unfinished output: the partial data (``<out>.partial``), the accumulator
    rows carried into the next strip, and the sidecar JSON recording the settings and the strips
    already done."""

    def __init__(self, out: Path) -> None:
        self.base = out.with_name(out.name + ".partial")
        self.json = out.with_name(out.name + ".partial.json")

    def carry(self, strips_done: int) -> Path:
        return self.base.with_name(f"{self.base.name}.carry-{strips_done}.npz")

    def files(self) -> list[Path]:
        return [self.base, self.json, *self.base.parent.glob(self.base.name + ".carry-*.npz")]

    def discard(self) -> None:
        for path in self.files():
            path.unlink(missing_ok=True)

    def load(self, settings: dict[str, Any], resume: bool) -> dict[str, Any] | None:
        """The recorded progress to resume from, or ``None`` to start over (after discarding any
        partial files)."""
        if not resume or not self.json.is_file() or not self.base.is_file():
            self.discard()
            return None
        try:
            record = json.loads(self.json.read_text())
        except (OSError, ValueError):
            self.discard()
            return None
        if record.get("format") != _PARTIAL_FORMAT:
            self.discard()
            return None
        wanted = json.loads(json.dumps(settings))
        before = record["settings"]
        changed = sorted(k for k in wanted.keys() | before.keys() if before.get(k) != wanted.get(k))
        if changed:
            details = "; ".join(f"{k}: {_short(before.get(k))} then, {_short(wanted.get(k))} now" for k in changed)
            raise ValueError(
                f"{self.base} is a partial run with other settings ({details}). Rerun with the same "
                "settings to resume it, or pass resume=False to discard it and start over."
            )
        return record

    def commit(self, settings: dict[str, Any], strips_done: int, counts: dict[str, int], carry: Path | None) -> None:
        record = {
            "format": _PARTIAL_FORMAT,
            "settings": settings,
            "strips_done": strips_done,
            "carry": carry.name if carry is not None else None,
            **counts,
        }
        atomic_write_bytes(self.json, json.dumps(record, indent=1).encode("utf-8"))
        # Carries of earlier strips go only once the record no longer names them.
        for old in self.base.parent.glob(self.base.name + ".carry-*.npz"):
            if carry is None or old.name != carry.name:
                old.unlink(missing_ok=True)


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


class _MapWriter:
    """Accumulates weighted features of one strip of tiles and writes finished token rows into
    the partial GeoTIFF."""

    def __init__(
        self, plan: _Plan, scene: _Scene, dim: int, prefix: int, device: torch.device, partial: _Partial,
        tags: dict[str, str],
    ) -> None:
        from affine import Affine

        self.plan, self.partial, self.dim, self.prefix = plan, partial, dim, prefix
        self.token_missing = torch.zeros(plan.tile[0], plan.grid[1], device=device)
        th, tw = plan.tile
        self.row_w = [torch.from_numpy(w).to(device) for w in _ramps(plan.rows, th)]
        self.col_w = torch.from_numpy(np.stack(_ramps(plan.cols, tw))).to(device)  # tiles x tw
        # Scene token column of each token column of each tile in a tile-row: tiles x tw.
        self.col_index = (torch.tensor(plan.cols)[:, None] + torch.arange(tw)).to(device)
        # Token rows [base, base + th) of the scene, full width: the only rows still changing.
        self.acc = torch.zeros(th, plan.grid[1], dim, device=device)
        self.wsum = torch.zeros(th, plan.grid[1], device=device)
        self.base = 0
        self.transform = scene.transform @ Affine.scale(plan.patch)
        self.profile = dict(
            driver="GTiff", dtype="float32", count=dim, height=plan.grid[0], width=plan.grid[1],
            crs=scene.crs, transform=self.transform, nodata=float("nan"), interleave="band",
            BIGTIFF="IF_SAFER",
        )
        self.tags = tags

    def start(self, record: dict[str, Any] | None) -> None:
        rasterio = _rasterio()
        if record is None:
            # An uncompressed GeoTIFF is laid out in full (NaN) at creation, so later windowed
            # writes in "r+" mode overwrite blocks in place and the file never grows.
            with _quiet_georef(), rasterio.open(self.partial.base, "w", **self.profile) as dst:
                dst.update_tags(**self.tags)
            return
        done = record["strips_done"]
        self.base = self.plan.rows[done] if done < len(self.plan.rows) else self.plan.grid[0]
        if record["carry"] is not None:
            with np.load(self.partial.base.parent / record["carry"]) as carry:
                rows = len(carry["wsum"])
                self.acc[:rows] = torch.from_numpy(carry["acc"]).to(self.acc.device)
                self.wsum[:rows] = torch.from_numpy(carry["wsum"]).to(self.wsum.device)

    def begin_strip(self, token_missing: torch.Tensor, tile_missing: np.ndarray) -> None:
        """Missing-pixel fractions of the strip's tokens (th x scene width) and tiles."""
        self.token_missing = token_missing

    def add(self, strip: int, cols: list[int], tokens: torch.Tensor) -> None:
        """Add the final tokens (B x (prefix + h*w) x D) of tiles ``cols`` of tile-row ``strip``."""
        th, tw = self.plan.tile
        picked = torch.tensor(cols, device=self.col_w.device)
        # The whole batch in one scatter-add over scene columns (overlapping tiles accumulate),
        # rather than a handful of small tensor operations per tile.
        index = self.col_index[picked].reshape(-1)  # B*tw
        features = tokens[:, self.prefix :].reshape(len(cols), th, tw, self.dim)
        features = features.permute(1, 0, 2, 3).reshape(th, -1, self.dim)  # th x B*tw x D
        weight = self.row_w[strip][:, None] * self.col_w[picked].reshape(1, -1)  # th x B*tw
        # Tokens whose pixels are all missing get no weight, so they end up NaN.
        weight = weight * (self.token_missing[:, index] < 1)
        self.acc.index_add_(1, index, features * weight[..., None])
        self.wsum.index_add_(1, index, weight)

    def commit(self, strip: int) -> Path | None:
        """Write the token rows no later strip touches, keep the rest; returns the saved carry."""
        rasterio = _rasterio()
        from rasterio.windows import Window

        th = self.plan.tile[0]
        nxt = self.plan.rows[strip + 1] if strip + 1 < len(self.plan.rows) else self.plan.grid[0]
        done = nxt - self.base
        # 0 / 0 -> NaN: tokens no embedded tile covered.
        rows = (self.acc[:done] / self.wsum[:done, :, None]).permute(2, 0, 1).float().cpu().numpy()
        with _quiet_georef(), rasterio.open(self.partial.base, "r+") as dst:
            dst.write(rows, window=Window(0, self.base, self.plan.grid[1], done))
        kept = th - done
        self.acc[:kept] = self.acc[done:].clone()
        self.wsum[:kept] = self.wsum[done:].clone()
        self.acc[kept:] = 0
        self.wsum[kept:] = 0
        self.base = nxt
        # The kept rows are what the next strip adds to; without overlap there are none.
        if kept == 0 or not bool(self.wsum[:kept].any()):
            return None
        buffer = io.BytesIO()
        np.savez(buffer, acc=self.acc[:kept].cpu().numpy(), wsum=self.wsum[:kept].cpu().numpy())
        path = self.partial.carry(strip + 1)
        atomic_write_bytes(path, buffer.getvalue())
        return path

    def finish(self, out: Path) -> tuple[Path, None]:
        os.replace(self.partial.base, out)
        return out, None


class _ClsWriter:
    """Appends each strip's tile records (nodata fraction, CLS vector) to a raw float32 file;
    at the end streams them into the ``.npz`` and writes the footprints."""

    def __init__(self, plan: _Plan, scene: _Scene, dim: int, partial: _Partial, meta: dict[str, Any]) -> None:
        self.plan, self.scene, self.dim, self.partial, self.meta = plan, scene, dim, partial, meta
        self.record = 1 + dim
        self.transform = scene.transform
        self._strip = np.full((len(plan.cols), self.record), np.nan, np.float32)

    def start(self, record: dict[str, Any] | None) -> None:
        done = 0 if record is None else record["strips_done"]
        with open(self.partial.base, "ab") as fh:
            # Records past the last committed strip are from an interrupted strip: drop them.
            fh.truncate(done * len(self.plan.cols) * self.record * 4)

    def begin_strip(self, token_missing: torch.Tensor, tile_missing: np.ndarray) -> None:
        self._strip[:] = np.nan
        self._strip[:, 0] = tile_missing

    def add(self, strip: int, cols: list[int], tokens: torch.Tensor) -> None:
        self._strip[cols, 1:] = tokens[:, 0].float().cpu().numpy()

    def commit(self, strip: int) -> None:
        with open(self.partial.base, "ab") as fh:
            fh.write(self._strip.tobytes())
            fh.flush()
            os.fsync(fh.fileno())

    def _tile_geometry(self, i: int) -> tuple[np.ndarray, np.ndarray, list[list[list[float]]]]:
        """Bounds (left, bottom, right, top), input-pixel windows (row, col, height, width) and
        footprint rings of the tiles of tile-row ``i``."""
        p, (th, tw) = self.plan.patch, self.plan.tile
        sx, sy = self.scene.scale or (1.0, 1.0)
        t = self.transform
        bounds, windows, rings = [], [], []
        for c in self.plan.cols:
            r0, c0, h, w = self.plan.rows[i] * p, c * p, th * p, tw * p
            # Counter-clockwise on a north-up map, as RFC 7946 wants exterior rings.
            corners = [t @ (c0, r0), t @ (c0, r0 + h), t @ (c0 + w, r0 + h), t @ (c0 + w, r0)]
            xs, ys = [x for x, _ in corners], [y for _, y in corners]
            bounds.append((min(xs), min(ys), max(xs), max(ys)))
            windows.append((r0 * sy, c0 * sx, h * sy, w * sx))
            rings.append([[float(x), float(y)] for x, y in corners + corners[:1]])
        return np.asarray(bounds, np.float64), np.asarray(windows, np.float64), rings

    def finish(self, out: Path) -> tuple[Path, Path]:
        n_rows, n_cols = len(self.plan.rows), len(self.plan.cols)
        n = self.plan.tiles
        strip_bytes = n_cols * self.record * 4

        def strips() -> Iterator[np.ndarray]:
            with open(self.partial.base, "rb") as fh:
                for _ in range(n_rows):
                    yield np.frombuffer(fh.read(strip_bytes), np.float32).reshape(n_cols, self.record)

        members: dict[str, tuple[tuple[int, ...], str, Callable[[], Iterator[np.ndarray]]]] = {
            "vectors": ((n, self.dim), "float32", lambda: (s[:, 1:] for s in strips())),
            "nodata_fraction": ((n,), "float32", lambda: (s[:, 0] for s in strips())),
            "valid": ((n,), "bool", lambda: (np.isfinite(s[:, 1:]).all(1) for s in strips())),
            "bounds": ((n, 4), "float64", lambda: (self._tile_geometry(i)[0] for i in range(n_rows))),
            "windows": ((n, 4), "float64", lambda: (self._tile_geometry(i)[1] for i in range(n_rows))),
            "tile_rc": ((n, 2), "int64", lambda: ([(i, j) for j in range(n_cols)] for i in range(n_rows))),
        }
        _stream_npz(out, members, self.meta)
        footprints = out.with_suffix(".geojson")
        self._write_geojson(footprints, strips())
        self.partial.base.unlink()
        return out, footprints

    def _write_geojson(self, path: Path, strips: Iterator[np.ndarray]) -> None:
        """Tile footprints in the scene's CRS (named in the pre-RFC 7946 ``crs`` member, which
        GDAL and QGIS read), so they match the ``.npz`` bounds exactly."""
        header: dict[str, Any] = {"type": "FeatureCollection"}
        epsg = self.scene.crs.to_epsg() if self.scene.crs is not None else None
        if epsg is not None:
            header["crs"] = {"type": "name", "properties": {"name": f"urn:ogc:def:crs:EPSG::{epsg}"}}
        n_cols = len(self.plan.cols)

        def write(fh: Any) -> None:
            fh.write((json.dumps(header)[:-1] + ', "features": [\n').encode())
            for i, strip in enumerate(strips):
                _, _, rings = self._tile_geometry(i)
                for j in range(n_cols):
                    index = i * n_cols + j
                    feature = {
                        "type": "Feature",
                        "id": index,
                        "properties": {
                            "tile": index, "row": i, "col": j,
                            "valid": bool(np.isfinite(strip[j, 1:]).all()),
                            "nodata_fraction": round(float(strip[j, 0]), 6),
                        },
                        "geometry": {"type": "Polygon", "coordinates": [rings[j]]},
                    }
                    fh.write((("" if index == 0 else ",\n") + json.dumps(feature)).encode())
            fh.write(b"\n]}\n")

        _atomic_stream(path, write)


def _atomic_stream(path: Path, write: Callable[[Any], None]) -> None:
    """Stream into a temporary file beside ``path`` (fsync'ed) and rename it into place."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as raw:
            write(raw)
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _stream_npz(
    path: Path,
    members: dict[str, tuple[tuple[int, ...], str, Callable[[], Iterator[np.ndarray]]]],
    scalars: dict[str, Any],
) -> None:
    """An ``.npz`` whose large arrays are written chunk by chunk (never whole in memory)."""

    def write(raw: Any) -> None:
        with zipfile.ZipFile(raw, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            for name, (shape, dtype, chunks) in members.items():
                with zf.open(f"{name}.npy", "w", force_zip64=True) as fh:
                    descr = np.lib.format.dtype_to_descr(np.dtype(dtype))
                    np.lib.format.write_array_header_1_0(fh, {"descr": descr, "fortran_order": False, "shape": shape})
                    for chunk in chunks():
                        fh.write(np.ascontiguousarray(chunk, dtype=dtype).tobytes())
            for name, value in scalars.items():
                with zf.open(f"{name}.npy", "w") as fh:
                    np.lib.format.write_array(fh, np.asarray(value), allow_pickle=False)

    _atomic_stream(path, write)


@contextlib.contextmanager
def _quiet_georef() -> Iterator[None]:
    """Scenes without georeferencing are allowed; rasterio's warning about them is noise here."""
    from rasterio.errors import NotGeoreferencedWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        yield


# --------------------------------------------------------------------------------------------
# The public entry point.


def _model_fingerprint(model: XStars) -> str:
    """A cheap fingerprint of the weights (per tensor: name, shape, dtype, sum and a strided sample
    of values), enough to tell a partial run of another model from this one."""
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, tensor in sorted(model.state_dict().items()):
            flat = tensor.detach().reshape(-1)
            step = max(1, flat.numel() // 256)
            digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
            digest.update(flat[::step].double().cpu().numpy().tobytes())
            digest.update(np.float64(flat.sum(dtype=torch.float64).item()).tobytes())
    return digest.hexdigest()


def _output_path(out: str | os.PathLike | None, source: Any, sensor: str, output: str) -> Path:
    suffixes = {"map": (".tif", ".tiff"), "cls": (".npz",)}[output]
    if out is None:
        if isinstance(source, np.ndarray):
            raise ValueError("out= is required when the scene is an array.")
        path = Path(source)
        return path.with_name(f"{path.stem}.{sensor}.{output}{suffixes[0]}")
    out = Path(out)
    if out.suffix.lower() not in suffixes:
        raise ValueError(f"out={out}: output={output!r} writes a {' or '.join(suffixes)} file.")
    return out


def _pixel_missing(strip: np.ndarray, nodata: float | None) -> np.ndarray | None:
    """H x W mask of missing pixels (all bands == nodata, or any band not finite), or ``None``
    when nothing can be missing. Non-finite values are set to 0 in place so that they do not
    spread to the whole tile through attention."""
    missing = None
    if strip.dtype.kind == "f":
        bad = ~np.isfinite(strip)
        if bad.any():
            strip[bad] = 0
            missing = bad.any(axis=0)
    if nodata is not None and not math.isnan(nodata):
        value = np.asarray(nodata).astype(strip.dtype)
        if value == nodata:  # else not representable in the data type: no pixel can equal it
            equal = (strip == value).all(axis=0)
            missing = equal if missing is None else missing | equal
    return missing


def embed_scene(
    model: XStars,
    source: str | os.PathLike | np.ndarray,
    sensor: str,
    out: str | os.PathLike | None = None,
    tile: int | None = None,
    overlap: int = 0,
    output: str = "map",
    batch_size: int = 16,
    device: str | torch.device | None = None,
    resample: bool = False,
    max_nodata: float = 0.5,
    progress: bool = True,
    resume: bool = True,
    *,
    transform: Affine | None = None,
    crs: Any = None,
    amp: bool | None = None,
    compile: bool = False,
) -> SceneResult:
    """Embed a whole scene tile by tile with bounded memory and write georeferenced embeddings.

    See the module documentation for the GSD check, tiling, stitching, nodata, memory and
    resuming rules.

    Args:
        model: the encoder (``XStars``).
        source: a GeoTIFF (or any file rasterio reads) of the sensor's digital numbers, bands in
            the sensor's order; or a C x H x W numpy array of them.
        sensor: which of ``model.sensors`` the imagery comes from.
        out: output file: a ``.tif`` for ``map``, a ``.npz`` for ``cls`` (the footprints go beside
            it as ``.geojson``). Default for a file ``scene.tif``: ``scene.<sensor>.map.tif`` or
            ``scene.<sensor>.cls.npz`` beside it; required for arrays.
        tile: tile side in pixels at the sensor's GSD, a multiple of the sensor's patch size.
            Default: :func:`default_tile` (the trunk's pretraining token grid).
        overlap: overlap between neighbouring tiles in pixels, a multiple of the patch size,
            smaller than ``tile``.
        output: ``"map"``: a float32 GeoTIFF, one band per feature dimension and one pixel per
            token (``patch_size`` sensor pixels), same CRS, transform = the scene's transform at
            the sensor's GSD scaled by the patch size, NaN as nodata. ``"cls"``: one CLS vector per
            tile in a ``.npz`` (``vectors`` tiles x D, ``valid``, ``nodata_fraction``, ``bounds``
            left/bottom/right/top in CRS units, ``windows`` row/col/height/width in input pixels,
            ``tile_rc``, ``crs`` WKT, ``transform``, ``sensor``, ``tile_px``, ``overlap_px``,
            ``patch_px``) and a ``.geojson`` of footprints with the tile index as ``tile``.
        batch_size: tiles per forward pass.
        device: where to compute (the model is moved there); default: where the model is.
        resample: read windows resampled to the sensor's GSD when the scene's pixel size differs
            from it by more than 1 %.
        max_nodata: largest fraction (0-1) of missing pixels a tile may have and still be embedded.
        progress: show a tqdm progress bar counting tiles.
        resume: continue a partial run of the same settings into ``out``; ``False`` starts over.
        transform: for an array source, the affine transform of its pixels (CRS units).
        crs: for an array source, its CRS (anything ``rasterio.crs.CRS.from_user_input`` takes).
        amp: bfloat16 autocast; ``None``: on for CUDA, off otherwise.
        compile: ``torch.compile`` the encoder first (pays off on long GPU runs).

    Returns:
        A :class:`SceneResult` describing the files written.

    Raises:
        ImportError: rasterio (the ``geo`` extra) is missing.
        ValueError: bands, data type or GSD that do not fit the sensor; a bad tile or overlap; a
            partial run with other settings (with ``resume=True``).
    """
    started = time.perf_counter()
    rasterio = _rasterio()
    if output not in SCENE_OUTPUTS:
        raise ValueError(f"output must be one of {SCENE_OUTPUTS}, got {output!r}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    if not 0.0 <= max_nodata <= 1.0:
        raise ValueError(f"max_nodata is a fraction of a tile's pixels (0-1), got {max_nodata}.")
    stem = model.check_sensor(sensor)
    if device is not None:
        model.to(device)
    target = model.trunk.cls_token.device
    use_amp = target.type == "cuda" if amp is None else bool(amp)
    out_path = _output_path(out, source, sensor, output)
    out_path.parent.mkdir(parents=True, exist_ok=True)

    with contextlib.ExitStack() as stack:
        stack.enter_context(rasterio.Env(GDAL_CACHEMAX=_GDAL_CACHE_BYTES))
        scene = _open_scene(source, stem.spec, sensor, resample, transform, crs, stack)
        tile_px = default_tile(model, sensor) if tile is None else tile
        plan = _Plan.build(scene, stem.patch_size, tile_px, overlap, sensor)
        settings = {
            "source": scene.fingerprint,
            "sensor": sensor,
            "patch_px": stem.patch_size,
            "output": output,
            "tile_px": int(tile_px),
            "overlap_px": int(overlap),
            "resample_scale": list(scene.scale) if scene.scale else None,
            "nodata": None if scene.nodata is None else repr(float(scene.nodata)),
            "max_nodata": float(max_nodata),
            "amp_bfloat16": use_amp,
            "model": _model_fingerprint(model),
        }
        partial = _Partial(out_path)
        record = partial.load(settings, resume)
        crs_wkt = scene.crs.to_wkt() if scene.crs is not None else None
        tags = {
            "xstars_sensor": sensor,
            "xstars_model": str(getattr(model, "name_or_path", None) or model.arch),
            "xstars_patch_px": str(stem.patch_size),
            "xstars_tile_px": str(tile_px),
            "xstars_overlap_px": str(overlap),
            "xstars_source": Path(scene.what).name if not isinstance(source, np.ndarray) else scene.what,
        }
        if scene.scale is not None:
            tags["xstars_resample_scale"] = f"{scene.scale[0]:.6g} {scene.scale[1]:.6g}"
        if output == "map":
            prefix = model.trunk.num_prefix_tokens
            writer: _MapWriter | _ClsWriter = _MapWriter(plan, scene, model.embed_dim, prefix, target, partial, tags)
        else:
            meta = {
                "crs": crs_wkt or "",
                "transform": np.asarray(tuple(scene.transform)[:6], np.float64),
                "sensor": sensor,
                "tile_px": int(tile_px),
                "overlap_px": int(overlap),
                "patch_px": stem.patch_size,
            }
            writer = _ClsWriter(plan, scene, model.embed_dim, partial, meta)
        writer.start(record)
        done = 0 if record is None else record["strips_done"]
        counts = {"skipped": 0 if record is None else record["skipped"]}
        embedded = _run_strips(model, sensor, scene, plan, writer, partial, settings, counts, done, target,
                               batch_size, max_nodata, use_amp, compile, progress)
        path, footprints = writer.finish(out_path)
        partial.discard()

    shape = (model.embed_dim, *plan.grid) if output == "map" else (plan.tiles, model.embed_dim)
    return SceneResult(
        path=path,
        footprints=footprints,
        output=output,
        shape=shape,
        tiles=plan.tiles,
        embedded=embedded,
        skipped=counts["skipped"],
        resumed=done * len(plan.cols),
        transform=writer.transform,
        crs=crs_wkt,
        resample_scale=scene.scale,
        seconds=time.perf_counter() - started,
    )


def _run_strips(
    model: XStars,
    sensor: str,
    scene: _Scene,
    plan: _Plan,
    writer: _MapWriter | _ClsWriter,
    partial: _Partial,
    settings: dict[str, Any],
    counts: dict[str, int],
    done: int,
    target: torch.device,
    batch_size: int,
    max_nodata: float,
    use_amp: bool,
    compile: bool,
    progress: bool,
) -> int:
    """Embed tile-rows ``done``.. and commit each; returns the number of tiles embedded."""
    p, (th, tw) = plan.patch, plan.tile
    cuda = target.type == "cuda"

    def read(i: int) -> tuple[torch.Tensor, np.ndarray]:
        strip = scene.read(plan.rows[i] * p, th * p, plan.grid[1] * p)
        missing = _pixel_missing(strip, scene.nodata)
        if missing is None:
            fraction = np.zeros((th, plan.grid[1]), np.float32)
        else:
            fraction = missing.reshape(th, p, plan.grid[1], p).mean(axis=(1, 3), dtype=np.float32)
        if strip.dtype == np.uint16:
            strip = strip.astype(np.int32)  # torch has only partial uint16 support
        pixels = torch.from_numpy(strip)
        # Page-locked memory lets the copy to the GPU overlap with compute.
        return (pixels.pin_memory() if cuda else pixels), fraction

    def encode(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(target.type, dtype=torch.bfloat16, enabled=use_amp):
            return model.forward_tokens(x, sensor, [])[0]

    forward = torch.compile(encode) if compile else encode
    embedded = 0
    was_training = model.training
    model.eval()
    bar = tqdm(total=plan.tiles, initial=done * len(plan.cols), desc=f"embed {Path(scene.what).name}",
               unit="tile", disable=not progress)
    try:
        with ThreadPoolExecutor(max_workers=1) as pool, torch.inference_mode():
            pending: Future | None = pool.submit(read, done) if done < len(plan.rows) else None
            for i in range(done, len(plan.rows)):
                pixels, fraction = pending.result()
                # Read the next strip while this one is embedded.
                pending = pool.submit(read, i + 1) if i + 1 < len(plan.rows) else None
                pixels = pixels.to(target, non_blocking=True)
                tile_missing = np.array([fraction[:, c : c + tw].mean() for c in plan.cols])
                keep = [j for j, f in enumerate(tile_missing) if f <= max_nodata and f < 1]
                writer.begin_strip(torch.from_numpy(fraction).to(target), tile_missing)
                for b in range(0, len(keep), batch_size):
                    chunk = keep[b : b + batch_size]
                    x = torch.stack([pixels[:, :, plan.cols[j] * p : (plan.cols[j] + tw) * p] for j in chunk]).float()
                    if cuda:
                        x = x.contiguous(memory_format=torch.channels_last)
                    writer.add(i, chunk, forward(x).float())
                    embedded += len(chunk)
                    bar.update(len(chunk))
                counts["skipped"] += len(plan.cols) - len(keep)
                bar.update(len(plan.cols) - len(keep))
                carry = writer.commit(i)
                partial.commit(settings, i + 1, counts, carry)
    finally:
        bar.close()
        model.train(was_training)
    return embedded
