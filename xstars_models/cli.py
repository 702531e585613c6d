"""The ``xstars`` command: a thin layer over the public API that turns errors into one-line
messages and a non-zero exit code."""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

EPILOG = """\
units: GSD in metres, wavelengths in micrometres; imagery is read as the sensor's digital numbers
(uint8 for the *_rgb sensors, uint16 reflectance x 1e4 for sentinel2).

examples:
  xstars list
  xstars info xstars-s2-aerial
  xstars download xstars-s2-aerial --to ./weights
  xstars verify ./weights
  xstars embed xstars-s2-aerial --sensor sentinel2_rgb scene1.tif scene2.png --out emb.npz --output map
"""


def _cmd_list(args: argparse.Namespace) -> int:
    from .manifest import get_model_entry, list_models

    models = list_models(sensor=args.sensor)
    if not models:
        print("no registered models" + (f" with sensor {args.sensor!r}" if args.sensor else ""))
    for model_id, sensors in models.items():
        entry = get_model_entry(model_id)
        where = "bundled" if entry.bundled else f"{entry.repo_id}@{entry.revision[:8]}"
        print(f"{model_id:28s} {entry.arch:28s} {', '.join(sensors):40s} {where}")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from .model import XStars

    model = XStars.from_pretrained(args.model, local_files_only=args.offline)
    print(f"model: {args.model}  arch: {model.arch} {model.arch_kwargs}  revision: {model.revision}")
    print(f"embedding dim: {model.embed_dim}  depth: {model.depth}")
    for name, stem in model.sensors.items():
        spec = stem.spec
        bands = ", ".join(f"{b.name} {b.center_um:.3f} um" for b in spec.bands)
        print(
            f"  sensor {name}: {spec.gsd_m:g} m GSD, patch {stem.patch_size} px "
            f"({stem.token_ground_m:g} m per token), {spec.dtype} x {spec.scale:g}, bands: {bands}"
        )
    if model.lineage:
        print(f"lineage: {json.dumps(model.lineage)}")
    if model.metrics:
        print(f"metrics: {json.dumps(model.metrics)}")
    return 0


def _cmd_download(args: argparse.Namespace) -> int:
    from .model import XStars

    model = XStars.from_pretrained(args.model)
    print(f"{args.model}: downloaded and verified (revision {model.revision})")
    if args.to:
        model.save_pretrained(args.to)
        print(f"saved to {args.to}")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from .hub import resolve_model
    from .serialization import read_verified

    resolved = resolve_model(args.model, local_files_only=True)
    for name, path in resolved.paths.items():
        read_verified(path, resolved.records[name], name)
        print(f"ok  {name}  sha256 {resolved.records[name].sha256}")
    return 0


def _read_image(path: Path) -> np.ndarray:
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return np.load(path)
    if suffix in (".tif", ".tiff", ".jp2"):
        try:
            import rasterio
        except ImportError:
            raise ValueError(f"{path}: reading GeoTIFF needs rasterio: pip install 'xstars-models[geo]'") from None
        with rasterio.open(path) as src:
            return src.read()  # C x H x W
    if suffix in (".png", ".jpg", ".jpeg"):
        from PIL import Image

        with Image.open(path) as image:
            return np.asarray(image)
    raise ValueError(f"{path}: unsupported file type {suffix!r}; use .tif, .png, .jpg or .npy")


def _cmd_embed(args: argparse.Namespace) -> int:
    from .model import XStars
    from .serialization import atomic_write_bytes

    model = XStars.from_pretrained(args.model, local_files_only=args.offline)
    from tqdm.auto import tqdm

    results = {}
    for file in tqdm(args.files, desc="embed", unit="file", disable=len(args.files) < 2):
        image = _read_image(Path(file))
        emb = model.embed(image, sensor=args.sensor, output=args.output, batch_size=args.batch_size, progress=False)
        results[Path(file).stem] = emb[0].numpy()
        print(f"{file}: {args.output} {tuple(emb.shape[1:])}")
    out = Path(args.out)
    buffer = io.BytesIO()
    if out.suffix == ".npy":
        if len(results) != 1:
            raise ValueError(f"--out {out}: .npy holds one array; use .npz for {len(results)} files")
        np.save(buffer, next(iter(results.values())))
    elif out.suffix == ".npz":
        np.savez(buffer, **results)
    else:
        raise ValueError(f"--out {out}: use a .npy or .npz file name")
    atomic_write_bytes(out, buffer.getvalue())
    print(f"wrote {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xstars",
        description="Pretrained X-STARS cross-sensor remote-sensing encoders.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("list", help="registered models and their sensors")
    p.add_argument("--sensor", help="only models with a stem for this sensor")
    p.set_defaults(func=_cmd_list)
    p = sub.add_parser("info", help="architecture, sensors (bands, wavelengths, GSD), lineage, metrics")
    p.add_argument("model", help="registry id, Hub repo (org/name[@rev]) or folder")
    p.add_argument("--offline", action="store_true", help="use only the local cache")
    p.set_defaults(func=_cmd_info)
    p = sub.add_parser("download", help="download and verify a model into the Hub cache")
    p.add_argument("model")
    p.add_argument("--to", help="also save a copy into this folder")
    p.set_defaults(func=_cmd_download)
    p = sub.add_parser("verify", help="check every file's sha256 against the manifest or config (offline)")
    p.add_argument("model", help="registry id, Hub repo or folder")
    p.set_defaults(func=_cmd_verify)
    p = sub.add_parser("embed", help="embed image files (GeoTIFF, PNG, JPEG, .npy) into .npy/.npz")
    p.add_argument("model")
    p.add_argument("files", nargs="+")
    p.add_argument("--sensor", required=True, help="the model's sensor name for these images")
    p.add_argument("--out", required=True, help="output .npz (one array per file) or .npy (one file)")
    p.add_argument("--output", default="cls", choices=("cls", "mean", "patch", "map"))
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--offline", action="store_true")
    p.set_defaults(func=_cmd_embed)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError, RuntimeError, KeyError) as err:
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(f"xstars {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
