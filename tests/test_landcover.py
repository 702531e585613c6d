"""Land-cover evaluation: kNN and linear probe give known answers on synthetic data, the bundled
real chips are well formed, and the table puts the model beside its baselines."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from factories import tiny_model
from xstars_models.cli import main
from xstars_models.errors import InvalidInputError, InvalidOptionError
from xstars_models.evaluation import (
    LandcoverChips,
    balanced_accuracy,
    knn_accuracy,
    knn_predict,
    landcover_scores,
    landcover_table,
    linear_probe_accuracy,
    linear_probe_predict,
    load_landcover_chips,
    spatial_folds,
)

SOURCES = Path(__file__).resolve().parents[1] / "xstars_models" / "samples" / "SOURCES.md"


def clusters(n_per_class: int = 30, classes: int = 3, dim: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    centres = torch.eye(classes, dim) * 10
    y = torch.arange(classes).repeat_interleave(n_per_class)
    return centres[y] + torch.randn(len(y), dim, generator=generator), y


def test_knn_and_probe_separate_clusters_and_fail_on_shuffled_labels():
    train_x, train_y = clusters(seed=0)
    test_x, test_y = clusters(seed=1)
    assert knn_accuracy(train_x, train_y, test_x, test_y) == 1.0
    assert linear_probe_accuracy(train_x, train_y, test_x, test_y) == 1.0
    shuffled = train_y[torch.randperm(len(train_y), generator=torch.Generator().manual_seed(0))]
    assert knn_accuracy(train_x, shuffled, test_x, test_y) < 0.6
    assert linear_probe_accuracy(train_x, shuffled, test_x, test_y) < 0.6


def test_knn_tie_goes_to_the_class_with_the_nearest_neighbour():
    train_x = torch.tensor([[1.0, 0.1], [1.0, 0.3], [0.2, 1.0], [0.4, 1.0]])
    train_y = torch.tensor([0, 0, 1, 1])
    near_class_1 = torch.tensor([[0.3, 1.0]])  # neighbours ranked 1, 1, 0, 0: a 2-2 tie at k=4
    assert knn_predict(train_x, train_y, near_class_1, k=4, standardise=False).tolist() == [1]
    near_class_0 = torch.tensor([[1.0, 0.2]])
    assert knn_predict(train_x, train_y, near_class_0, k=4, standardise=False).tolist() == [0]


def test_balanced_accuracy_weights_classes_equally():
    labels = torch.tensor([0, 0, 0, 1])
    assert balanced_accuracy(labels, torch.tensor([0, 0, 0, 0])) == 0.5
    assert balanced_accuracy(labels, torch.tensor([0, 0, 1, 1])) == pytest.approx((2 / 3 + 1) / 2)


def test_bad_inputs_are_named():
    x, y = clusters()
    with pytest.raises(InvalidOptionError, match="k must be in 1..90") as info:
        knn_predict(x, y, x, k=0)
    assert info.value.field == "k"
    with pytest.raises(InvalidInputError, match="test features must be M x 8") as info:
        knn_predict(x, y, x[:, :3])
    assert info.value.field == "test_x"
    with pytest.raises(InvalidInputError, match="non-negative integer") as info:
        knn_accuracy(x, y.double(), x, y)
    assert info.value.field == "train_y"
    with pytest.raises(InvalidInputError, match="non-negative integer") as info:
        knn_accuracy(x, y, x, y.double())
    assert info.value.field == "test_y"
    with pytest.raises(InvalidOptionError, match="weight_decays must be a non-empty sequence") as info:
        linear_probe_predict(x, y, x, weight_decays=())
    assert info.value.field == "weight_decays"


def test_bundled_chips_are_real_labelled_and_split_in_space():
    chips = load_landcover_chips()
    assert isinstance(chips, LandcoverChips)
    assert chips.chips.dtype == torch.uint8 and chips.chips.shape[1:] == (3, 64, 64) and len(chips.chips) > 350
    assert chips.chips.float().std() > 5  # imagery, not a constant
    train_classes, test_classes = set(chips.train[1].tolist()), set(chips.test[1].tolist())
    assert test_classes <= train_classes and len(train_classes) >= 3
    assert (chips.majority_fraction >= 0.5).all()
    # No block is on both sides of the split.
    assert not set(chips.blocks[chips.is_test].tolist()) & set(chips.blocks[~chips.is_test].tolist())
    widths = chips.bounds[:, 2] - chips.bounds[:, 0]
    np.testing.assert_allclose(widths, 640.0)
    assert "landcover_chips_s2.npz" in SOURCES.read_text() and "cars==1.3.0" in SOURCES.read_text()


def test_default_chips_are_the_area_pretraining_never_sees():
    """The bundled default is the tile's northern chip rows; the default model's stage 1 trains only on
    pixel rows from PRETRAIN_FIRST_ROW_PX on, so no chip overlaps its training crops."""
    from xstars_models.evaluation.landcover import PRETRAIN_FIRST_ROW_PX

    unseen, every = load_landcover_chips(), load_landcover_chips(area="all")
    assert len(every.chips) == 833 and 350 < len(unseen.chips) < len(every.chips)
    tile_top = every.bounds[:, 3].max()  # metres, EPSG:32618; 10 m pixels
    lowest_unseen_row_px = (tile_top - unseen.bounds[:, 1].min()) / 10.0
    assert lowest_unseen_row_px <= PRETRAIN_FIRST_ROW_PX - 64  # at least one chip of gap
    assert set(unseen.labels.tolist()) == set(range(len(unseen.class_codes)))  # all classes present
    with pytest.raises(InvalidOptionError, match="area must be one of") as info:
        load_landcover_chips(area="north")
    assert info.value.field == "area"


def quarter_of_the_chips() -> LandcoverChips:
    """Every fourth bundled chip: keeps the table tests quick."""
    chips = load_landcover_chips()
    keep = torch.arange(len(chips.chips)) % 4 == 0
    return LandcoverChips(
        chips.chips[keep], chips.labels[keep], chips.class_codes, chips.class_names, chips.is_test[keep],
        chips.blocks[keep], chips.bounds[keep.numpy()], chips.majority_fraction[keep.numpy()], chips.crs_wkt,
    )


def test_table_has_the_model_beside_its_baselines():
    small = quarter_of_the_chips()
    rows = {row["name"]: row for row in landcover_table(tiny_model(), small, features=("mean",))}
    assert list(rows) == ["model (mean)", "random init (mean)", "mean colour", "pixels 8x8", "majority class"]
    test_y, train_y = small.test[1], small.train[1]
    majority = float((test_y == torch.bincount(train_y).argmax()).double().mean())
    assert rows["majority class"]["knn acc"] == pytest.approx(majority)
    assert all(0 <= row[key] <= 1 for row in rows.values() for key in ("knn acc", "probe acc", "knn bal acc", "probe bal acc"))
    # Mean colour separates water, trees, crops and wetland far better than chance on real imagery.
    assert rows["mean colour"]["knn acc"] > majority + 0.2


def test_spatial_folds_keep_blocks_whole_and_balanced():
    blocks = torch.tensor([3, 3, 7, 7, 7, 1, 9, 9, 4, 4, 4, 4])
    fold_of = spatial_folds(blocks, 3, seed=5)
    for block in torch.unique(blocks):
        assert len(torch.unique(fold_of[blocks == block])) == 1  # a block is never cut
    blocks_per_fold = [len(torch.unique(blocks[fold_of == f])) for f in range(3)]
    assert sorted(blocks_per_fold) == [1, 2, 2]  # 5 blocks dealt round-robin into 3 folds
    assert torch.equal(fold_of, spatial_folds(blocks, 3, seed=5))
    with pytest.raises(InvalidOptionError, match=r"folds must be in 2\.\.5") as info:
        spatial_folds(blocks, 6)
    assert info.value.field == "folds"


def test_cross_validated_table_predicts_every_chip_once_out_of_fold():
    """With folds, every chip is a test chip once: the majority-class row is the hand-computed
    out-of-fold majority vote over all chips, and a test-side-only computation would differ."""
    small = quarter_of_the_chips()
    rows = {row["name"]: row for row in landcover_table(tiny_model(), small, features=("mean",), folds=3)}
    fold_of = spatial_folds(small.blocks, 3, seed=0)
    predicted = torch.empty_like(small.labels)
    for fold in range(3):
        predicted[fold_of == fold] = torch.bincount(small.labels[fold_of != fold]).argmax()
    expected = float((predicted == small.labels).double().mean())
    assert rows["majority class"]["knn acc"] == pytest.approx(expected)
    assert rows["mean colour"]["knn acc"] > expected + 0.2
    assert rows["mean colour"]["knn acc"] != landcover_table(tiny_model(), small, features=("mean",))[2]["knn acc"]


def test_cli_eval_landcover_on_a_chips_file(tmp_path, capsys):
    small = quarter_of_the_chips()
    chips_file = tmp_path / "chips.npz"
    np.savez(
        chips_file, chips=small.chips.numpy(), labels=small.labels.numpy(), class_codes=np.array(small.class_codes),
        class_names=np.array(small.class_names), split=np.where(small.is_test.numpy(), "test", "train"),
        block=small.blocks.numpy(), bounds=small.bounds, majority_fraction=small.majority_fraction, crs_wkt=small.crs_wkt,
    )
    folder = tiny_model().save_pretrained(tmp_path / "model")
    out = tmp_path / "landcover.json"
    argv = ["eval", str(folder), "--task", "landcover", "--chips", str(chips_file), "--features", "cls", "--json", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert f"{len(small.chips)} chips" in printed
    assert "| model (cls) |" in printed and "| random init (cls) |" in printed and "| mean colour |" in printed
    written = {row["name"]: row for row in json.loads(out.read_text())["rows"]}
    expected = {row["name"]: row for row in landcover_table(tiny_model(), small, features=("cls",))}
    assert written == expected
    assert main([*argv[:-2], "--folds", "3", "--json", str(out)]) == 0
    assert "3-fold cross-validation" in capsys.readouterr().out
    folded = {row["name"]: row for row in json.loads(out.read_text())["rows"]}
    assert folded == {row["name"]: row for row in landcover_table(tiny_model(), small, features=("cls",), folds=3)}


def test_scores_of_features_from_elsewhere():
    """``landcover_scores`` takes any features, one row per chip: features that encode the label
    score ~1, the same features shuffled across chips fall to about the majority class."""
    chips = quarter_of_the_chips()
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(len(chips.labels), 4, generator=generator, dtype=torch.float64)
    informative = F.one_hot(chips.labels, 4).double() * 5 + noise
    good = landcover_scores(informative, chips, folds=3)
    shuffled = landcover_scores(informative[torch.randperm(len(chips.labels), generator=generator)], chips, folds=3)
    assert good["knn"]["acc"] > 0.95 and good["probe"]["acc"] > 0.95
    assert shuffled["knn"]["acc"] < good["majority"]["acc"] + 0.15 and shuffled["probe"]["acc"] < good["majority"]["acc"] + 0.15
    with pytest.raises(InvalidInputError, match=r"one row per chip \(101 x D\)") as info:
        landcover_scores(informative[:-1], chips)
    assert info.value.field == "x"
