"""Choose the whitening shrinkage of the default model inside its training area.

    python scripts/whitening_shrinkage.py [MODEL]   (default: the bundled xstars-s2-aerial)

The stage-3 training pairs (southern 75% of the homonim area) are split by latitude: the whitening
is fit on the southern two thirds and cross-sensor retrieval (r@1, both directions) measured on
the northern third, one footprint apart, for each shrinkage. The held-out pairs (northern 25%)
are printed beside for the record; they play no part in the choice. The CLS token retrieves
almost perfectly inside the training area (stage 3 trained on those very pairs), so the mean
token, which it did not train directly, is the one that tells shrinkages apart. The choice is the
largest shrinkage (the most regularised) whose validation r@1, averaged over both directions, is
within one standard error of the best (the one-standard-error rule).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_default import evaluation_pairs, stage2_pairs  # noqa: E402

from xstars_models import XStars  # noqa: E402
from xstars_models.evaluation import recall_at_k  # noqa: E402
from xstars_models.evaluation.common import embedding_features  # noqa: E402
from xstars_models.whitening import fit_whitening  # noqa: E402

SHRINKAGES = (0.3, 0.1, 0.03, 0.01, 0.003, 0.001)
SENSORS = ("aerial", "sentinel2_rgb")
FOOTPRINT_M = 640


def features(model: XStars, pairs: Dataset, pool: str) -> dict[str, torch.Tensor]:
    return {
        s: embedding_features(model, torch.stack([pairs[i]["images"][s] for i in range(len(pairs))]), s, pool)
        for s in SENSORS
    }


def both_ways(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    return recall_at_k(a, b)["r@1"], recall_at_k(b, a)["r@1"]


def cell(recalls: tuple[float, float]) -> str:
    return f"{recalls[0]:.3f} / {recalls[1]:.3f}"


def one_standard_error_choice(scores: dict[float, float], n: int) -> float:
    """The largest shrinkage whose score is within one binomial standard error (n trials) of the best."""
    best = max(scores.values())
    margin = (best * (1 - best) / n) ** 0.5
    return max(s for s, score in scores.items() if score >= best - margin)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default="xstars-s2-aerial")
    args = parser.parse_args()
    torch.set_num_threads(2)
    model = XStars.from_pretrained(args.model)
    train, held_out = stage2_pairs(), evaluation_pairs()
    windows = np.array(train.windows)  # left, bottom, right, top (m)
    cut = np.quantile(windows[:, 3], 2 / 3)
    fit_part = Subset(train, np.flatnonzero(windows[:, 3] <= cut - FOOTPRINT_M).tolist())
    # Every other window of the northern third: the validation footprints overlap less.
    val_part = Subset(train, np.flatnonzero(windows[:, 1] > cut)[::2].tolist())
    print(f"fit on {len(fit_part)} training pairs, validate on {len(val_part)} (training area); held out: {len(held_out)}")
    print("| pool | shrinkage | validation r@1 a->b / b->a | held-out r@1 a->b / b->a (not used) |")
    print("|---|---|---|---|")
    chosen = {}
    for pool in ("mean", "cls"):
        fit, val = features(model, fit_part, pool), features(model, val_part, pool)
        full, test = features(model, train, pool), features(model, held_out, pool)
        print(f"| {pool} | none | {cell(both_ways(*val.values()))} | {cell(both_ways(*test.values()))} |")
        scores = {}
        for shrinkage in SHRINKAGES:
            on_fit, on_full = fit_whitening({pool: fit}, shrinkage), fit_whitening({pool: full}, shrinkage)
            v = both_ways(*[on_fit.apply(val[s], pool, s) for s in SENSORS])
            t = both_ways(*[on_full.apply(test[s], pool, s) for s in SENSORS])
            scores[shrinkage] = sum(v) / 2
            print(f"| {pool} | {shrinkage} | {cell(v)} | {cell(t)} |")
        chosen[pool] = one_standard_error_choice(scores, len(val_part))
    print(f"one-standard-error choice on the validation split: {chosen} (the mean token decides)")


if __name__ == "__main__":
    main()
