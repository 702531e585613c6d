"""Evaluation of cross-sensor alignment: given pairs of images of the same footprints by two
sensors, how often is the right image of one sensor the nearest neighbour of the other's?

Results always come beside two baselines on the same pairs: the same architecture at random
initialisation, and raw pixels (mean colour, and the image area-averaged to the token grid)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..errors import InvalidInputError, InvalidOptionError
from ..model import XStarsBase
from ..training.whitening import fit_global_whitening
from .common import FEATURES, WHITENED, PairData, embedding_features, pixel_features, random_init_like

__all__ = ["cross_sensor_retrieval", "recall_at_k", "retrieval_table"]


def recall_at_k(queries: torch.Tensor, gallery: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Fraction of queries (B x D) whose own row of ``gallery`` (B x D) is among the k most
    cosine-similar gallery rows."""
    similarity = F.normalize(queries.double(), dim=-1) @ F.normalize(gallery.double(), dim=-1).T
    own = similarity.diagonal().unsqueeze(1)
    rank = (similarity > own).sum(dim=1)  # 0 = the right one is the nearest
    return {f"r@{k}": float((rank < k).double().mean()) for k in ks}


def _stack(pairs: PairData, sensor: str) -> torch.Tensor:
    return torch.stack([pairs[i]["images"][sensor] for i in range(len(pairs))])


def cross_sensor_retrieval(
    model: XStarsBase, pairs: PairData, sensor_a: str, sensor_b: str, features: str = "patch", ks: Sequence[int] = (1, 5)
) -> dict[str, float]:
    """Recall@k from ``sensor_a`` to ``sensor_b`` images and back, keys like ``a->b r@1``."""
    if features not in FEATURES:
        raise InvalidOptionError(f"features must be one of {FEATURES}, got {features!r}.", field="features")
    if len(pairs) < 2:
        raise InvalidInputError(f"Retrieval needs at least 2 pairs, got {len(pairs)}.", field="pairs")
    a = embedding_features(model, _stack(pairs, sensor_a), sensor_a, features)
    b = embedding_features(model, _stack(pairs, sensor_b), sensor_b, features)
    return {
        **{f"a->b {k}": v for k, v in recall_at_k(a, b, ks).items()},
        **{f"b->a {k}": v for k, v in recall_at_k(b, a, ks).items()},
    }


def _stem_transfer_baseline(random_init: XStarsBase, sensor_a: str, sensor_b: str) -> XStarsBase | None:
    """The random-init model with ``sensor_a``'s stem rebuilt from ``sensor_b``'s by nearest
    wavelength (as ``adapt`` initialises a new stem): separates what the stem initialisation
    alone gives from what training adds. ``None`` when ``sensor_b`` is not the primary sensor."""
    if sensor_b != random_init.primary_sensor or sensor_a == sensor_b:
        return None
    stem = random_init.sensors[sensor_a]
    # Every weight drawn here is overwritten (trunk loaded, stem copied), but the draws would
    # still advance the caller's random sequence.
    with torch.random.fork_rng(devices=[]):
        baseline = type(random_init).new(
            random_init.arch, {sensor_b: random_init.sensors[sensor_b].spec}, **random_init.arch_kwargs
        )
        baseline.load_state_dict({k: v for k, v in random_init.state_dict().items() if k in baseline.state_dict()})
        baseline.add_sensor(stem.spec, patch_size=stem.patch_size, init_from=sensor_b, name=sensor_a)
    return baseline.eval()


def retrieval_table(
    model: XStarsBase,
    pairs: PairData,
    sensor_a: str,
    sensor_b: str,
    features: Sequence[str] = ("patch", "mean"),
    seed: int = 0,
    whitening_pairs: Dataset | None = None,
) -> dict[str, Any]:
    """The model, the same architecture at random init (drawn from ``seed``; the global random
    state is left as it was), and raw-pixel baselines on the same pairs. Returns
    ``{"pairs": n, "rows": {name: {metric: value}}}``.

    Whitened features (``cls-whitened``, ``mean-whitened``) use the model's own whitening; the
    baseline models get theirs fit the same way on ``whitening_pairs`` (training pairs, never
    ``pairs``), and have no whitened rows without them."""
    random_init = random_init_like(model, seed)
    baselines = {"random init": random_init}
    transferred = _stem_transfer_baseline(random_init, sensor_a, sensor_b)
    if transferred is not None:
        baselines["random init + stem transfer"] = transferred
    whitened = [kind for kind in features if kind.endswith(WHITENED)]
    fitted = model.whitening
    if whitened and fitted is None:
        raise InvalidOptionError(
            f"features {whitened} need the model's fitted whitening and it has none (model.whitening).", field="features"
        )
    if whitened and fitted is not None and whitening_pairs is not None:
        for baseline in baselines.values():
            baseline.whitening = fit_global_whitening(
                baseline, whitening_pairs, (sensor_a, sensor_b), fitted.pools, fitted.shrinkage, progress=False
            )
    rows: dict[str, dict[str, float]] = {}
    for kind in features:
        rows[f"model ({kind})"] = cross_sensor_retrieval(model, pairs, sensor_a, sensor_b, kind)
        for name, baseline in baselines.items():
            if baseline.whitening is not None or not kind.endswith(WHITENED):
                rows[f"{name} ({kind})"] = cross_sensor_retrieval(baseline, pairs, sensor_a, sensor_b, kind)
    images_a, images_b = _stack(pairs, sensor_a), _stack(pairs, sensor_b)
    grid = images_a.shape[-1] // model.sensors[sensor_a].patch_size
    pixels_a, pixels_b = pixel_features(images_a, grid), pixel_features(images_b, grid)
    for name in pixels_a:
        rows[name] = {
            **{f"a->b {k}": v for k, v in recall_at_k(pixels_a[name], pixels_b[name]).items()},
            **{f"b->a {k}": v for k, v in recall_at_k(pixels_b[name], pixels_a[name]).items()},
        }
    return {"pairs": len(pairs), "sensor_a": sensor_a, "sensor_b": sensor_b, "rows": rows}
