"""Land-cover classification from frozen embeddings: cosine kNN and a linear probe, on the bundled
Sentinel-2 chips labelled with a ~690 m land-cover map and split spatially (whole blocks of chips).

Results always come beside baselines on the same split: the same architecture at random
initialisation, raw pixels (mean colour, and the chip area-averaged to the token grid) and the
majority class. Origin and licences of the chips: ``xstars_models/samples/SOURCES.md``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..model import XStarsBase
from .common import FEATURES, WHITENED, embedding_features, pixel_features, random_init_like

__all__ = [
    "LandcoverChips",
    "balanced_accuracy",
    "knn_accuracy",
    "knn_predict",
    "landcover_scores",
    "landcover_table",
    "linear_probe_accuracy",
    "linear_probe_predict",
    "load_landcover_chips",
    "spatial_folds",
]

CHIPS_PATH = Path(__file__).resolve().parents[1] / "samples" / "landcover_chips_s2.npz"
# Searched on the training set only; on the scale of the mean cross-entropy (per-sample loss).
WEIGHT_DECAYS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
VALIDATION_FOLDS = 4
# The chips come from one Sentinel-2 tile that also feeds pretraining. Its northern UNSEEN_ROWS
# rows of chips (9.6 km; all four classes) are the evaluation area: scripts/train_default.py
# pretrains only on the tile's pixel rows from PRETRAIN_FIRST_ROW_PX on (one chip of gap).
UNSEEN_ROWS = 15
PRETRAIN_FIRST_ROW_PX = (UNSEEN_ROWS + 1) * 64
AREAS = ("unseen", "all")


@dataclass(frozen=True)
class LandcoverChips:
    """Labelled image chips with a spatial train/test split.

    Attributes:
        chips: N x 3 x H x W uint8, the ``sentinel2_rgb`` sensor's digital numbers (L1C
            reflectance x 1e4 / 20, clipped to 0..255), bands B04, B03, B02; 10 m pixels.
        labels: N int64 class indexes into ``class_codes`` / ``class_names``.
        class_codes: the land-cover map's codes (ESA WorldCover legend: 10 tree cover, ...).
        class_names: a name per class.
        is_test: N bool, True for the test side of the spatial split.
        blocks: N int64 id of the spatial block a chip belongs to (splits never cut a block).
        bounds: N x 4 (left, bottom, right, top) of each chip in metres in ``crs_wkt``.
        majority_fraction: N, the fraction of the chip's area in its labelled class (0.5..1).
        crs_wkt: the chips' coordinate reference system.
        sensor: the sensor the digital numbers belong to.
    """

    chips: torch.Tensor
    labels: torch.Tensor
    class_codes: tuple[int, ...]
    class_names: tuple[str, ...]
    is_test: torch.Tensor
    blocks: torch.Tensor
    bounds: np.ndarray
    majority_fraction: np.ndarray
    crs_wkt: str
    sensor: str = "sentinel2_rgb"

    def __post_init__(self) -> None:
        n = len(self.chips)
        if self.chips.ndim != 4 or self.chips.dtype != torch.uint8:
            raise ValueError(f"chips must be N x C x H x W uint8, got {tuple(self.chips.shape)} {self.chips.dtype}.")
        for name in ("labels", "is_test", "blocks", "bounds", "majority_fraction"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name} has {len(getattr(self, name))} rows for {n} chips.")
        if len(self.class_codes) != len(self.class_names):
            raise ValueError("class_codes and class_names differ in length.")
        if n and (int(self.labels.min()) < 0 or int(self.labels.max()) >= len(self.class_codes)):
            raise ValueError(f"labels must be in 0..{len(self.class_codes) - 1}.")

    @property
    def train(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(chips, labels) of the training side."""
        return self.chips[~self.is_test], self.labels[~self.is_test]

    @property
    def test(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(chips, labels) of the test side."""
        return self.chips[self.is_test], self.labels[self.is_test]


def load_landcover_chips(path: str | Path | None = None, area: str | None = None) -> LandcoverChips:
    """The bundled land-cover chips (``samples/landcover_chips_s2.npz``, built by
    ``scripts/make_landcover_chips.py``), or an npz with the same fields at ``path``.

    ``area="unseen"`` (the default for the bundled chips) keeps the chips of the tile's northern
    ``UNSEEN_ROWS`` chip rows, the area the default model never saw in pretraining (train and
    test sides both inside it); ``"all"`` (the default for a file at ``path``) keeps every chip."""
    area = area or ("all" if path is not None else "unseen")
    if area not in AREAS:
        raise ValueError(f"area must be one of {AREAS}, got {area!r}.")
    path = Path(path) if path is not None else CHIPS_PATH
    if not path.is_file():
        raise FileNotFoundError(f"No land-cover chips at {path}; rebuild with scripts/make_landcover_chips.py.")
    with np.load(path) as data:
        if area == "unseen" and "grid_row" not in data.files:
            raise ValueError(f"{path} has no grid_row field, so its unseen area is unknown; load it with area='all'.")
        keep = data["grid_row"] < UNSEEN_ROWS if area == "unseen" else np.ones(len(data["split"]), dtype=bool)
        data = {key: data[key][keep] if data[key].ndim and len(data[key]) == len(keep) else data[key] for key in data.files}
        split = data["split"]
        if not set(np.unique(split)) <= {"train", "test"}:
            raise ValueError(f"split must hold only 'train' / 'test', got {sorted(set(split))}.")
        return LandcoverChips(
            chips=torch.from_numpy(data["chips"]),
            labels=torch.from_numpy(data["labels"].astype(np.int64)),
            class_codes=tuple(int(c) for c in data["class_codes"]),
            class_names=tuple(str(c) for c in data["class_names"]),
            is_test=torch.from_numpy(split == "test"),
            blocks=torch.from_numpy(data["block"].astype(np.int64)),
            bounds=data["bounds"],
            majority_fraction=data["majority_fraction"],
            crs_wkt=str(data["crs_wkt"]),
        )


def _check_xy(x: torch.Tensor, y: torch.Tensor, side: str) -> None:
    if x.ndim != 2 or y.ndim != 1 or len(x) != len(y):
        raise ValueError(f"{side} features must be N x D and labels N, got {tuple(x.shape)} and {tuple(y.shape)}.")
    if len(x) == 0:
        raise ValueError(f"The {side} set is empty.")
    if y.is_floating_point() or y.is_complex() or int(y.min()) < 0:
        raise ValueError(f"{side} labels must be non-negative integer class indexes.")


def _check_pair(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor) -> None:
    _check_xy(train_x, train_y, "train")
    if test_x.ndim != 2 or test_x.shape[1] != train_x.shape[1]:
        raise ValueError(f"test features must be M x {train_x.shape[1]}, got {tuple(test_x.shape)}.")
    if len(test_x) == 0:
        raise ValueError("The test set is empty.")


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
        raise ValueError(f"k must be in 1..{len(train_x)} (the training set size), got {k}.")
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
        raise ValueError(f"groups needs one entry per training row ({len(train_x)}), got {len(groups)}.")
    if not weight_decays or min(weight_decays) < 0:
        raise ValueError(f"weight_decays must be a non-empty sequence of non-negative numbers, got {weight_decays}.")
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
        raise ValueError(f"labels and predictions must be equal-length non-empty vectors, got {labels.shape}, {predicted.shape}.")
    recalls = [float((predicted[labels == c] == c).double().mean()) for c in torch.unique(labels)]
    return sum(recalls) / len(recalls)


def _predict(
    train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, k: int, groups: torch.Tensor, seed: int,
) -> dict[str, torch.Tensor]:
    """kNN, linear-probe and majority-class predictions of the test rows."""
    return {
        "knn": knn_predict(train_x, train_y, test_x, k),
        "probe": linear_probe_predict(train_x, train_y, test_x, groups=groups, seed=seed),
        "majority": torch.full((len(test_x),), int(torch.bincount(train_y).argmax()), dtype=torch.int64),
    }


def spatial_folds(blocks: torch.Tensor, folds: int, seed: int = 0) -> torch.Tensor:
    """The fold (0..folds-1) of each chip for spatial cross-validation: whole blocks go to one
    fold, a seeded draw of the blocks dealt round-robin, so folds differ by at most one block."""
    unique, inverse = torch.unique(blocks, return_inverse=True)
    if not 2 <= folds <= len(unique):
        raise ValueError(f"folds must be in 2..{len(unique)} (the number of spatial blocks), got {folds}.")
    order = torch.randperm(len(unique), generator=torch.Generator().manual_seed(seed))
    fold_of_block = torch.empty(len(unique), dtype=torch.int64)
    fold_of_block[order] = torch.arange(len(unique)) % folds
    return fold_of_block[inverse]


def landcover_scores(
    x: torch.Tensor, chips: LandcoverChips, k: int = 5, seed: int = 0, folds: int | None = None
) -> dict[str, dict[str, float]]:
    """Accuracy and balanced accuracy (fractions) of the kNN, the probe and the majority class on
    any features ``x`` (one row per chip, e.g. another encoder's embeddings): on the test side of
    the chips' split (``folds=None``), or over every chip, each predicted by the fold of
    :func:`spatial_folds` it is held out in. ``{"knn" | "probe" | "majority": {"acc", "bal acc"}}``."""
    if x.ndim != 2 or len(x) != len(chips.labels):
        raise ValueError(f"features must be one row per chip ({len(chips.labels)} x D), got {tuple(x.shape)}.")
    if folds is None:
        train = ~chips.is_test
        labels = chips.labels[chips.is_test]
        predicted = _predict(x[train], chips.labels[train], x[chips.is_test], k, chips.blocks[train], seed)
    else:
        fold_of = spatial_folds(chips.blocks, folds, seed)
        labels = chips.labels
        predicted = {name: torch.empty_like(labels) for name in ("knn", "probe", "majority")}
        for fold in range(folds):
            test, train = fold_of == fold, fold_of != fold
            for name, values in _predict(x[train], labels[train], x[test], k, chips.blocks[train], seed).items():
                predicted[name][test] = values
    return {
        name: {"acc": float((values == labels).double().mean()), "bal acc": balanced_accuracy(labels, values)}
        for name, values in predicted.items()
    }


def _row(name: str, dims: int, scores: dict[str, dict[str, float]]) -> dict[str, float | str | int]:
    return {
        "name": name, "dims": dims,
        **{f"{method} {metric}": value for method in ("knn", "probe") for metric, value in scores[method].items()},
    }


def landcover_table(
    model: XStarsBase,
    chips: LandcoverChips | None = None,
    sensor: str = "sentinel2_rgb",
    features: Sequence[str] = ("cls", "mean"),
    k: int = 5,
    seed: int = 0,
    folds: int | None = None,
) -> list[dict[str, float | str | int]]:
    """kNN and linear-probe land-cover accuracy (and balanced accuracy) for the model, the same
    architecture at random init (drawn from ``seed``; the global random state is left as it was),
    mean colour, the chips area-averaged to the token grid (``pixels GxG``, per-chip
    standardised) and the majority class of the training side. One dict per row: ``name``,
    ``dims`` and the four scores. ``chips`` defaults to the bundled ones, whose digital numbers
    are ``sensor``'s.

    With ``folds=None`` the scores are on the test side of the chips' spatial split. With
    ``folds=N`` they are spatial cross-validation: the blocks are dealt into N folds and every
    chip is predicted by a kNN / probe fitted on the other folds, so all chips are test chips
    once (for the 404 bundled chips of the unseen area, the standard error of an accuracy near
    0.8 falls from about 3.4 points on the 142 test chips to 2.0).

    ``cls``/``mean`` take about 25 s on 2 CPU cores for the bundled chips with the split (about
    N times that with N folds); ``patch`` features (tokens x width dimensions, 12288 for the
    default model) make the probe's weight-decay search take minutes."""
    chips = chips if chips is not None else load_landcover_chips()
    if sensor not in model.sensors:
        raise ValueError(f"This model has no stem for sensor {sensor!r}; it knows {list(model.sensors)}.")
    kinds = [kind for kind in FEATURES if not kind.endswith(WHITENED)]
    unknown = [kind for kind in features if kind not in kinds]
    if unknown or not features:
        raise ValueError(
            f"features must be a non-empty selection of {tuple(kinds)}, got {tuple(features)} (land cover compares "
            "raw features; whitening is fit for retrieval across sensors)."
        )
    n_test = int(chips.is_test.sum())
    if folds is None and (n_test == 0 or n_test == len(chips.chips)):
        raise ValueError(f"Both splits must be non-empty, got {len(chips.chips) - n_test} train and {n_test} test chips.")
    encoders = {"model": model, "random init": random_init_like(model, seed)}
    rows: list[dict[str, float | str | int]] = []
    for kind in features:
        for name, encoder in encoders.items():
            x = embedding_features(encoder, chips.chips, sensor, kind)
            rows.append(_row(f"{name} ({kind})", x.shape[1], landcover_scores(x, chips, k, seed, folds)))
    grid = chips.chips.shape[-1] // model.sensors[sensor].patch_size
    for name, x in pixel_features(chips.chips, grid).items():
        scores = landcover_scores(x, chips, k, seed, folds)
        rows.append(_row(name, x.shape[1], scores))
    majority = scores["majority"]
    rows.append({
        "name": "majority class", "dims": 0, "knn acc": majority["acc"], "knn bal acc": majority["bal acc"],
        "probe acc": majority["acc"], "probe bal acc": majority["bal acc"],
    })
    return rows
