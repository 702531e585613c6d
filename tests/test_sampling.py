"""Batch sampling: the random order is a seeded shuffle per epoch, neighbour batches are groups of
the nearest windows, both resume to the uninterrupted run's batches, and a data set without
windows is refused by name."""

from __future__ import annotations

import pytest
import torch

from factories import tiny_model
from toy_data import ToyPairs
from xstars_models.errors import ConfigError, InvalidInputError, InvalidOptionError
from xstars_models.training import TrainConfig, pretrain
from xstars_models.training.sampling import NeighbourBatchSampler, StepBatchSampler, window_centres


def test_random_batches_walk_through_one_seeded_shuffle_per_epoch():
    batches = [[i for i, _ in batch] for batch in StepBatchSampler(10, 4, steps=5, seed=3)]
    first, second = (torch.randperm(10, generator=torch.Generator().manual_seed(3 * 100_003 + e)).tolist() for e in (0, 1))
    assert sum(batches, []) == first + second  # 5 steps x 4 = two epochs of 10
    steps = [[s for _, s in batch] for batch in StepBatchSampler(10, 4, steps=5, seed=3)]
    assert steps == [[s] * 4 for s in range(5)]


def line_of_windows(n: int, spacing: float = 100.0) -> list[tuple[float, float, float, float]]:
    """Windows 640 m wide whose centres lie on a line, ``spacing`` metres apart."""
    return [(i * spacing, 0.0, i * spacing + 640.0, 640.0) for i in range(n)]


def test_window_centres_are_the_middle_of_the_bounds():
    assert window_centres([(0, 10, 640, 650), (100, 0, 740, 640)]).tolist() == [[320.0, 330.0], [420.0, 320.0]]
    with pytest.raises(InvalidInputError, match="left, bottom, right, top") as info:
        window_centres([(0, 1, 2)])
    assert info.value.field == "windows"


def test_neighbour_batches_are_groups_of_nearest_windows_and_resume_exactly():
    centres = window_centres(line_of_windows(20))
    sampler = NeighbourBatchSampler(centres, group=3, batch_size=6, steps=8, seed=1)
    batches = [[i for i, _ in batch] for batch in sampler]
    seeds = StepBatchSampler(20, 2, steps=8, seed=1)  # the group seeds: 6 / 3 = 2 per step
    for batch, seed_batch in zip(batches, seeds):
        assert [batch[0], batch[3]] == [i for i, _ in seed_batch]
        for group in (batch[:3], batch[3:]):
            # the seed window, then its two nearest on the line: neighbours 1 apart, 2 at most
            assert max(group) - min(group) == 2 and len(set(group)) == 3 and group[0] in group
    resumed = [[i for i, _ in batch] for batch in NeighbourBatchSampler(centres, 3, 6, steps=8, start=5, seed=1)]
    assert resumed == batches[5:]


@pytest.mark.parametrize("group, batch", [(4, 6), (1, 6), (30, 30)])
def test_bad_neighbour_groups_are_refused(group, batch):
    with pytest.raises(InvalidOptionError, match="Neighbour groups") as info:
        NeighbourBatchSampler(window_centres(line_of_windows(20)), group, batch, steps=1)
    assert info.value.field == "group"


def test_config_refuses_a_group_of_one_or_one_that_does_not_divide_the_batch():
    for group in (1, 3):
        with pytest.raises(ConfigError, match="neighbour_group must be 0") as info:
            TrainConfig(batch_size=8, neighbour_group=group)
        assert info.value.field == "neighbour_group"


class RecordingPairs(ToyPairs):
    """Toy pairs with window bounds on a line, recording which items the loader asks for."""

    def __init__(self, n: int) -> None:
        super().__init__(n)
        self.windows = line_of_windows(n)
        self.requested: list[int] = []

    def __getitem__(self, index: int) -> dict:
        self.requested.append(index)
        return super().__getitem__(index)


def test_pretrain_draws_neighbour_batches_and_names_a_data_set_without_windows(tmp_path):
    settings = dict(
        steps=1, batch_size=4, warmup_steps=1, dino_out_dim=64, local_crops=1, global_crops=1, monitor_images=2,
        contrast_weight=1.0, alpha=0.0, precision="fp32", neighbour_group=2,
    )
    pairs = RecordingPairs(12)
    pretrain(tiny_model(extra_sensors=("aerial",)), pairs, TrainConfig(**settings), out_dir=tmp_path / "a", device="cpu", progress=False)
    batch = pairs.requested[2:]  # after the 2 items of the fixed monitor batch
    assert len(batch) == 4 and all(abs(a - b) == 1 for a, b in (batch[:2], batch[2:]))
    with pytest.raises(InvalidInputError, match=r"no `windows` bounds; use a GeoPairDataset or set neighbour_group=0\.") as info:
        pretrain(tiny_model(extra_sensors=("aerial",)), ToyPairs(12), TrainConfig(**settings), out_dir=tmp_path / "b", device="cpu", progress=False)
    assert info.value.field == "pairs"
