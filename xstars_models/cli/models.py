"""``xstars list | info | download | verify``: what is registered, what a model holds, getting
it into the cache, and checking its files."""

from __future__ import annotations

import argparse
import json
from typing import Any

from .flags import HelpFormatter


def register(sub: Any) -> None:
    p = sub.add_parser("list", help="registered models and their sensors", formatter_class=HelpFormatter)
    p.add_argument("--sensor", help="only models with a stem for this sensor")
    p.set_defaults(func=_list)
    p = sub.add_parser("info", help="architecture, sensors (bands, wavelengths, GSD), lineage, metrics",
                       formatter_class=HelpFormatter)
    p.add_argument("model", help="registry id, Hub repo (org/name[@rev]) or folder")
    p.add_argument("--offline", action="store_true", help="use only the local cache")
    p.add_argument("--json", action="store_true", help="print everything as one JSON object instead")
    p.set_defaults(func=_info)
    p = sub.add_parser("download", help="download and verify a model into the Hub cache", formatter_class=HelpFormatter)
    p.add_argument("model", help="registry id or Hub repo (org/name[@rev])")
    p.add_argument("--to", help="also save a copy into this folder")
    p.add_argument("--force-download", action="store_true",
                   help="download every file again, replacing the cached copies (repairs a corrupted cache)")
    p.set_defaults(func=_download)
    p = sub.add_parser("verify", help="check every file's sha256 against the manifest or config (offline)",
                       formatter_class=HelpFormatter)
    p.add_argument("model", help="registry id, Hub repo or folder")
    p.set_defaults(func=_verify)


def _list(args: argparse.Namespace) -> int:
    from ..manifest import get_model_entry, list_models

    models = list_models(sensor=args.sensor)
    if not models:
        print("no registered models" + (f" with sensor {args.sensor!r}" if args.sensor else ""))
    for model_id, sensors in models.items():
        entry = get_model_entry(model_id)
        where = "bundled" if entry.bundled else f"{entry.repo_id}@{(entry.revision or '')[:8]}"
        print(f"{model_id:28s} {entry.arch:28s} {', '.join(sensors):40s} {where}")
    return 0


def _info(args: argparse.Namespace) -> int:
    from ..xstars import XStars
    from .tables import render_metrics

    model = XStars.from_pretrained(args.model, local_files_only=args.offline)
    if args.json:
        info = {
            "model": args.model, "revision": model.revision, "arch": model.arch, "arch_kwargs": model.arch_kwargs,
            "embed_dim": model.embed_dim, "depth": model.depth,
            "sensors": {name: {"patch_size": s.patch_size, "spec": s.spec.to_dict()} for name, s in model.sensors.items()},
            "lineage": model.lineage, "metrics": model.metrics,
            "whitening": model.config.whitening,
        }
        print(json.dumps(info, indent=2))
        return 0
    print(f"model: {args.model}  arch: {model.arch} {model.arch_kwargs}  revision: {model.revision}")
    print(f"embedding dim: {model.embed_dim}  depth: {model.depth}")
    for name, stem in model.sensors.items():
        spec = stem.spec
        bands = ", ".join(f"{b.name} {b.center_um:.3f} um" for b in spec.bands)
        print(
            f"  sensor {name}: {spec.gsd_m:g} m GSD, patch {stem.patch_size} px "
            f"({stem.token_ground_m:g} m per token), {spec.dtype} x {spec.scale:g}, bands: {bands}"
        )
    if model.whitening is not None:
        w = model.whitening
        print(
            f"whitening (embed --whiten): {', '.join(w.pools)} of {', '.join(w.sensors)}, shrinkage {w.shrinkage:g}, "
            f"fit on {w.fit_on or 'unrecorded data'}"
        )
    if model.lineage:
        print(f"lineage: {json.dumps(model.lineage)}")
    if model.metrics:
        print("\n".join(render_metrics(model.metrics)))
    return 0


def _download(args: argparse.Namespace) -> int:
    from ..xstars import XStars

    model = XStars.from_pretrained(args.model, force_download=args.force_download)
    print(f"{args.model}: downloaded and verified (revision {model.revision})")
    if args.to:
        model.save_pretrained(args.to)
        print(f"saved to {args.to}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from ..hub import HubOptions, resolve_model
    from ..serialization import read_verified

    resolved = resolve_model(args.model, HubOptions(local_files_only=True))
    for name, path in resolved.paths.items():
        read_verified(path, resolved.records[name], name, resolved.repair)
        print(f"ok  {name}  sha256 {resolved.records[name].sha256}")
    return 0
