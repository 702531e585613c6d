"""``xstars adapt``: continual pretraining of a model to a new sensor (DINO + MSAD against a
frozen copy), from paired imagery given as co-registered rasters or an MSC-France folder."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..errors import InvalidInputError, InvalidOptionError
from ..io import read_json
from .flags import HelpFormatter, add_device_flag, chosen_device

ADAPT_EPILOG = """\
Pairs come either from co-registered rasters of the two sensors (--new/--old, cut into windows of
--footprint-m metres on the ground, so each pair covers the same footprint whatever the two GSDs;
the last --val-fraction of the area along --split-axis is held out and never trained on) or from an
MSC-France style folder (--msc-root with --new-folder/--old-folder: ROOT/FOLDER/CITY/TILE, same tile
names in both folders).

Training settings: any setting of xstars_models.training.TrainConfig, from --config FILE.json
(nested by group as the run's config.json records them, e.g. {"optim": {"lr": 1e-4}}, with dotted
names, e.g. {"msad.alpha": 1.0}, or with the flat names of the flags, e.g. {"alpha": 1.0}) and/or
the flags below (flags win). Crop sizes are in tokens per side, learning rates per step.

examples:
  xstars adapt xstars-s2-aerial --sensor aerial_rgb --gsd 5 --name aerial5m \\
      --new aerial.tif --old s2.tif --steps 300 --out ./xstars-s2-aerial5m
  xstars adapt xstars-s2-aerial --sensor spot67_rgb --msc-root MSC-France \\
      --new-folder SPOT --old-folder Sentinel --mode lora --config train.json --out ./xstars-s2-spot
