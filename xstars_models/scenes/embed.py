"""The entry point: :func:`embed_scene` checks that the output destroys nothing (no input, no earlier
result) and locks it, opens the scene, plans its tiles, resumes or starts the output and runs the
strips of tiles through the model (:mod:`.strips`) into a writer."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors.torch import save as save_safetensors_bytes

from ..config import WEIGHTS_NAME, stem_file_name
from ..errors import InvalidOptionError
from ..io import GDAL_CACHE_BYTES, import_rasterio
from ..io.lock import output_lock
from ..io.outputs import refuse_existing_output, refuse_input_as_output, refuse_served_output
from ..precision import inference_copy
from ..serialization import sha256_bytes
from .options import SceneOptions
from .reading import Scene
from .sources import is_remote, open_scene, scene_inputs
from .strips import run_strips
from .tiling import Plan, run_setup
from .writers import ClsWriter, MapWriter, Partial, Progress, SceneWriter

if TYPE_CHECKING:
    from affine import Affine

    from ..model import XStarsBase

__all__ = ["SceneResult", "embed_scene"]

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


def _weights_sha256(model: XStarsBase, sensor: str) -> dict[str, str]:
    """The sha256 of the weight files that embedding ``sensor`` uses, as
    :meth:`~xstars_models.model.XStarsBase.save_pretrained` writes them (the values its
    ``config.json`` records): ``xstars_model_sha256`` for ``model.safetensors`` (LoRA updates
    merged), and ``xstars_stem_sha256`` for ``stem-<sensor>.safetensors`` when ``sensor`` is not
    the primary one. Hashed from the weights in memory, so a model changed after loading (or never
    saved) is named by what it computes with."""
    files = {"xstars_model_sha256": WEIGHTS_NAME}
    if sensor != model.primary_sensor:
        files["xstars_stem_sha256"] = stem_file_name(sensor)
    tensors = model.weight_tensors()
    hashes = {}
    for tag, name in files.items():
        cpu = {key: value.detach().to("cpu").contiguous() for key, value in tensors[name].items()}
        # Byte for byte what serialization.write_safetensors writes (metadata {"format": "pt"} only).
        hashes[tag] = sha256_bytes(save_safetensors_bytes(cpu, metadata={"format": "pt"}))
    return hashes


def _output_path(out: str | os.PathLike | None, source: Any, sensor: str, output: str) -> Path:
    suffixes = {"map": (".tif", ".tiff"), "cls": (".parquet", ".geoparquet")}[output]
    if out is None:
        if isinstance(source, np.ndarray):
            raise InvalidOptionError("out= is required when the scene is an array.", field="out")
        if is_remote(source):
            raise InvalidOptionError("out= is required when the scene is a URL or a STAC Item.", field="out")
        path = Path(source)
        return path.with_name(f"{path.stem}.{sensor}.{output}{suffixes[0]}")
    out = Path(out)
    if out.suffix.lower() not in suffixes:
        raise InvalidOptionError(
            f"{{out}}: {{output}} writes a {' or '.join(suffixes)} file.",
            field="out",
            settings={"out": str(out), "output": output},
        )
    return out


def embed_scene(
    model: XStarsBase,
    source: str | os.PathLike | np.ndarray | Any,
    sensor: str,
    out: str | os.PathLike | None = None,
    *positional: Any,
    options: SceneOptions | None = None,
    **kwargs: Any,
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
            required for arrays, URLs and STAC Items. Refused, before any work, when it is a
            local file the run reads (the scene; a STAC Item's JSON or the file of an asset it
            reads, by path, relative href or ``file://``), and when it exists, has the file name
            of an ``http(s)://`` input and the size the server reports for it (the only check a
            URL allows: a server does not say which file it serves). An existing ``out`` is
            replaced only with ``overwrite=True``; the partial files of an interrupted run are
            not ``out`` and are resumed. While the run writes, ``<out>.lock`` holds off other
            writers (:mod:`xstars_models.io.lock`).
        options: a :class:`SceneOptions` (tile and overlap in pixels at the sensor's GSD, output
            ``"map"`` or ``"cls"``, batch size, device, nodata, resampling, precision...; see
            there); default: all its defaults.
        **kwargs: :class:`SceneOptions` fields by name (``tile=256, overlap=32``); they replace
            those of ``options``.
        *positional: for calls written before :class:`SceneOptions`, its fields ``tile, overlap,
            output, batch_size, device, resample, max_nodata, progress, resume`` in that order.

    Returns:
        A :class:`SceneResult` describing the files written.

    Raises:
        ImportError: rasterio (the ``geo`` extra) is missing.
        InvalidOptionError: a bad option (``field``: its name): a tile or overlap that is not a
            whole number of patches, a partial run with other settings (``resume=True``), an
            ``out`` that is an input or that exists without ``overwrite=True`` (``field="out"``)...
        UnknownOptionError: a keyword that is not a :class:`SceneOptions` field.
        InvalidInputError: bands, data type or GSD that do not fit the sensor (``field="source"``).
        OutputLockedError: (``field="out"``) another run is writing ``out``; names its process.
    """
    started = time.perf_counter()
    options = SceneOptions.from_call(options, positional, kwargs)
    rasterio = import_rasterio()
    stem = model.check_sensor(sensor)
    if options.whiten:
        model.check_whiten(options.output, sensor=sensor)
    out_path = _output_path(out, source, sensor, options.output)
    # Before any work: every file the run will read (a STAC Item's JSON and picked assets too),
    # and what can be told of the URLs it reads, must not be the output.
    inputs = scene_inputs(source, stem.spec)
    refuse_input_as_output(out_path, inputs.files)
    refuse_served_output(out_path, inputs.urls)

    # One writer at a time, from the first file touched (the partial run) to the final rename.
    with output_lock(out_path, field="out"), contextlib.ExitStack() as stack:
        # Under the lock: a run that finished a moment ago has its output in place by now.
        refuse_existing_output(out_path, options.overwrite)
        # The options as they run: the tile for this sensor, the precision for this device.
        target, tile_px, resolved = run_setup(model, sensor, options)
        logger.info("embed_scene %s: precision %s", sensor, resolved)
        stack.enter_context(rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_BYTES))
        scene = open_scene(inputs.source, stem.spec, sensor, options, stack)
        options = dataclasses.replace(options, tile=tile_px, precision=resolved.name)
        plan = Plan.build(scene, stem.patch_size, tile_px, options.overlap, sensor)
        partial = Partial(out_path, {
            "source": scene.fingerprint,
            "sensor": sensor,
            "patch_px": stem.patch_size,
            **options.settings(),
            "resample_scale": list(scene.scale) if scene.scale else None,
            "nodata": None if scene.nodata is None else repr(float(scene.nodata)),
            "model": _model_fingerprint(model),
        })
        record = partial.load(options.resume)
        writer = _writer(model, sensor, source, scene, plan, partial, options, target)
        writer.start(record)
        progress = Progress.resumed(record)
        resumed = progress.strips_done * len(plan.col_starts)
        encoder = inference_copy(model, resolved.name)
        run_strips(encoder, scene, plan, writer, partial, progress, sensor=sensor, options=options, device=target,
                   autocast=resolved.autocast)
        path = writer.finish(out_path)
        partial.discard()

    dim = model.embed_dim
    return SceneResult(
        path=path,
        output=options.output,
        shape=(dim, *plan.grid_tokens) if options.output == "map" else (plan.tiles, dim),
        tiles=plan.tiles,
        embedded=progress.embedded,
        skipped=progress.skipped,
        resumed=resumed,
        transform=writer.transform,
        crs=_crs_wkt(scene),
        resample_scale=scene.scale,
        seconds=time.perf_counter() - started,
        precision=str(resolved),
    )


