"""Retrieval metrics and the baseline table."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio  # the test extra installs it; a missing install must fail, not skip
import torch
from affine import Affine

from factories import tiny_model
from toy_data import ToyPairs
from xstars_models.cli import main
from xstars_models.errors import InvalidInputError, InvalidOptionError
from xstars_models.evaluation import cross_sensor_retrieval, recall_at_k, retrieval_table


def test_recall_at_k_counts_the_rank_of_the_right_item():
    gallery = torch.eye(4)
    queries = torch.tensor([[1.0, 0, 0, 0], [0, 0, 1.0, 0.1], [0, 0, 0.2, 1.0], [0, 0.9, 0, 1.0]])
    # queries 0 and 3 find their own row first; query 2's own row ranks second (behind row 3);
    # query 1's own row (similarity 0) ranks third, behind rows 2 and 3
    assert recall_at_k(queries, gallery, ks=(1, 2, 3)) == {"r@1": 0.5, "r@2": 0.75, "r@3": 1.0}
    shuffled = recall_at_k(gallery, gallery[[1, 0, 3, 2]], ks=(1,))
    assert shuffled == {"r@1": 0.0}


def test_retrieval_table_has_model_and_both_baselines():
    model = tiny_model(extra_sensors=("aerial",))
    table = retrieval_table(model, ToyPairs(6), "aerial", "sentinel2_rgb", features=("patch",))
    assert table["pairs"] == 6
    assert set(table["rows"]) == {
        "model (patch)", "random init (patch)", "random init + stem transfer (patch)", "mean colour", "pixels 8x8",
    }
    for row in table["rows"].values():
        assert set(row) == {"a->b r@1", "a->b r@5", "b->a r@1", "b->a r@5"}
        assert all(0 <= v <= 1 for v in row.values())
    # ToyPairs' aerial images are the Sentinel-2 ones up-sampled: raw pixels find every pair
    assert table["rows"]["pixels 8x8"]["a->b r@1"] == 1.0


def test_bad_arguments():
    model = tiny_model(extra_sensors=("aerial",))
    with pytest.raises(InvalidOptionError, match="features must be one of") as info:
        cross_sensor_retrieval(model, ToyPairs(4), "aerial", "sentinel2_rgb", features="pooled")
    assert info.value.field == "features"
    with pytest.raises(InvalidInputError, match="at least 2 pairs") as info:
        cross_sensor_retrieval(model, ToyPairs(1), "aerial", "sentinel2_rgb")
    assert info.value.field == "pairs"


def test_eval_command_names_its_own_flags_in_errors(tmp_path, capsys):
    """The errors of the evaluation and its pairs carry the setting at fault; the command names it
    by its flag (``--resample``, ``--sensor-a``), where the API names the keyword."""
    model = tmp_path / "model"
    tiny_model(extra_sensors=("aerial",)).save_pretrained(model)
    rasters = {}
    for name, res, size in (("coarse", 20.0, 64), ("s2", 10.0, 128)):
        rasters[name] = tmp_path / f"{name}.tif"
        with rasterio.open(rasters[name], "w", driver="GTiff", width=size, height=size, count=3, dtype="uint8",
                           crs="EPSG:32633", transform=Affine(res, 0, 500_000, 0, -res, 4_000_000)) as dst:
            dst.write(np.ones((3, size, size), np.uint8))
    retrieval = ["eval", str(model), "--task", "retrieval", "--offline", "--sensor-a", "sentinel2_rgb"]
    assert main([*retrieval, "--a", str(rasters["s2"])]) == 2
    assert "xstars eval: error: --task retrieval needs --sensor-a NAME" in capsys.readouterr().err
    both = [*retrieval, "--a", str(rasters["s2"]), "--sensor-b", "aerial", "--b", str(rasters["coarse"])]
    assert main(both) == 2
    err = capsys.readouterr().err
    assert "coarse.tif: pixel size 20 m but sensor 'aerial' has a GSD of 5 m" in err
    assert "or pass --resample to read windows resampled to 5 m." in err and "resample=True" not in err
    assert main([*both, "--resample", "--split", "all", "--footprint-m", "2560"]) == 2
    err = capsys.readouterr().err
    assert "xstars eval: error: No 2560 m footprint fits" in err and "smaller footprint than --footprint-m 2560.0." in err