"""

def register(sub: Any) -> None:
    p = sub.add_parser(
        "adapt",
        help="continual pretraining to a new sensor (MSAD + DINO against a frozen copy)",
        epilog=ADAPT_EPILOG,
        formatter_class=HelpFormatter,
    )
    p.add_argument("model", help="base model: registry id, Hub repo (org/name[@rev]) or folder")
    p.add_argument(
        "--sensor", required=True, help="the new sensor: a built-in name (xstars info lists bands) or a sensor-spec .json"
    )
    p.add_argument("--gsd", type=float, help="the new sensor's ground sampling distance in metres (overrides the spec's)")
    p.add_argument("--name", help="name of the new stem (default: the spec's name)")
    p.add_argument("--old-sensor", help="the base model's sensor in the pairs (default: its primary sensor)")
    data = p.add_argument_group("pairs from co-registered rasters")
    data.add_argument("--new", nargs="+", metavar="FILE", help="raster(s) of the new sensor (several: mosaicked in order)")
    data.add_argument("--old", nargs="+", metavar="FILE", help="raster(s) of the old sensor, same area and CRS")
    data.add_argument("--new-bands", nargs="+", type=int, help="1-based bands of --new to read, in the sensor's order")
    data.add_argument("--old-bands", nargs="+", type=int, help="1-based bands of --old to read, in the sensor's order")
    data.add_argument(
        "--footprint-m", type=float, help="pair footprint in metres (default: crops.global_tokens tokens of the old sensor)"
    )
    data.add_argument("--stride-m", type=float, help="distance between pair windows in metres (default: the footprint)")
    data.add_argument("--val-fraction", type=float, default=0.2, help="held-out fraction of the area")
    data.add_argument("--split-axis", choices=("x", "y"), default="y", help="axis of the spatial split (x: columns)")
    data.add_argument("--resample", action="store_true",
                      help="accept rasters whose pixel size is more than 10%% off the sensor's GSD (windows resampled)")
    msc = p.add_argument_group("pairs from an MSC-France style folder")
    msc.add_argument("--msc-root", help="ROOT of ROOT/FOLDER/CITY/TILE")
    msc.add_argument("--new-folder", help="the new sensor's folder under ROOT (e.g. SPOT)")
    msc.add_argument("--old-folder", help="the old sensor's folder under ROOT (e.g. Sentinel)")
    msc.add_argument("--cities", nargs="+", help="city folders to use (default: all)")
    run = p.add_argument_group("run")
    run.add_argument("--mode", default="stem", choices=("stem", "lora", "full"),
                     help="what is trained: the new stem, LoRA updates of the trunk too, or everything")
    run.add_argument("--lora-rank", type=int, default=8, help="rank of the LoRA updates (--mode lora)")
    run.add_argument("--config", help="TrainConfig settings as JSON, e.g. {\"steps\": 500, \"msad\": {\"alpha\": 1.0}}")
    run.add_argument("--run-dir", default="runs/adapt", help="checkpoints (last.pt) and metrics.jsonl")
    run.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --run-dir")
    add_device_flag(run)
    run.add_argument("--offline", action="store_true", help="load the base model from the local cache only")
    run.add_argument("--out", required=True, help="save the adapted model into this folder")
    run.add_argument("--adapter", help="also save the small adapter file (stem, LoRA) here")
    _add_train_config_flags(p.add_argument_group("TrainConfig settings (flag: setting)"))
    p.set_defaults(func=_adapt, setting_flags={("resume", True): "--resume"})


def _add_train_config_flags(group: argparse._ArgumentGroup) -> None:
    """One flag per setting, named as the setting was before the settings were grouped
    (``--alpha`` for ``msad.alpha``); its destination is the dotted name, so that an error about a
    setting names its flag."""
    from ..training import TrainConfig
    from ..training.config import FLAT_NAMES

    defaults = TrainConfig.defaults()
    for name, dotted in FLAT_NAMES.items():
        default = defaults[dotted]
        if isinstance(default, tuple):  # ranges like crops.global_scale: set in --config only
            continue
        flag = "--" + name.replace("_", "-")
        about = f"{dotted} (default: {default})" if dotted != name else f"(default: {default})"
        if isinstance(default, bool):
            group.add_argument(flag, dest=dotted, action=argparse.BooleanOptionalAction, default=None, help=about)
        else:
            kind = type(default)
            group.add_argument(flag, dest=dotted, type=kind, default=None, metavar=kind.__name__.upper(), help=about)


def train_config(args: argparse.Namespace) -> Any:
    """The TrainConfig of ``--config`` (if any; its errors name the file) with the flags that were
    given on top (flags win; their errors are named by the flag)."""
    from ..training import TrainConfig
    from ..training.config import FLAT_NAMES

    config = TrainConfig()
    if args.config:
        data = read_json(args.config, error=InvalidInputError, field="config")
        config = TrainConfig.from_dict(data, source=f"--config {args.config}")
    flags = {dotted: getattr(args, dotted) for dotted in FLAT_NAMES.values() if getattr(args, dotted, None) is not None}
    if not flags:
        return config
    # An empty source: the command prefixes the flag of the setting at fault itself.
    return TrainConfig.from_dict({**config.dotted(), **flags}, field_sources={dotted: "" for dotted in flags})




def new_sensor_spec(args: argparse.Namespace) -> Any:
    from ..sensors import SensorSpec, get_sensor

    spec = SensorSpec.from_json(args.sensor) if args.sensor.endswith(".json") else get_sensor(args.sensor)
    if args.gsd is not None or args.name:
        spec = spec.with_gsd(args.gsd if args.gsd is not None else spec.gsd_m, name=args.name)
    return spec


def _pairs(args: argparse.Namespace, base: Any, new: Any, old_sensor: str, config: Any) -> tuple[Any, str]:
    rasters, msc = bool(args.new or args.old), bool(args.msc_root)
    if rasters == msc:
        raise InvalidOptionError(
            "give the pairs either as rasters (--new FILE --old FILE) or as a folder (--msc-root ROOT), not both or neither"
        )
    if msc:
        from ..data import MSCFrancePairs

        if not (args.new_folder and args.old_folder):
            raise InvalidOptionError(
                "--msc-root needs --new-folder and --old-folder (e.g. --new-folder SPOT --old-folder Sentinel)",
                field="old_folder" if args.new_folder else "new_folder",
            )
        pairs = MSCFrancePairs(
            args.msc_root, sensors=(args.old_folder, args.new_folder), cities=args.cities,
            sensor_names={args.old_folder: old_sensor, args.new_folder: new.name},
        )
        return pairs, f"MSC-France layout {args.msc_root}: {args.new_folder} <-> {args.old_folder}, {len(pairs)} pairs"
    if not (args.new and args.old):
        raise InvalidOptionError("raster pairs need both --new FILE... and --old FILE...", field="old" if args.new else "new")
    from ..data import default_footprint_m, raster_pairs

    # Each pair is one global crop of the old sensor.
    footprint = args.footprint_m or default_footprint_m(base, old_sensor, tokens=config.crops.global_tokens)
    inputs = {new.name: (new, args.new, args.new_bands), old_sensor: (base.sensors[old_sensor].spec, args.old, args.old_bands)}
    return raster_pairs(inputs, footprint, args.stride_m, "train", args.val_fraction, args.split_axis, args.resample)


def _adapt(args: argparse.Namespace) -> int:
    from ..xstars import XStars

    config = train_config(args)
    device = chosen_device(args)  # before the model and the imagery are read
    new = new_sensor_spec(args)
    base = XStars.from_pretrained(args.model, local_files_only=args.offline)
    old_sensor = args.old_sensor or base.primary_sensor
    base.check_sensor(old_sensor)
    pairs, description = _pairs(args, base, new, old_sensor, config)
    print(f"adapting {args.model} ({old_sensor}) to {new.name} ({new.gsd_m:g} m): {description}")
    adapted = base.adapt(
        new, pairs, old_sensor=old_sensor, mode=args.mode, config=config, out_dir=args.run_dir,
        resume=args.resume, device=device, lora_rank=args.lora_rank, data_description=description,
    )
    adapted.save_pretrained(args.out)
    print(f"saved {args.out}")
    if args.adapter:
        adapted.save_adapter(new.name, args.adapter, mode=args.mode)
        print(f"saved adapter {args.adapter}")
    monitors = adapted.training_record["monitors"]
    if monitors["collapsed"]:
        # Saved for inspection (its config and card carry the verdict), never passed off as trained.
        print(
            f"COLLAPSED: {'; '.join(monitors['reasons'])}. {args.out} is not a useful encoder; "
            f"see {args.run_dir}/metrics.jsonl.",
            file=sys.stderr,
        )
    return 0
