"""``xstars embed`` (image files to arrays) and ``xstars embed-scene`` (a whole scene: GeoTIFF,
COG URL or STAC Item, to a feature-map COG or per-tile vectors in GeoParquet)."""

from __future__ import annotations

import argparse
import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import InvalidInputError, InvalidOptionError
from ..io import read_raster
from ..io.rasters import check_fits_in_memory
from ..model import OUTPUTS
from ..scenes import SCENE_OUTPUTS, SceneOptions
from .flags import HelpFormatter, add_device_flag, chosen_device

SCENE_EPILOG = """\
The scene is read window by window (memory does not grow with its size); its GSD (metres, from the
file's transform) is checked against the sensor's: within 1% it is used as is, within 10% with a
warning, beyond that an error unless --resample. An interrupted run resumes where it stopped; an
existing output is replaced only with --overwrite, and one that is an input never; while a run
writes, OUT.lock beside the output refuses a second run on it.
A COG URL is read with HTTP range requests; a STAC Item's assets are picked by the sensor's band
names; --bounds or --window limits the run to an area of interest.

examples:
  xstars embed-scene xstars-s2-aerial --sensor sentinel2_rgb scene.tif --out scene.map.tif --overlap 16
  xstars embed-scene xstars-s2-aerial --sensor sentinel2_rgb https://example.com/item.json \\
      --output cls --out tiles.parquet --bounds 437730 4174000 440000 4176460
"""


def register(sub: Any) -> None:
    p = sub.add_parser("embed", help="embed image files (GeoTIFF, PNG, JPEG, .npy) into .npy/.npz",
                       formatter_class=HelpFormatter)
    p.add_argument("model", help="registry id, Hub repo (org/name[@rev]) or folder")
    p.add_argument("files", nargs="+", help="images of the sensor: .tif, .jp2, .png, .jpg or .npy")
    p.add_argument("--sensor", required=True, help="the model's sensor name for these images")
    p.add_argument("--out", required=True, help="output .npz (one array per file) or .npy (one file)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists (otherwise refused)")
    p.add_argument("--output", default="cls", choices=OUTPUTS,
                   help="cls or mean (one vector per image), patch (one per token) or map (D x h x w)")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    p.add_argument(
        "--whiten", action="store_true",
        help="whiten the cls / mean output with the model's fitted whitening, to compare footprints across sensors",
    )
    add_device_flag(p)
    _add_precision_flag(p)
    p.add_argument("--offline", action="store_true", help="use only the local cache")
    p.set_defaults(func=_embed)

    p = sub.add_parser(
        "embed-scene",
        help="embed a whole scene (GeoTIFF, COG URL or STAC Item) tile by tile into a feature-map COG (.tif) "
             "or per-tile vectors (GeoParquet)",
        epilog=SCENE_EPILOG,
        formatter_class=HelpFormatter,
    )
    p.add_argument("model", help="registry id, Hub repo (org/name[@rev]) or folder")
    p.add_argument("source", help="GeoTIFF of the scene (bands in the sensor's order), http(s):// URL of a COG, "
                                  "or STAC Item JSON (path or URL)")
    p.add_argument("--sensor", required=True, help="the model's sensor name for this imagery")
    p.add_argument("--out", help="output .tif (map) or .parquet (cls) (default: beside a local source)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the output if it exists (otherwise refused; an interrupted run still resumes)")
    area = p.add_mutually_exclusive_group()
    area.add_argument("--bounds", type=float, nargs=4, metavar=("LEFT", "BOTTOM", "RIGHT", "TOP"),
                      help="embed only this area, in the scene's CRS units (or --bounds-crs)")
    area.add_argument("--window", type=int, nargs=4, metavar=("ROW", "COL", "HEIGHT", "WIDTH"),
                      help="embed only this area, in input pixels: row and column offsets first (the reverse of "
                           "rasterio's Window(col_off, row_off, width, height))")
    p.add_argument("--bounds-crs", metavar="CRS",
                   help="the CRS of --bounds, e.g. EPSG:4326 for longitude/latitude (default: the scene's)")
    p.add_argument("--overviews", action="store_true", help="add overviews to the map COG")
    p.add_argument("--output", default="map", choices=SCENE_OUTPUTS,
                   help="map: a feature-map COG, one band per feature; cls: one vector per tile, GeoParquet")
    p.add_argument("--whiten", action="store_true",
                   help="with --output cls: whiten the tile vectors with the model's fitted whitening "
                        "(to compare across sensors)")
    p.add_argument("--tile", type=int, help="tile side in pixels at the sensor's GSD (multiple of the patch size; "
                                            "default: the model's pretraining grid)")
    p.add_argument("--overlap", type=int, default=0,
                   help="tile overlap in pixels at the sensor's GSD (multiple of the patch size); the last tile "
                        "of each row and column is shifted inward to end at the edge, overlapping more")
    p.add_argument("--batch-size", type=int, default=16, help="tiles per forward pass")
    add_device_flag(p)
    p.add_argument("--resample", action="store_true", help="resample windows to the sensor's GSD")
    p.add_argument("--max-nodata", type=float, default=0.5, help="skip tiles with a larger nodata fraction (0-1)")
    p.add_argument("--restart", action="store_true", help="discard a partial run instead of resuming it")
    _add_precision_flag(p)
    p.add_argument("--compile", action="store_true", help="torch.compile the encoder")
    p.add_argument("--no-progress", action="store_true", help="show no progress bar")
    p.add_argument("--offline", action="store_true", help="use only the local cache")
    p.set_defaults(func=_embed_scene, setting_flags={("resume", False): "--restart", ("resample", True): "--resample"})


