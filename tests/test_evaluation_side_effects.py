"""The evaluation tables draw their random-init baseline from their own seed: the caller's global
random state is untouched, and the same call gives the same table whatever that state is."""

from __future__ import annotations

import numpy as np
import torch

from factories import tiny_model
from toy_data import ToyPairs
from xstars_models import XStars
from xstars_models.evaluation import LandcoverChips, landcover_table, retrieval_table
from xstars_models.evaluation.common import random_init_like


def synthetic_chips(n: int = 24) -> LandcoverChips:
    """Two classes, dark and bright chips, in blocks of 4, the last two blocks as the test side."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(n) % 2
    chips = (torch.rand(n, 3, 64, 64, generator=generator) * 60 + 40 + 120 * labels.view(-1, 1, 1, 1)).to(torch.uint8)
    blocks = torch.arange(n) // 4
    return LandcoverChips(
        chips=chips, labels=labels, class_codes=(10, 80), class_names=("tree cover", "water"),
        is_test=blocks >= blocks.max() - 1, blocks=blocks, bounds=np.zeros((n, 4)),
        majority_fraction=np.ones(n), crs_wkt="", sensor="sentinel2_rgb",
    )


def test_random_init_like_is_drawn_from_its_seed_alone():
    model = tiny_model()
    torch.manual_seed(7)
    before = torch.get_rng_state()
    first = random_init_like(model, seed=3)
    assert torch.equal(torch.get_rng_state(), before)
    # the same weights as seeding the global generator and building the model
    torch.manual_seed(3)
    reference = XStars(model.config)
    torch.rand(5)  # whatever the caller did since does not matter
    second = random_init_like(model, seed=3)
    other = random_init_like(model, seed=4)
    for key, value in reference.state_dict().items():
        assert torch.equal(first.state_dict()[key], value), key
        assert torch.equal(second.state_dict()[key], value), key
    assert not torch.equal(other.trunk.cls_token, reference.trunk.cls_token)
    assert not first.training


def test_retrieval_table_leaves_the_global_random_state_alone():
    model = tiny_model(extra_sensors=("aerial",))
    pairs = ToyPairs(6)
    torch.manual_seed(11)
    before = torch.get_rng_state()
    first = retrieval_table(model, pairs, "aerial", "sentinel2_rgb", features=("patch",))
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(12345)  # another global state: the table must not depend on it
    second = retrieval_table(model, pairs, "aerial", "sentinel2_rgb", features=("patch",))
    assert first == second
    assert "random init + stem transfer (patch)" in first["rows"]


def test_landcover_table_leaves_the_global_random_state_alone():
    model = tiny_model(extra_sensors=())
    chips = synthetic_chips()
    torch.manual_seed(11)
    before = torch.get_rng_state()
    first = landcover_table(model, chips, features=("mean",))
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(12345)
    second = landcover_table(model, chips, features=("mean",))
    assert first == second
    assert [row["name"] for row in first][:2] == ["model (mean)", "random init (mean)"]
