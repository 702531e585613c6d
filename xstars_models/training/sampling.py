"""Which training items make up each step's batch: a seeded shuffle, or groups of spatially
neighbouring windows (hard negatives for the InfoNCE terms). The order depends only on the seed
and the step, so a resumed run sees exactly the batches the uninterrupted run would have, and
each process a disjoint slice."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from ..distributed import rank, world_size
from ..errors import InvalidInputError, InvalidOptionError

__all__ = ["NeighbourBatchSampler", "StepBatchSampler", "window_centres"]


class StepBatchSampler:
    """Yields, for each step from ``start`` to ``steps``, this process's share of a batch as
    ``(index, step)`` pairs, drawn from a seeded shuffle of the items, epoch after epoch."""

    def __init__(self, n_items: int, batch_size: int, steps: int, start: int = 0, seed: int = 0) -> None:
        if n_items < 1:
            raise InvalidInputError("The training data set is empty.", field="pairs")
        self.n, self.batch, self.steps, self.start, self.seed = n_items, batch_size, steps, start, seed
        self.rank, self.world = rank(), world_size()
        self._cached: tuple[int, torch.Tensor] = (-1, torch.empty(0))

    def __len__(self) -> int:
        return self.steps - self.start

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        if self._cached[0] != epoch:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._cached = (epoch, torch.randperm(self.n, generator=generator))
        return self._cached[1]

    def _draw(self, step: int, count: int) -> list[int]:
        """This process's ``count`` items of ``step``: positions ``step x count x processes + ...``
        of the endless sequence of epoch shuffles."""
        first = (step * self.world + self.rank) * count
        return [int(self._epoch_order(p // self.n)[p % self.n]) for p in range(first, first + count)]

    def _indexes(self, step: int) -> list[int]:
        return self._draw(step, self.batch)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for step in range(self.start, self.steps):
            yield [(i, step) for i in self._indexes(step)]


class NeighbourBatchSampler(StepBatchSampler):
    """Batches of ``batch_size / group`` groups: an item from the seeded shuffle and its
    ``group - 1`` nearest items by window centre. An InfoNCE over such a batch must tell a
    footprint from its shifted neighbours, not only from far-away land, which is what
    retrieval among overlapping footprints asks of a global embedding.

    Args:
        centres: N x 2 window centres in metres (:func:`window_centres`).
        group: items per group, >= 2, dividing ``batch_size``.
    """

    def __init__(
        self, centres: torch.Tensor, group: int, batch_size: int, steps: int, start: int = 0, seed: int = 0
    ) -> None:
        super().__init__(len(centres), batch_size, steps, start, seed)
        if group < 2 or batch_size % group or group > len(centres):
            raise InvalidOptionError(
                f"Neighbour groups of {group} items must be >= 2, divide the batch size ({batch_size}) and not "
                f"exceed the {len(centres)} training windows.",
                field="group",
            )
        self.group = group
        distances = torch.cdist(centres.double(), centres.double())
        # Each row: the item itself first (distance 0), then its neighbours, nearest first; ties
        # by index, so the groups do not depend on the sort's implementation.
        self.neighbours = torch.sort(distances, dim=1, stable=True).indices[:, :group]

    def _indexes(self, step: int) -> list[int]:
        return [int(i) for seed_item in self._draw(step, self.batch // self.group) for i in self.neighbours[seed_item]]


def window_centres(windows: Sequence[Sequence[float]]) -> torch.Tensor:
    """N x 2 centres (x, y) of windows given as (left, bottom, right, top) bounds."""
    bounds = torch.as_tensor([tuple(w) for w in windows], dtype=torch.float64)
    if bounds.ndim != 2 or bounds.shape[1] != 4:
        raise InvalidInputError(
            f"windows must be (left, bottom, right, top) bounds, got an array of shape {tuple(bounds.shape)}.", field="windows"
        )
    return torch.stack([(bounds[:, 0] + bounds[:, 2]) / 2, (bounds[:, 1] + bounds[:, 3]) / 2], dim=1)
