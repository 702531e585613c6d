"""Retrieval metrics and the baseline table."""

from __future__ import annotations

import pytest
import torch

from factories import tiny_model
from toy_data import ToyPairs
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
    with pytest.raises(ValueError, match="features must be one of"):
        cross_sensor_retrieval(model, ToyPairs(4), "aerial", "sentinel2_rgb", features="pooled")
    with pytest.raises(ValueError, match="at least 2 pairs"):
        cross_sensor_retrieval(model, ToyPairs(1), "aerial", "sentinel2_rgb")
