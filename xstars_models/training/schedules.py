"""Per-step schedules (learning rate, teacher momentum)."""

from __future__ import annotations

import math

__all__ = ["cosine", "ema_initial_weight", "warmup_cosine"]


def cosine(step: int, total: int, start: float, end: float) -> float:
    """Cosine from ``start`` at step 0 to ``end`` at step ``total``."""
    progress = min(max(step / max(total, 1), 0.0), 1.0)
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * progress))


def warmup_cosine(step: int, total: int, peak: float, end: float, warmup: int) -> float:
    """Linear warm-up from 0 to ``peak`` over ``warmup`` steps, then cosine to ``end``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return cosine(step - warmup, total - warmup, peak, end)


def ema_initial_weight(total: int, start: float) -> float:
    """Weight the EMA teacher still gives its initial parameters after ``total`` steps whose
    momentum goes from ``start`` to 1 by :func:`cosine`: the product of the momenta."""
    return math.prod(cosine(step, total, start, 1.0) for step in range(total))
