"""``xstars eval``: cross-sensor retrieval on co-registered rasters, or land-cover kNN and
linear-probe accuracy on the bundled labelled chips, always beside the baselines."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..errors import InvalidOptionError
from ..evaluation.common import FEATURES
from .flags import HelpFormatter

EVAL_EPILOG = """\
retrieval: windows of --footprint-m metres cut from co-registered rasters of two sensors; for each
window of sensor A, is the same window of sensor B its nearest neighbour (recall@1/@5), and back.
By default only the held-out part of the area (--val-fraction along --split-axis, the part `xstars
adapt` never trains on) is used.
landcover: kNN and linear-probe accuracy on the bundled real Sentinel-2 chips labelled with a
land-cover map: on the test side of a spatial train/test split, or with --folds N by spatial
cross-validation (whole blocks per fold; every chip is a test chip once, a smaller standard error).
Both print the model beside the same architecture at random init and raw-pixel baselines.

examples:
  xstars eval xstars-s2-aerial --task landcover --folds 6
  xstars eval ./my-model --task retrieval --sensor-a aerial --a aerial.tif \\
      --sensor-b sentinel2_rgb --b s2.tif --footprint-m 640 --json retrieval.json
"""


def register(sub: Any) -> None:
    p = sub.add_parser("eval", help="retrieval / land-cover evaluation beside random-init and pixel baselines",
                       epilog=EVAL_EPILOG, formatter_class=HelpFormatter)
    p.add_argument("model", help="registry id, Hub repo (org/name[@rev]) or folder")
    p.add_argument("--task", required=True, choices=("retrieval", "landcover"))
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("--offline", action="store_true", help="use only the local cache")
    p.add_argument("--seed", type=int, default=0, help="seed of the random-init baseline")
    r = p.add_argument_group("retrieval")
    r.add_argument("--sensor-a", help="the model's sensor name of --a")
    r.add_argument("--a", nargs="+", metavar="FILE", help="raster(s) of sensor A")
    r.add_argument("--a-bands", nargs="+", type=int, help="1-based bands of --a, in the sensor's order")
    r.add_argument("--sensor-b", help="the model's sensor name of --b")
    r.add_argument("--b", nargs="+", metavar="FILE", help="raster(s) of sensor B, same area and CRS")
    r.add_argument("--b-bands", nargs="+", type=int, help="1-based bands of --b, in the sensor's order")
    r.add_argument("--footprint-m", type=float, help="window size in metres (default: the model's pretraining grid)")
    r.add_argument("--stride-m", type=float, help="distance between windows in metres (default: the footprint)")
    r.add_argument("--split", default="val", choices=("val", "train", "all"), help="which part of the area")
    r.add_argument("--val-fraction", type=float, default=0.2, help="held-out fraction of the area (--split val)")
    r.add_argument("--split-axis", choices=("x", "y"), default="y", help="axis of the spatial split (x: columns)")
    r.add_argument("--resample", action="store_true",
                   help="accept rasters whose pixel size is more than 10%% off the sensor's GSD (windows resampled)")
    p.add_argument("--features", nargs="+", choices=FEATURES,
                   help="features compared (default: patch mean for retrieval, cls mean for landcover; the whitened "
                        "ones, retrieval only, use the model's fitted whitening)")
    lc = p.add_argument_group("landcover")
    lc.add_argument("--chips", help="an .npz of labelled chips in the bundled file's format (default: the bundled chips)")
    lc.add_argument("--sensor", default="sentinel2_rgb", help="the model's sensor of the chips")
    lc.add_argument("--folds", type=int, help="spatial cross-validation over this many folds of whole blocks "
                    "(default: the chips' own train/test split)")
    p.set_defaults(func=_eval)


def _eval(args: argparse.Namespace) -> int:
    from ..xstars import XStars

    model = XStars.from_pretrained(args.model, local_files_only=args.offline)
    results = _retrieval(model, args) if args.task == "retrieval" else _landcover(model, args)
    if args.json:
        from ..serialization import atomic_write_bytes

        atomic_write_bytes(Path(args.json), (json.dumps(results, indent=2) + "\n").encode())
        print(f"wrote {args.json}")
    return 0


def _retrieval(model: Any, args: argparse.Namespace) -> dict[str, Any]:
    from ..data import default_footprint_m, raster_pairs
    from ..evaluation import retrieval_table

    missing = [name for name in ("sensor_a", "a", "sensor_b", "b") if not getattr(args, name)]
    if missing:
        raise InvalidOptionError(
            "--task retrieval needs --sensor-a NAME --a FILE... --sensor-b NAME --b FILE...", field=missing[0]
        )
    specs = {name: model.check_sensor(name).spec for name in (args.sensor_a, args.sensor_b)}
    # The pretraining token grid: position embeddings are then used as trained.
    footprint = args.footprint_m or default_footprint_m(model, args.sensor_a)
    inputs = {
        args.sensor_a: (specs[args.sensor_a], args.a, args.a_bands),
        args.sensor_b: (specs[args.sensor_b], args.b, args.b_bands),
    }
    pairs, description = raster_pairs(
        inputs, footprint, args.stride_m, args.split, args.val_fraction, args.split_axis, args.resample
    )
    print(description)
    features = args.features or ("patch", "mean")
    table = retrieval_table(model, pairs, args.sensor_a, args.sensor_b, features=features, seed=args.seed)
    rows = [{"": name, **values} for name, values in table["rows"].items()]
    print_table(rows, f"a = {args.sensor_a}, b = {args.sensor_b}, {table['pairs']} pairs")
    return {**table, "data": description}


def _landcover(model: Any, args: argparse.Namespace) -> dict[str, Any]:
    from ..evaluation import landcover_table, load_landcover_chips

    chips = load_landcover_chips(args.chips)
    rows = landcover_table(
        model, chips, sensor=args.sensor, features=args.features or ("cls", "mean"), seed=args.seed, folds=args.folds
    )
    protocol = f"spatial {args.folds}-fold cross-validation" if args.folds else "spatial split"
    print_table(rows, f"land cover, {args.chips or 'bundled Sentinel-2 chips'}: {len(chips.chips)} chips, {protocol}")
    return {"rows": rows}


def print_table(rows: list[dict[str, Any]], title: str) -> None:
    """A markdown table of ``rows`` (one dict per row, the same keys), floats to 3 decimals."""
    columns = list(rows[0])
    print(f"\n{title}\n")
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in row.values()) + " |")
