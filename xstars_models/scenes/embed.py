"""The entry point: :func:`embed_scene` runs the strips of tiles through the model and the writers."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from ..io import GDAL_CACHE_BYTES, import_rasterio
from ..outputs import refuse_input_as_output
from ..precision import resolve_precision
from .reading import Scene
from .sources import is_remote, open_scene
from .tiling import Plan, default_tile
from .writers import ClsWriter, MapWriter, Partial

if TYPE_CHECKING:
    from affine import Affine

    from ..model import XStarsBase

SCENE_OUTPUTS = ("map", "cls")

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SceneResult:
    """What :func:`embed_scene` wrote.

    Attributes:
        path: the feature-map Cloud-Optimised GeoTIFF (``map``) or the GeoParquet file of tile
            vectors and footprints (``cls``).
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
        precision: what ran (``"fp32"``, ``"bf16"`` or ``"int8"``) and why, as
            ``str(xstars_models.precision.Precision)``.
    """

    path: Path
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
    precision: str = ""





def _model_fingerprint(model: XStarsBase) -> str:
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
    suffixes = {"map": (".tif", ".tiff"), "cls": (".parquet", ".geoparquet")}[output]
    if out is None:
        if isinstance(source, np.ndarray):
            raise ValueError("out= is required when the scene is an array.")
        if is_remote(source):
            raise ValueError("out= is required when the scene is a URL or a STAC Item.")
        path = Path(source)
        return path.with_name(f"{path.stem}.{sensor}.{output}{suffixes[0]}")
    out = Path(out)
    if out.suffix.lower() not in suffixes:
        raise ValueError(f"out={out}: output={output!r} writes a {' or '.join(suffixes)} file.")
    return out




def embed_scene(
    model: XStarsBase,
    source: str | os.PathLike | np.ndarray | Any,
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
    bounds: tuple[float, float, float, float] | None = None,
    window: Any = None,
    overviews: bool = False,
    precision: str = "auto",
    compile: bool = False,
    whiten: bool = False,
) -> SceneResult:
    """Embed a whole scene tile by tile with bounded memory and write georeferenced embeddings.

    See the module documentation for the GSD check, tiling, stitching, nodata, memory and
    resuming rules.

    Args:
        model: the encoder (``XStarsBase``).
        source: the sensor's digital numbers, bands in the sensor's order: a GeoTIFF (or any file
            rasterio reads); an ``http(s)://`` URL of a cloud-optimised GeoTIFF (read with HTTP
            range requests, window by window, never downloaded whole); a STAC Item (``pystac.Item``,
            or the path or URL of its JSON) whose assets are picked by the sensor's band names
            (see :mod:`xstars_models.scenes.stac`); or a C x H x W numpy array.
        sensor: which of ``model.sensors`` the imagery comes from.
        out: output file: a ``.tif`` for ``map``, a ``.parquet`` for ``cls``. Default for a file
            ``scene.tif``: ``scene.<sensor>.map.tif`` or ``scene.<sensor>.cls.parquet`` beside it;
            required for arrays, URLs and STAC Items.
        tile: tile side in pixels at the sensor's GSD, a multiple of the sensor's patch size.
            Default: :func:`default_tile` (the trunk's pretraining token grid).
        overlap: overlap between neighbouring tiles in pixels, a multiple of the patch size,
            smaller than ``tile``.
        output: ``"map"``: a float32 Cloud-Optimised GeoTIFF (DEFLATE, 128 x 128 tiles, all
            features of a token together), one band per feature dimension and one pixel per token
            (``patch_size`` sensor pixels), same CRS, transform = the scene's transform at the
            sensor's GSD scaled by the patch size, NaN as nodata. ``"cls"``: GeoParquet, one row
            per tile: ``tile`` index, ``row``/``col`` in the tiling, ``valid``,
            ``nodata_fraction``, ``window`` (row, col, height, width in input pixels),
            ``embedding`` (the CLS vector, a float32 list) and ``geometry`` (the footprint
            polygon in the scene's CRS); the file's ``xstars`` metadata records the model, its
            revision, the sensor and the tiling.
        batch_size: tiles per forward pass.
        device: where to compute (the model is moved there); default: where the model is.
        resample: read windows resampled to the sensor's GSD when the scene's pixel size differs
            from it by more than 1 %.
        max_nodata: largest fraction (0-1) of missing pixels a tile may have and still be embedded.
        progress: show a tqdm progress bar counting tiles.
        resume: continue a partial run of the same settings into ``out``; ``False`` starts over.
        transform: for an array source, the affine transform of its pixels (CRS units).
        crs: for an array source, its CRS (anything ``rasterio.crs.CRS.from_user_input`` takes).
        bounds: embed only this area of interest, (left, bottom, right, top) in the scene's CRS
            units; every input pixel it touches is included.
        window: embed only this area of interest, (row, col, height, width) in input pixels or a
            ``rasterio.windows.Window``. Outputs are georeferenced to the area, not the scene.
        overviews: add average-resampled overviews to the ``map`` COG.
        precision: ``"auto"`` (bf16 autocast on CUDA and on CPUs with bf16 matrix units, fp32
            elsewhere), ``"fp32"``, ``"bf16"`` or ``"int8"`` (CPU: the trunk's Linear layers
            quantised); see :mod:`xstars_models.precision`. The map is float32 either way.
        compile: ``torch.compile`` the encoder first (pays off on long GPU runs).
        whiten: with ``output="cls"``, write the vectors whitened by the model's fitted
            whitening (``XStars.embed(..., whiten=True)``), to compare tiles across sensors.

    Returns:
        A :class:`SceneResult` describing the files written.

    Raises:
        ImportError: rasterio (the ``geo`` extra) is missing.
        ValueError: bands, data type or GSD that do not fit the sensor; a bad tile or overlap; a
            partial run with other settings (with ``resume=True``).
    """
    started = time.perf_counter()
    rasterio = import_rasterio()
    if output not in SCENE_OUTPUTS:
        raise ValueError(f"output must be one of {SCENE_OUTPUTS}, got {output!r}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    if not 0.0 <= max_nodata <= 1.0:
        raise ValueError(f"max_nodata is a fraction of a tile's pixels (0-1), got {max_nodata}.")
    stem = model.check_sensor(sensor)
    if whiten:
        model.check_whiten(output, sensor=sensor)
    if device is not None:
        model.to(device)
    target = model.trunk.cls_token.device
    resolved = resolve_precision(precision, target)
    logger.info("embed_scene %s: precision %s", sensor, resolved)
    out_path = _output_path(out, source, sensor, output)
    if isinstance(source, (str, os.PathLike)) and not is_remote(source):
        refuse_input_as_output(out_path, [source])
    out_path.parent.mkdir(parents=True, exist_ok=True)

    with contextlib.ExitStack() as stack:
        stack.enter_context(rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_BYTES))
        scene = open_scene(source, stem.spec, sensor, resample, transform, crs, stack, bounds, window)
        tile_px = default_tile(model, sensor) if tile is None else tile
        plan = Plan.build(scene, stem.patch_size, tile_px, overlap, sensor)
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
            "precision": resolved.name,
            "whiten": whiten,
            "model": _model_fingerprint(model),
        }
        partial = Partial(out_path)
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
        if getattr(model, "revision", None):
            tags["xstars_revision"] = str(model.revision)
        if scene.scale is not None:
            tags["xstars_resample_scale"] = f"{scene.scale[0]:.6g} {scene.scale[1]:.6g}"
        if output == "map":
            prefix = model.trunk.num_prefix_tokens
            writer: MapWriter | ClsWriter = MapWriter(
                plan, scene, model.embed_dim, prefix, target, partial, tags, overviews
            )
        else:
            meta = {
                **{key.removeprefix("xstars_"): value for key, value in tags.items()},
                "revision": getattr(model, "revision", None),
                "crs": crs_wkt,
                "transform": list(tuple(scene.transform)[:6]),
                "whitened": whiten,
            }
            vectors = (lambda cls: model.whitening.apply(cls, "cls", sensor)) if whiten else None
            writer = ClsWriter(plan, scene, model.embed_dim, partial, meta, vectors)
        writer.start(record)
        done = 0 if record is None else record["strips_done"]
        counts = {"skipped": 0 if record is None else record["skipped"]}
        encoder = model.int8_copy() if resolved.name == "int8" else model
        embedded = _run_strips(encoder, sensor, scene, plan, writer, partial, settings, counts, done, target,
                               batch_size, max_nodata, resolved.autocast, compile, progress)
        path = writer.finish(out_path)
        partial.discard()

    shape = (model.embed_dim, *plan.grid) if output == "map" else (plan.tiles, model.embed_dim)
    return SceneResult(
        path=path,
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
        precision=str(resolved),
    )


def _run_strips(
    model: XStarsBase,
    sensor: str,
    scene: Scene,
    plan: Plan,
    writer: MapWriter | ClsWriter,
    partial: Partial,
    settings: dict[str, Any],
    counts: dict[str, int],
    done: int,
    target: torch.device,
    batch_size: int,
    max_nodata: float,
    autocast: Callable[[], contextlib.AbstractContextManager],
    compile: bool,
    progress: bool,
) -> int:
    """Embed tile-rows ``done``.. and commit each; returns the number of tiles embedded."""
    p, (th, tw) = plan.patch, plan.tile
    cuda = target.type == "cuda"

    def read(i: int) -> tuple[torch.Tensor, np.ndarray]:
        strip, missing = scene.read(plan.rows[i] * p, th * p, plan.grid[1] * p)
        fraction = missing.reshape(th, p, plan.grid[1], p).mean(axis=(1, 3), dtype=np.float32)
        if strip.dtype == np.uint16:
            strip = strip.astype(np.int32)  # torch has only partial uint16 support
        pixels = torch.from_numpy(strip)
        # Page-locked memory lets the copy to the GPU overlap with compute.
        return (pixels.pin_memory() if cuda else pixels), fraction

    def encode(x: torch.Tensor) -> torch.Tensor:
        with autocast():
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
