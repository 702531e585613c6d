"""Classifiers of frozen features, deterministic and free of test leakage: cosine kNN and a
multinomial logistic-regression probe whose weight decay is chosen by cross-validation on the
training rows only, balanced accuracy, and spatial folds that keep whole blocks together. Features
are N x D tensors, labels N integer class indexes."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..errors import InvalidInputError, InvalidOptionError

__all__ = [
    "WEIGHT_DECAYS",
    "balanced_accuracy",
    "knn_accuracy",
    "knn_predict",
    "linear_probe_accuracy",
    "linear_probe_predict",
    "spatial_folds",
]

# Searched on the training set only; on the scale of the mean cross-entropy (per-sample loss).
WEIGHT_DECAYS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
VALIDATION_FOLDS = 4


def _check_xy(x: torch.Tensor, y: torch.Tensor, side: str) -> None:
    if x.ndim != 2 or y.ndim != 1 or len(x) != len(y):
        raise InvalidInputError(
            f"{side} features must be N x D and labels N, got {tuple(x.shape)} and {tuple(y.shape)}.",
            field=f"{side}_x" if x.ndim != 2 else f"{side}_y",
        )
    if len(x) == 0:
        raise InvalidInputError(f"The {side} set is empty.", field=f"{side}_x")
    if y.is_floating_point() or y.is_complex() or int(y.min()) < 0:
        raise InvalidInputError(f"{side} labels must be non-negative integer class indexes.", field=f"{side}_y")


def _check_pair(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor) -> None:
    _check_xy(train_x, train_y, "train")
    if test_x.ndim != 2 or test_x.shape[1] != train_x.shape[1]:
        raise InvalidInputError(f"test features must be M x {train_x.shape[1]}, got {tuple(test_x.shape)}.", field="test_x")
    if len(test_x) == 0:
        raise InvalidInputError("The test set is empty.", field="test_x")


def _standardise(train_x: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    """Z-score every feature with the training set's mean and std (float64); constant features
    are only centred, so they cannot blow up."""
    train_x = train_x.double()
    mean, std = train_x.mean(0), train_x.std(0)
    std = torch.where(std > 1e-12, std, torch.ones_like(std))
    return [(x.double() - mean) / std for x in (train_x, *others)]


def knn_predict(
    train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, k: int = 5, standardise: bool = True
) -> torch.Tensor:
    """Class of each test row by majority vote of its ``k`` most cosine-similar training rows.

    Features are first z-scored with the training set's statistics (``standardise``), so that
    the cosine compares all features on one scale and raw-pixel features are not dominated by
    brightness. Neighbours with equal similarity rank by training-row order. Tie rule: among the
    classes with the most votes, the one whose best-ranked neighbour is nearest wins (with
    ``k=1`` this is plain nearest neighbour)."""
    _check_pair(train_x, train_y, test_x)
    if not 1 <= k <= len(train_x):
        raise InvalidOptionError(f"k must be in 1..{len(train_x)} (the training set size), got {k}.", field="k")
    if standardise:
        train_x, test_x = _standardise(train_x, test_x)
    similarity = F.normalize(test_x.double(), dim=-1) @ F.normalize(train_x.double(), dim=-1).T
    order = torch.sort(similarity, dim=1, descending=True, stable=True).indices[:, :k]
    neighbours = train_y[order]  # M x k, nearest first
    n_classes = int(train_y.max()) + 1
    votes = F.one_hot(neighbours, n_classes).sum(1)  # M x C
    ranks = torch.arange(k).expand_as(neighbours)
    first_rank = torch.full_like(votes, k).scatter_reduce(1, neighbours, ranks, reduce="amin")
    # votes dominate; among equal votes, the earlier first appearance wins
    return ((k + 1) * votes - first_rank).argmax(1)


def knn_accuracy(
    train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor, k: int = 5,
    standardise: bool = True,
) -> float:
    """Fraction of test rows whose :func:`knn_predict` class is their label."""
    _check_xy(test_x, test_y, "test")
    return float((knn_predict(train_x, train_y, test_x, k, standardise) == test_y).double().mean())


def _fit_logistic(x: torch.Tensor, y: torch.Tensor, n_classes: int, weight_decay: float) -> torch.Tensor:
    """Weights ((D + 1) x C, bias last) of a multinomial logistic regression minimising mean
    cross-entropy + weight_decay / 2 * |W|^2 (bias not decayed); full-batch L-BFGS in float64
    from zeros, so the result is deterministic."""
    design = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    weights = torch.zeros(design.shape[1], n_classes, dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.LBFGS([weights], lr=1, max_iter=500, tolerance_grad=1e-9, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        loss = F.cross_entropy(design @ weights, y) + 0.5 * weight_decay * weights[:-1].square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimiser.step(closure)
    return weights.detach()


def _predict_logistic(weights: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return (x @ weights[:-1] + weights[-1]).argmax(1)


def _folds(n: int, groups: torch.Tensor | None, seed: int) -> list[torch.Tensor]:
    """Up to VALIDATION_FOLDS boolean masks of held-out training rows, dealt by
    :func:`spatial_folds`: whole groups when ``groups`` is given (so spatial neighbours never sit
    on both sides), else single rows; none when there are fewer than 2 groups."""
    groups = torch.arange(n) if groups is None else groups
    n_groups = len(torch.unique(groups))
    if n_groups < 2:
        return []
    fold_of = spatial_folds(groups, min(VALIDATION_FOLDS, n_groups), seed)
    return [fold_of == f for f in range(int(fold_of.max()) + 1)]


def _choose_weight_decay(
    x: torch.Tensor, y: torch.Tensor, n_classes: int, weight_decays: Sequence[float], groups: torch.Tensor | None,
    seed: int,
) -> float:
    """The weight decay with the best mean accuracy over cross-validation folds of the TRAINING
    set (the test set is never seen); ties go to the larger (simpler) one."""
    folds = _folds(len(x), groups, seed)
    if not folds:
        return max(weight_decays)
    scores = {}
    for decay in weight_decays:
        accuracies = []
        for held_out in folds:
            fit_x, val_x = _standardise(x[~held_out], x[held_out])
            weights = _fit_logistic(fit_x, y[~held_out], n_classes, decay)
            accuracies.append(float((_predict_logistic(weights, val_x) == y[held_out]).double().mean()))
        scores[decay] = sum(accuracies) / len(accuracies)
    return max(weight_decays, key=lambda decay: (scores[decay], decay))


def linear_probe_predict(
    train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor,
    weight_decays: Sequence[float] = WEIGHT_DECAYS, groups: torch.Tensor | None = None, seed: int = 0,
) -> torch.Tensor:
    """Classes of the test rows by a multinomial logistic regression on z-scored features.

    The weight decay is picked from ``weight_decays`` by cross-validation on the training rows
    only (folds of whole ``groups``, e.g. spatial blocks, when given); the probe is then refitted
    on all training rows. Deterministic for a given ``seed`` (which only draws the folds)."""
    _check_pair(train_x, train_y, test_x)
    if groups is not None and len(groups) != len(train_x):
        raise InvalidInputError(f"groups needs one entry per training row ({len(train_x)}), got {len(groups)}.", field="groups")
    if not weight_decays or min(weight_decays) < 0:
        raise InvalidOptionError(
            f"weight_decays must be a non-empty sequence of non-negative numbers, got {weight_decays}.", field="weight_decays"
        )
    n_classes = int(train_y.max()) + 1
    decay = _choose_weight_decay(train_x.double(), train_y, n_classes, weight_decays, groups, seed)
    fit_x, test_x = _standardise(train_x, test_x)
    return _predict_logistic(_fit_logistic(fit_x, train_y, n_classes, decay), test_x)


def linear_probe_accuracy(
    train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
    weight_decays: Sequence[float] = WEIGHT_DECAYS, groups: torch.Tensor | None = None, seed: int = 0,
) -> float:
    """Fraction of test rows whose :func:`linear_probe_predict` class is their label."""
    _check_xy(test_x, test_y, "test")
    predicted = linear_probe_predict(train_x, train_y, test_x, weight_decays, groups, seed)
    return float((predicted == test_y).double().mean())


def balanced_accuracy(labels: torch.Tensor, predicted: torch.Tensor) -> float:
    """Mean over the classes present in ``labels`` of the fraction of their rows predicted right."""
    if labels.shape != predicted.shape or labels.ndim != 1 or len(labels) == 0:
        raise InvalidInputError(
            f"labels and predictions must be equal-length non-empty vectors, got {labels.shape}, {predicted.shape}.",
            field="labels" if labels.ndim != 1 or len(labels) == 0 else "predicted",
        )
    recalls = [float((predicted[labels == c] == c).double().mean()) for c in torch.unique(labels)]
    return sum(recalls) / len(recalls)


def spatial_folds(blocks: torch.Tensor, folds: int, seed: int = 0) -> torch.Tensor:
    """The fold (0..folds-1) of each chip for spatial cross-validation: whole blocks go to one
    fold, a seeded draw of the blocks dealt round-robin, so folds differ by at most one block."""
    unique, inverse = torch.unique(blocks, return_inverse=True)
    if not 2 <= folds <= len(unique):
        raise InvalidOptionError(f"folds must be in 2..{len(unique)} (the number of spatial blocks), got {folds}.", field="folds")
    order = torch.randperm(len(unique), generator=torch.Generator().manual_seed(seed))
    fold_of_block = torch.empty(len(unique), dtype=torch.int64)
    fold_of_block[order] = torch.arange(len(unique)) % folds
    return fold_of_block[inverse]
