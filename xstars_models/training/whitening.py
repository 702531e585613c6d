"""Fitting a model's global-embedding whitening (:mod:`xstars_models.whitening`) on training images."""

from __future__ import annotations

from collections.abc import Sequence, Sized
from typing import cast

import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ..errors import InvalidInputError, SensorMismatchError
from ..model import XStarsBase
from ..whitening import DEFAULT_SHRINKAGE, POOLS, GlobalWhitening, fit_whitening

__all__ = ["fit_global_whitening"]


def fit_global_whitening(
    model: XStarsBase,
    pairs: Dataset,
    sensors: Sequence[str] | None = None,
    pools: Sequence[str] = POOLS,
    shrinkage: float = DEFAULT_SHRINKAGE,
    batch_size: int = 32,
    fit_on: str = "",
    progress: bool = True,
) -> GlobalWhitening:
    """Embed ``pairs`` with ``model`` and fit per-sensor centring plus a shared PCA whitening of
    its global outputs; assign the result to ``model.whitening`` to use it (``embed(..., whiten=True)``)
    and to save it with the model.

    Args:
        pairs: training items ``{"images": {sensor: C x H x W digital numbers}}`` (as for
            :func:`~xstars_models.training.pretrain`); never the evaluation images.
        sensors: which sensors to fit (default: every one of the model's sensors in the first item).
        pools: global outputs to whiten, among ``("cls", "mean")``.
        shrinkage: see :func:`xstars_models.whitening.fit_whitening`.
        batch_size: images per forward pass.
        fit_on: a description of ``pairs`` for ``config.json`` and the model card.
        progress: show a progress bar.
    """
    count = len(cast(Sized, pairs))
    if count < 2:
        raise InvalidInputError(f"Fitting a whitening needs at least 2 training items, got {count}.", field="pairs")
    if sensors is None:
        sensors = [s for s in model.sensors if s in pairs[0]["images"]]
    for sensor in sensors:
        model.check_sensor(sensor)
    features: dict[str, dict[str, list[torch.Tensor]]] = {p: {s: [] for s in sensors} for p in pools}
    starts = range(0, count, batch_size)
    for start in tqdm(starts, desc="fit whitening", unit="batch", disable=not progress):
        items = [pairs[i]["images"] for i in range(start, min(start + batch_size, count))]
        for sensor in sensors:
            if any(sensor not in images for images in items):
                raise SensorMismatchError(f"An item in [{start}, {start + len(items)}) has no {sensor!r} image.")
            batch = torch.stack([images[sensor] for images in items])
            for pool in pools:
                features[pool][sensor].append(model.embed(batch, sensor, output=pool, progress=False))
    stacked = {p: {s: torch.cat(chunks) for s, chunks in per.items()} for p, per in features.items()}
    return fit_whitening(stacked, shrinkage, fit_on)
