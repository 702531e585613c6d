"""Collapse monitors for self-distillation runs.

A DINO-family run can finish with a healthy-looking loss curve and a model that maps every
image to the same point; the first bundled model did (its teacher ended uniform, loss = ln K).
Three numbers tell a learning run from a collapsed one:

- **teacher entropy** of the centred, sharpened teacher distribution (nats), against its ceiling
  ln K: at ln K the teacher is uniform (the "centring wins" collapse); near 0 with a low
  *marginal* entropy (of the batch-mean distribution) every image picks the same prototype
  (the "sharpening wins" collapse);
- **CLS spread**: the per-dimension standard deviation of the L2-normalised CLS embeddings across
  a batch, times sqrt(D), so that it is 0 when every image gets one embedding and about 1 when
  the embeddings are spread evenly over the sphere;
- **effective rank** (RankMe, Garrido et al. 2023): exp of the entropy of the normalised singular
  values of the embeddings of a fixed batch of images, between 1 (collapsed to a line) and
  min(N, D).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
import torch.nn.functional as F

from ..losses.dino import entropy

__all__ = ["CollapseWarning", "cls_spread", "collapse_verdict", "effective_rank", "warn_if_collapsed"]

# A run is called collapsed when, at its end, any of these holds. Chosen from the runs of
# BENCHMARKS.md ("Default model: recipe ablation"): the collapsed ones end with teacher entropy
# 0.91-1.0 ln K and an effective rank of 1.8-3.3; the first that learns (s1-cb-600) at 0.75 ln K,
# rank 5.1, CLS spread 0.58. The tests' tiny random-init ViT has CLS spread 0.015 and rank 1.45.
UNIFORM_FRACTION = 0.95  # teacher entropy >= this x ln K: uniform teacher
MIN_MARGINAL_FRACTION = 0.1  # marginal entropy <= this x ln K: one prototype for every image
MIN_SPREAD = 0.05
MIN_RANK = 3.0


class CollapseWarning(UserWarning):
    """A training run ended with collapsed representations: the model it returns is not a
    useful encoder, whatever its loss says."""


def cls_spread(embeddings: torch.Tensor) -> float:
    """Mean over dimensions of the across-batch standard deviation of the L2-normalised rows of
    ``embeddings`` (B x D), times sqrt(D): 0 = one point, ~1 = spread over the sphere."""
    unit = F.normalize(embeddings.detach().float(), dim=-1)
    return float(unit.std(dim=0).mean() * math.sqrt(unit.shape[-1]))


def effective_rank(embeddings: torch.Tensor) -> float:
    """RankMe: ``exp(H(sigma / sum(sigma)))`` of the singular values of ``embeddings`` (N x D);
    NaN when they are not finite (the loop then stops on the loss with its own error)."""
    if not torch.isfinite(embeddings).all():
        return math.nan
    singular = torch.linalg.svdvals(embeddings.detach().double())
    p = singular / singular.sum().clamp_min(1e-12)
    return float(entropy(p).exp())


def collapse_verdict(scalars: dict[str, float], ln_k: float | None) -> dict[str, Any]:
    """Judge a run from the monitor values of its last step (``teacher_entropy``,
    ``teacher_marginal_entropy``, ``cls_spread``, ``rank``; missing ones are not judged).

    Returns ``{"collapsed": bool, "reasons": [...], "ln_k": ln_k, **the monitor values}``."""
    last = {k: float(scalars[k]) for k in MONITORED if k in scalars}
    reasons = []
    if ln_k is not None and "teacher_entropy" in last:
        if last["teacher_entropy"] >= UNIFORM_FRACTION * ln_k:
            reasons.append(
                f"teacher entropy {last['teacher_entropy']:.3f} >= {UNIFORM_FRACTION} x ln K ({ln_k:.3f}): "
                "the teacher is uniform"
            )
        if last.get("teacher_marginal_entropy", ln_k) <= MIN_MARGINAL_FRACTION * ln_k:
            reasons.append(
                f"marginal teacher entropy {last['teacher_marginal_entropy']:.3f}: every image picks the same prototypes"
            )
    if last.get("cls_spread", 1.0) < MIN_SPREAD:
        reasons.append(f"CLS spread {last['cls_spread']:.3f} < {MIN_SPREAD}: one embedding for every image")
    if last.get("rank", MIN_RANK) < MIN_RANK:
        reasons.append(f"effective rank {last['rank']:.2f} < {MIN_RANK} on the monitor batch")
    return {"collapsed": bool(reasons), "reasons": reasons, "ln_k": ln_k, **last}


MONITORED = ("teacher_entropy", "teacher_marginal_entropy", "cls_spread", "rank")


def warn_if_collapsed(verdict: dict[str, Any], stacklevel: int = 2) -> None:
    """Warn loudly with :class:`CollapseWarning` when ``verdict`` says the run collapsed."""
    if verdict["collapsed"]:
        warnings.warn(
            "COLLAPSED: the representations of this run collapsed, so the model it returns is not a "
            "useful encoder: " + "; ".join(verdict["reasons"]) + ". See metrics.jsonl; try a lower optim.lr, "
            "a higher dino.koleo_weight or contrast.weight, or a smaller dino.out_dim.",
            CollapseWarning,
            stacklevel=stacklevel + 1,
        )
