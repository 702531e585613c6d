"""How a recipe's data reach its training step: the DINO multi-crop and MSAD views of each
item (``TrainingViews``), the augmentation a ``TrainConfig`` asks for, the step-indexed batch
loader (random or spatially grouped batches) and the fixed batch of the collapse monitor."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sized
from typing import Any, cast

import torch
from torch.utils.data import DataLoader, Dataset

from ..data.augment import MultiCropAugment, check_native_size, resize
from ..errors import InvalidInputError, SensorMismatchError
from ..model import XStarsBase
from .config import TrainConfig
from .sampling import NeighbourBatchSampler, StepBatchSampler, window_centres

__all__ = ["TrainingViews", "common_window", "make_augment", "make_loader", "monitor_images"]


class TrainingViews(Dataset):
    """Turns a paired data set into training samples: DINO multi-crop views of the ``dino``
    sensors and un-augmented MSAD views of the ``paired`` sensors, resized to one token grid.
    With ``native`` (``TrainConfig.crops.native``), the MSAD views are instead unresized
    windows of that size over the same ground in every sensor, at a random position. With
    ``share``, a sensor's MSAD view also replaces its first DINO global view (both are
    ``crops.global_tokens`` per side).

    Items are addressed by ``(index, step)``; the augmentation is seeded from both, so a resumed
    run reproduces the uninterrupted one."""

    def __init__(
        self,
        pairs: Dataset,
        augments: dict[str, MultiCropAugment],
        msad_sizes: dict[str, int],
        seed: int,
        share: bool = False,
        native: bool = False,
    ) -> None:
        self.pairs, self.augments, self.msad_sizes, self.seed = pairs, augments, msad_sizes, seed
        self.share, self.native = share, native

    def __len__(self) -> int:
        return len(cast(Sized, self.pairs))

    def images(self, index: int) -> dict[str, torch.Tensor]:
        """Item ``index``'s images, checked to hold every sensor the recipe needs."""
        images = self.pairs[index]["images"]
        missing = sorted((set(self.augments) | set(self.msad_sizes)) - set(images))
        if missing:
            raise SensorMismatchError(
                f"Training item {index} has images for {sorted(images)} but the recipe needs {missing}; "
                "name the data set's sensors as the model names them."
            )
        return images

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        index, step = key
        images = self.images(index)
        generator = torch.Generator().manual_seed(hash((self.seed, step, index)) & 0x7FFF_FFFF_FFFF)
        views = {s: aug(images[s], generator=generator) for s, aug in self.augments.items()}
        if self.native and self.msad_sizes:
            paired = common_window(images, self.msad_sizes, torch.rand(2, generator=generator))
        else:
            paired = {s: resize(images[s], (size, size)) for s, size in self.msad_sizes.items()}
        if self.share:
            for sensor in set(views) & set(paired):
                views[sensor][0] = paired[sensor]
        return {"views": views, "pairs": paired}


def common_window(
    images: dict[str, torch.Tensor], sizes: dict[str, int], position: torch.Tensor
) -> dict[str, torch.Tensor]:
    """A ``sizes[s]``-pixel square window of each sensor's image, unresized, all over the same
    ground: ``position`` (two fractions, row then column) places each window within its image.
    Every image must be the same multiple of its window size (same ground when the images cover
    the same footprint)."""
    for sensor, size in sizes.items():
        check_native_size(sensor, size, images[sensor].shape, kind="MSAD ")
    ratios = {s: (images[s].shape[-2] / size, images[s].shape[-1] / size) for s, size in sizes.items()}
    if len({(round(r, 2), round(c, 2)) for r, c in ratios.values()}) > 1:
        raise InvalidInputError(
            "Native-resolution MSAD views must cover the same ground in every sensor, but image / view size differs: "
            + ", ".join(f"{s} {tuple(images[s].shape[-2:])} / {sizes[s]} px" for s in sizes)
            + "; pair images of one footprint whose pixel sizes match the stems' patch sizes, or turn native crops off.",
            field="images",
        )
    # The offset is drawn on the coarsest image's pixel grid and scaled to the others, so the
    # windows line up exactly where the pixel sizes are whole multiples of each other.
    coarsest = min(sizes, key=lambda s: images[s].shape[-2])
    shape = images[coarsest].shape[-2:]
    offset = [round(float(f) * (extent - sizes[coarsest])) / extent for f, extent in zip(position, shape)]
    windows = {}
    for sensor, size in sizes.items():
        height, width = images[sensor].shape[-2:]
        top, left = (min(round(o * extent), extent - size) for o, extent in zip(offset, (height, width)))
        windows[sensor] = images[sensor][..., top:top + size, left:left + size]
    return windows