def _add_precision_flag(p: argparse.ArgumentParser) -> None:
    from ..precision import PRECISIONS

    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="auto: bf16 on CUDA; on a CPU, bf16 only where this model measured >= 1.15x "
                        "faster than fp32 (timed once per machine and tile size, a few seconds, cached in "
                        "$XSTARS_CACHE or ~/.cache/xstars_models); the XSTARS_PRECISION environment variable "
                        "forces what auto means. int8: int8 Linear layers (CPU). Outputs are float32 either way; "
                        "the precision used and why is printed.")


def read_image(path: Path) -> np.ndarray:
    """An image file as an array: C x H x W for GeoTIFF/JP2, H x W x C for PNG/JPEG, as stored
    for .npy (4-D: a batch of images)."""
    suffix = path.suffix.lower()
    if suffix not in (".npy", ".tif", ".tiff", ".jp2", ".png", ".jpg", ".jpeg"):
        raise InvalidInputError(f"{path}: unsupported file type {suffix!r}; use .tif, .png, .jpg or .npy", field="files")
    # Each reader refuses, before reading, an image that with its float32 copy (what embed
    # computes on) would not fit in memory.
    too_large = "Embed it tile by tile with `xstars embed-scene`, which reads it window by window in bounded memory."
    if suffix in (".tif", ".tiff", ".jp2"):
        return read_raster(path, purpose=f"{path}: reading GeoTIFF/JP2", extra_bytes_per_value=4, field="files",
                           too_large=too_large)
    from PIL import Image

    try:
        if suffix == ".npy":
            shape, dtype = _npy_header(path)
            check_fits_in_memory(shape, dtype, str(path), 4, too_large, field="files")
            return np.load(path)
        with Image.open(path) as image:  # reads the header only
            shape = (image.height, image.width, len(image.getbands()))
            dtype = np.dtype({"I;16": "uint16", "I": "int32", "F": "float32"}.get(image.mode, "uint8"))
            check_fits_in_memory(shape, dtype, str(path), 4, too_large, field="files")
            return np.asarray(image)
    except Image.DecompressionBombError as err:
        raise InvalidInputError(f"{path}: refused by Pillow as a possible decompression bomb ({err}). {too_large}",
                                field="files") from None
    except FileNotFoundError:
        raise
    except (OSError, ValueError, EOFError) as err:
        # Readers report a truncated or damaged file without naming it ("Read failed.").
        raise OSError(f"{path}: cannot read it ({type(err).__name__}: {err}); is the file truncated or damaged?") from err


def _npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype]:
    """The shape and dtype a ``.npy`` file declares, read from its header alone (a memory map
    would fail on a file shorter than it declares, before saying how large it claims to be)."""
    with open(path, "rb") as fh:
        major, _ = np.lib.format.read_magic(fh)
        read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(fh)
    return shape, dtype


def result_keys(files: Sequence[Path]) -> list[str]:
    """The name of each file's array in the ``.npz``: its stem, or, for files whose stems repeat,
    the path relative to their common folder (without the suffix if that is enough to tell them
    apart). The same file given twice is an error."""
    resolved = [f.resolve() for f in files]
    seen: dict[Path, Path] = {}
    for file, real in zip(files, resolved):
        if real in seen:
            raise InvalidInputError(f"{file} and {seen[real]} are the same file; give each input once.", field="files")
        seen[real] = file
    keys = [f.stem for f in files]
    clashing = [i for i, key in enumerate(keys) if keys.count(key) > 1]
    if clashing:
        common = Path(os.path.commonpath([resolved[i].parent for i in clashing]))
        relative = {i: resolved[i].relative_to(common) for i in clashing}
        bare = {i: rel.with_suffix("").as_posix() for i, rel in relative.items()}
        whole = len(set(bare.values())) < len(bare)
        for i in clashing:
            keys[i] = relative[i].as_posix() if whole else bare[i]
    if len(set(keys)) < len(keys):
        raise InvalidInputError(
            f"input files {[str(f) for f in files]} give repeated array names {keys}; rename them.", field="files"
        )
    return keys