def _crs_wkt(scene: Scene) -> str | None:
    return scene.crs.to_wkt() if scene.crs is not None else None


def output_tags(*, sensor: str, model: str, revision: str | None, weights: dict[str, str], patch_px: int,
                tile_px: int, overlap_px: int, precision: str,
                resample_scale: tuple[float, float] | None) -> dict[str, str]:
    """The tags a scene's outputs carry (a map's GDAL tags; without the ``xstars_`` prefix, the
    GeoParquet's ``xstars`` metadata), whether ``embed_scene`` or a collection run wrote them:
    sensor, model id and ``revision``, the ``weights`` tags (``xstars_model_sha256`` and, for a
    sensor other than the primary one, ``xstars_stem_sha256``), the tiling in pixels at the
    sensor's GSD, the ``precision`` that ran and the ``resample_scale`` of resampled reads."""
    tags = {
        "xstars_sensor": sensor,
        "xstars_model": model,
        "xstars_patch_px": str(patch_px),
        "xstars_tile_px": str(tile_px),
        "xstars_overlap_px": str(overlap_px),
        "xstars_precision": precision,
        **weights,
    }
    if revision:
        tags["xstars_revision"] = str(revision)
    if resample_scale is not None:
        tags["xstars_resample_scale"] = f"{resample_scale[0]:.6g} {resample_scale[1]:.6g}"
    return tags


def _writer(
    model: XStarsBase, sensor: str, source: Any, scene: Scene, plan: Plan, partial: Partial, options: SceneOptions,
    device: torch.device,
) -> SceneWriter:
    """The writer of ``options.output``, with the metadata that the output records (model id,
    revision and weights sha256, sensor, tiling in pixels at the sensor's GSD: the COG's tags, or
    the same without the ``xstars_`` prefix in the GeoParquet's ``xstars`` metadata)."""
    assert options.tile is not None  # embed_scene replaced it with the tile that runs
    tags = output_tags(
        sensor=sensor, model=str(getattr(model, "name_or_path", None) or model.arch),
        revision=getattr(model, "revision", None), weights=_weights_sha256(model, sensor), patch_px=plan.patch_px,
        tile_px=options.tile, overlap_px=options.overlap,
        precision=options.precision,  # what ran; SceneResult.precision says why
        resample_scale=scene.scale,
    )
    tags["xstars_source"] = Path(scene.what).name if not isinstance(source, np.ndarray) else scene.what
    if options.output == "map":
        prefix = model.trunk.num_prefix_tokens
        return MapWriter(plan, scene, model.embed_dim, prefix, device, partial, tags, options.overviews)
    meta = {
        **{key.removeprefix("xstars_"): value for key, value in tags.items()},
        "revision": getattr(model, "revision", None),
        "crs": _crs_wkt(scene),
        "transform": list(tuple(scene.transform)[:6]),
        "whitened": options.whiten,
    }
    # A model without a whitening was refused (check_whiten) if whiten=True.
    whitening = model.whitening if options.whiten else None
    vectors = None if whitening is None else (lambda cls: whitening.apply(cls, "cls", sensor))
    return ClsWriter(plan, scene, model.embed_dim, partial, meta, vectors)