def make_augment(model: XStarsBase, sensor: str, config: TrainConfig) -> MultiCropAugment:
    """The DINO view maker of ``model``'s ``sensor`` as ``config`` sets it (crop sizes in that
    sensor's pixels: tokens x its patch size)."""
    stem, crops = model.sensors[sensor], config.crops
    return MultiCropAugment(
        spec=stem.spec,
        global_size=crops.global_tokens * stem.patch_size,
        local_size=crops.local_tokens * stem.patch_size,
        n_global=crops.n_global,
        n_local=crops.n_local,
        global_scale=crops.global_scale,
        local_scale=crops.local_scale,
        jitter=crops.color_jitter,
        grey_p=crops.grey_p,
        native=crops.native,
    )


def make_loader(
    views: TrainingViews, config: TrainConfig, device: torch.device
) -> Callable[[int], Iterator[Any]]:
    """``batches(start)``: the run's batches on ``device`` from step ``start`` on, drawn at random
    or (``config.neighbour_group``) as groups of spatially neighbouring windows; the same steps
    get the same batches whatever step a run resumes from."""
    centres = None
    if config.neighbour_group:
        windows = getattr(views.pairs, "windows", None)
        if windows is None:
            raise InvalidInputError(
                f"neighbour_group={config.neighbour_group} groups neighbouring windows, but the training data set "
                f"({type(views.pairs).__name__}) has no `windows` bounds; use a GeoPairDataset or set {{neighbour_group}}.",
                field="pairs", settings={"neighbour_group": 0},
            )
        centres = window_centres(windows)

    def batches(start: int) -> Iterator[Any]:
        if centres is None:
            sampler = StepBatchSampler(len(views), config.batch_size, config.steps, start, config.seed)
        else:
            sampler = NeighbourBatchSampler(centres, config.neighbour_group, config.batch_size, config.steps, start, config.seed)
        # Each loader iterator draws a base seed (for its workers) from this generator; from the
        # global RNG it would shift the dropout stream right after a resume restored it. Seeded
        # from the run's seed alone, it gives a resumed run the uninterrupted run's worker seeds.
        generator = torch.Generator().manual_seed(config.seed)
        loader = DataLoader(
            views, batch_sampler=sampler, num_workers=config.num_workers, pin_memory=device.type == "cuda", generator=generator
        )
        for batch in loader:
            yield to_device(batch, device)

    return batches


def to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` (tensors in nested dicts, lists and tuples) moved to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return [to_device(v, device) for v in batch]
    return batch


def monitor_images(views: TrainingViews, sensor: str, size: int, count: int) -> torch.Tensor:
    """A fixed batch for the effective-rank monitor: the first ``count`` items' images of
    ``sensor``, un-augmented, resized to the global view size (with ``views.native``, their
    central window of that size, at the GSD the model trains on)."""
    middle = torch.tensor([0.5, 0.5])
    images = (views.images(i)[sensor] for i in range(min(count, len(views))))
    if views.native:
        return torch.stack([common_window({sensor: image}, {sensor: size}, middle)[sensor] for image in images])
    return torch.stack([resize(image, (size, size)) for image in images])