def _embed(args: argparse.Namespace) -> int:
    from ..io.lock import output_lock
    from ..io.outputs import refuse_existing_output, refuse_input_as_output

    out = Path(args.out)
    files = [Path(f) for f in args.files]
    if out.suffix not in (".npy", ".npz"):
        raise InvalidOptionError("{out}: use a .npy or .npz file name", field="out", settings={"out": str(out)})
    if out.suffix == ".npy" and len(files) != 1:
        raise InvalidOptionError(
            f"{{out}}: .npy holds one array; use .npz for {len(files)} files", field="out", settings={"out": str(out)}
        )
    refuse_input_as_output(out, files)
    keys = result_keys(files)
    device = chosen_device(args)  # before the model is loaded
    with output_lock(out):
        refuse_existing_output(out, args.overwrite)
        _embed_files(args, out, files, keys, device)
    print(f"wrote {out}")
    return 0


def _embed_files(
    args: argparse.Namespace, out: Path, files: list[Path], keys: list[str], device: torch.device
) -> None:
    """Embed ``files`` on ``device`` and write their arrays (named ``keys``) to ``out``."""
    from tqdm.auto import tqdm

    from ..inputs import to_batch
    from ..serialization import atomic_write_bytes
    from ..xstars import XStars

    model = XStars.from_pretrained(args.model, local_files_only=args.offline, map_location=device)
    stem = model.check_sensor(args.sensor)
    results = {}
    precision = None
    for file, key in tqdm(list(zip(files, keys)), desc="embed", unit="file", disable=len(files) < 2):
        image = read_image(file)
        if precision is None:
            # Resolved once, on the first file's size (what "auto" times), and then used for every
            # file: the line printed is what runs.
            height, width = to_batch(image, stem.spec, stem.patch_size).shape[-2:]
            tokens = max(1, (height // stem.patch_size) * (width // stem.patch_size))
            resolved = model.resolve_precision(args.precision, tokens=tokens, batch_size=args.batch_size)
            print(f"precision: {resolved}")
            precision = resolved.name
        emb = model.embed(image, sensor=args.sensor, output=args.output, batch_size=args.batch_size, progress=False,
                          precision=precision, whiten=args.whiten)
        # A 4-D array is a batch: all of its images are kept (first axis); one image has no batch axis.
        results[key] = (emb if image.ndim == 4 else emb[0]).numpy()
        batch = f", {len(emb)} images" if image.ndim == 4 else ""
        print(f"{file}: {args.output} {tuple(results[key].shape)}{batch}" + (f" -> {key!r}" if key != file.stem else ""))
    buffer = io.BytesIO()
    if out.suffix == ".npy":
        np.save(buffer, next(iter(results.values())))
    else:
        # numpy's stub takes any ** keyword for its allow_pickle flag; these are arrays by name.
        np.savez(buffer, **results)  # type: ignore[arg-type]
    atomic_write_bytes(out, buffer.getvalue())


def _embed_scene(args: argparse.Namespace) -> int:
    from ..io.outputs import refuse_input_as_output
    from ..xstars import XStars

    # Before the model is loaded. embed_scene checks it again with a STAC Item's assets, and then,
    # under the output's lock, refuses an existing output without --overwrite.
    if args.out is not None and Path(args.source).exists():
        refuse_input_as_output(args.out, [args.source])
    # Checked before the model is loaded: a bad option fails at once.
    options = SceneOptions(
        tile=args.tile, overlap=args.overlap, output=args.output, batch_size=args.batch_size, device=chosen_device(args),
        resample=args.resample, max_nodata=args.max_nodata, progress=not args.no_progress, resume=not args.restart,
        bounds=args.bounds, bounds_crs=args.bounds_crs, window=args.window, overviews=args.overviews,
        precision=args.precision, compile=args.compile, whiten=args.whiten, overwrite=args.overwrite,
    )
    model = XStars.from_pretrained(args.model, local_files_only=args.offline)
    result = model.embed_scene(args.source, args.sensor, args.out, options=options)
    print(
        f"{args.source}: {result.tiles} tiles ({result.embedded} embedded now, {result.resumed} "
        f"resumed, {result.skipped} skipped for nodata) in {result.seconds:.1f} s -> {result.path}"
        + f"\nprecision: {result.precision}"
    )
    return 0
