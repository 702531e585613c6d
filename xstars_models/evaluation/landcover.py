"""Land-cover classification from frozen embeddings: cosine kNN and a linear probe, on the bundled
Sentinel-2 chips labelled with a ~690 m land-cover map and split spatially (whole blocks of chips).

Results always come beside baselines on the same split: the same architecture at random
initialisation, raw pixels (mean colour, and the chip area-averaged to the token grid) and the
majority class. Origin and licences of the chips: ``xstars_models/samples/SOURCES.md``."""

from __future__ import annotations

import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import InvalidInputError, InvalidOptionError
from ..model import XStarsBase
from .classifiers import balanced_accuracy, knn_predict, linear_probe_predict, spatial_folds
from .common import FEATURES, WHITENED, embedding_features, pixel_features, random_init_like

__all__ = ["LandcoverChips", "landcover_scores", "landcover_table", "load_landcover_chips"]

CHIPS_PATH = Path(__file__).resolve().parents[1] / "samples" / "landcover_chips_s2.npz"
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
            raise InvalidInputError(
                f"chips must be N x C x H x W uint8, got {tuple(self.chips.shape)} {self.chips.dtype}.", field="chips"
            )
        for name in ("labels", "is_test", "blocks", "bounds", "majority_fraction"):
            if len(getattr(self, name)) != n:
                raise InvalidInputError(f"{name} has {len(getattr(self, name))} rows for {n} chips.", field=name)
        if len(self.class_codes) != len(self.class_names):
            raise InvalidInputError("class_codes and class_names differ in length.", field="class_names")
        if n and (int(self.labels.min()) < 0 or int(self.labels.max()) >= len(self.class_codes)):
            raise InvalidInputError(f"labels must be in 0..{len(self.class_codes) - 1}.", field="labels")

    @property
    def train(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(chips, labels) of the training side."""
        return self.chips[~self.is_test], self.labels[~self.is_test]

    @property
    def test(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(chips, labels) of the test side."""
        return self.chips[self.is_test], self.labels[self.is_test]


# The fields of a chips file (as scripts/make_landcover_chips.py writes them) that are read, and
# those with one row per chip.
CHIP_FIELDS = ("chips", "labels", "class_codes", "class_names", "split", "block", "bounds", "majority_fraction", "crs_wkt")
_PER_CHIP = ("chips", "labels", "split", "block", "bounds", "majority_fraction")


def load_landcover_chips(path: str | Path | None = None, area: str | None = None) -> LandcoverChips:
    """The bundled land-cover chips (``samples/landcover_chips_s2.npz``, built by
    ``scripts/make_landcover_chips.py``), or an npz with the same fields at ``path``.

    ``area="unseen"`` (the default for the bundled chips) keeps the chips of the tile's northern
    ``UNSEEN_ROWS`` chip rows, the area the default model never saw in pretraining (train and
    test sides both inside it); ``"all"`` (the default for a file at ``path``) keeps every chip.

    Raises:
        FileNotFoundError: no file at ``path``.
        InvalidInputError: a file that is not an ``.npz`` of :data:`CHIP_FIELDS` (a single ``.npy``
            array, a damaged archive, a missing or mis-shaped field; ``field="path"``, the message
            names the file and the field).
    """
    area = area or ("all" if path is not None else "unseen")
    if area not in AREAS:
        raise InvalidOptionError(f"area must be one of {AREAS}, got {area!r}.", field="area")
    path = Path(path) if path is not None else CHIPS_PATH
    if not path.is_file():
        raise FileNotFoundError(f"No land-cover chips at {path}; rebuild with scripts/make_landcover_chips.py.")
    data = _read_chips_file(path, area)
    keep = data["grid_row"] < UNSEEN_ROWS if area == "unseen" else np.ones(len(data["split"]), dtype=bool)
    data = {key: value[keep] if value.ndim and len(value) == len(keep) else value for key, value in data.items()}
    split = data["split"]
    if not set(np.unique(split)) <= {"train", "test"}:
        raise InvalidInputError(f"split must hold only 'train' / 'test', got {sorted(set(split))}.", field="path")
    try:
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
    except InvalidInputError as err:  # the chips' own checks, which do not know the file
        raise InvalidInputError(f"{path}: {err}", field=err.field) from None
    # Values numpy or torch cannot convert (text labels, unsigned 32-bit chips...): a field of the wrong type.
    except (TypeError, ValueError) as err:
        raise InvalidInputError(f"{path}: a field of the wrong type ({err}).", field="path") from None


def _read_chips_file(path: Path, area: str) -> dict[str, np.ndarray]:
    """Every field of the chips ``.npz`` at ``path`` that :func:`load_landcover_chips` reads,
    checked for presence and one row per chip; ``grid_row`` too for ``area="unseen"``."""
    expected = f"an .npz of labelled chips with the fields {list(CHIP_FIELDS)} (as scripts/make_landcover_chips.py writes)"
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise InvalidInputError(f"{path}: cannot read it as {expected} ({type(err).__name__}: {err}).", field="path") from None
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise InvalidInputError(f"{path} holds one array ({type(loaded).__name__}), not {expected}.", field="path")
    with loaded:
        if area == "unseen" and "grid_row" not in loaded.files:
            raise InvalidInputError(
                f"{path} has no grid_row field, so its unseen area is unknown; load it with {{area}}.",
                field="path",
                settings={"area": "all"},
            )
        missing = [name for name in CHIP_FIELDS if name not in loaded.files]
        if missing:
            raise InvalidInputError(f"{path} has no {missing} field(s); expected {expected}.", field="path")
        try:
            data = {key: loaded[key] for key in loaded.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:  # a damaged member, or pickled objects
            raise InvalidInputError(f"{path}: cannot read its fields ({type(err).__name__}: {err}).", field="path") from None
    rows = len(data["chips"]) if data["chips"].ndim else 0
    for name in (*_PER_CHIP, *(["grid_row"] if area == "unseen" else [])):
        if data[name].ndim == 0 or len(data[name]) != rows:
            raise InvalidInputError(
                f"{path}: field {name!r} must have one row per chip ({rows}), got shape {data[name].shape}.", field="path"
            )
    return data


def _predict(
    train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, k: int, groups: torch.Tensor, seed: int,
) -> dict[str, torch.Tensor]:
    """kNN, linear-probe and majority-class predictions of the test rows."""
    return {
        "knn": knn_predict(train_x, train_y, test_x, k),
        "probe": linear_probe_predict(train_x, train_y, test_x, groups=groups, seed=seed),
        "majority": torch.full((len(test_x),), int(torch.bincount(train_y).argmax()), dtype=torch.int64),
    }



def landcover_scores(
    x: torch.Tensor, chips: LandcoverChips, k: int = 5, seed: int = 0, folds: int | None = None
) -> dict[str, dict[str, float]]:
    """Accuracy and balanced accuracy (fractions) of the kNN, the probe and the majority class on
    any features ``x`` (one row per chip, e.g. another encoder's embeddings): on the test side of
    the chips' split (``folds=None``), or over every chip, each predicted by the fold of
    :func:`spatial_folds` it is held out in. ``{"knn" | "probe" | "majority": {"acc", "bal acc"}}``."""
    if x.ndim != 2 or len(x) != len(chips.labels):
        raise InvalidInputError(f"features must be one row per chip ({len(chips.labels)} x D), got {tuple(x.shape)}.", field="x")
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
        raise InvalidOptionError(f"This model has no stem for sensor {sensor!r}; it knows {list(model.sensors)}.", field="sensor")
    kinds = [kind for kind in FEATURES if not kind.endswith(WHITENED)]
    unknown = [kind for kind in features if kind not in kinds]
    if unknown or not features:
        raise InvalidOptionError(
            f"features must be a non-empty selection of {tuple(kinds)}, got {tuple(features)} (land cover compares "
            "raw features; whitening is fit for retrieval across sensors).",
            field="features",
        )
    n_test = int(chips.is_test.sum())
    if folds is None and (n_test == 0 or n_test == len(chips.chips)):
        raise InvalidInputError(
            f"Both splits must be non-empty, got {len(chips.chips) - n_test} train and {n_test} test chips.", field="chips"
        )
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
