"""Precision: how far bf16 and int8 move the evaluation metrics of a model from fp32 (target: at
most 0.5 points), with the public functions of ``xstars_models.evaluation`` on features embedded
under each precision:

- land cover: kNN and linear-probe accuracy on the bundled labelled Sentinel-2 chips (spatial split);
- retrieval: aerial <-> Sentinel-2 recall@1/5 on the held-out northern 25% of the homonim rasters
  (the default model's evaluation; needs ../shared/data/homonim beside the repository).

    python bench/bench_precision_accuracy.py [--model xstars-s2-aerial] [--skip-retrieval]
"""

from __future__ import annotations

import argparse
import sys
from datetime import date
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from xstars_models import XStars  # noqa: E402
from xstars_models.evaluation import knn_accuracy, linear_probe_accuracy, load_landcover_chips, recall_at_k  # noqa: E402

PRECISIONS = ("fp32", "bf16", "int8")


def features(model: XStars, images: torch.Tensor, sensor: str, kind: str, precision: str) -> torch.Tensor:
    """As the evaluation module compares them: ``patch`` tokens L2-normalised per token and
    flattened; ``cls``/``mean`` as returned."""
    if kind == "patch":
        tokens = model.embed(images, sensor, output="patch", progress=False, precision=precision)
        return F.normalize(tokens, dim=-1).flatten(1)
    return model.embed(images, sensor, output=kind, progress=False, precision=precision)


def mean_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.double(), b.double(), dim=-1).mean())


def landcover(model: XStars) -> list[str]:
    chips = load_landcover_chips()
    (train_images, train_y), (test_images, test_y) = chips.train, chips.test
    groups = chips.blocks[~chips.is_test]
    lines = ["| land cover (833 chips) | features | kNN acc | linear probe acc | mean cosine to fp32 |", "|---|---|---|---|---|"]
    for kind in ("cls", "mean"):
        reference = None
        base = {}
        for precision in PRECISIONS:
            train_x = features(model, train_images, chips.sensor, kind, precision)
            test_x = features(model, test_images, chips.sensor, kind, precision)
            scores = {
                "knn": knn_accuracy(train_x, train_y, test_x, test_y),
                "probe": linear_probe_accuracy(train_x, train_y, test_x, test_y, groups=groups),
            }
            both = torch.cat([train_x, test_x])
            if reference is None:
                reference, base = both, scores
            cells = [f"{100 * scores[k]:.1f}" + ("" if precision == "fp32" else f" ({100 * (scores[k] - base[k]):+.1f})")
                     for k in ("knn", "probe")]
            lines.append(f"| {precision} | {kind} | {cells[0]} | {cells[1]} | {mean_cosine(both, reference):.5f} |")
    return lines


def retrieval(model: XStars) -> list[str]:
    from train_default import SPLIT, homonim_sources

    from xstars_models.data import GeoPairDataset

    pairs = GeoPairDataset(homonim_sources(), footprint_m=640, stride_m=640, split="val", **SPLIT)
    stack = lambda sensor: torch.stack([pairs[i]["images"][sensor] for i in range(len(pairs))])  # noqa: E731
    aerial, s2 = stack("aerial"), stack("sentinel2_rgb")
    lines = [f"| retrieval ({len(pairs)} held-out pairs) | features | aerial->S2 r@1 | r@5 | S2->aerial r@1 | r@5 |",
             "|---|---|---|---|---|---|"]
    for kind in ("patch", "mean"):
        base: dict[str, float] = {}
        for precision in PRECISIONS:
            a = features(model, aerial, "aerial", kind, precision)
            b = features(model, s2, "sentinel2_rgb", kind, precision)
            scores = {**{f"a {k}": v for k, v in recall_at_k(a, b).items()}, **{f"b {k}": v for k, v in recall_at_k(b, a).items()}}
            base = base or scores
            cells = [f"{100 * v:.1f}" + ("" if precision == "fp32" else f" ({100 * (v - base[k]):+.1f})") for k, v in scores.items()]
            lines.append(f"| {precision} | {kind} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="xstars-s2-aerial")
    parser.add_argument("--skip-retrieval", action="store_true")
    args = parser.parse_args()
    model = XStars.from_pretrained(args.model).eval()
    print(f"model {args.model}; torch {torch.__version__}; {date.today().isoformat()}; metrics in points "
          "(percent), change from fp32 in brackets\n")
    print("\n".join(landcover(model)) + "\n", flush=True)
    if not args.skip_retrieval:
        print("\n".join(retrieval(model)))


if __name__ == "__main__":
    main()
