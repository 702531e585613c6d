"""The X-STARS recipes: pretraining from scratch on several sensors, and continual pretraining
(:func:`adapt`) of a trained model to a new sensor against a frozen copy of itself.

Both optimise ``DINO + alpha * MSAD`` (see ``docs/method.md``) and avoid the official
code's defects: the MSAD term keeps its autograd graph, the projection heads are optimised, the
frozen reference runs in ``eval()`` mode, every load is strict, and inputs are normalised once
(by the model's own sensor stems; datasets hand over raw digital numbers).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from ..devices import check_device
from ..distributed import rank
from ..model import ModelT, XStarsBase
from ..sensors import SensorSpec
from .config import TrainConfig
from .loop import train_loop
from .monitors import collapse_verdict, effective_rank, warn_if_collapsed
from .seeding import seed_streams, seeded, step_seed
from .steps import AdaptStep, PretrainStep, RecipeStep
from .views import TrainingViews, make_loader, monitor_images

__all__ = ["adapt", "pretrain"]


def _device(device: str | torch.device | None) -> torch.device:
    """Where to train: ``device`` once checked (before any work), else CUDA when available."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return check_device(device)


def _train(
    recipe: RecipeStep,
    views: TrainingViews,
    out_dir: str | Path,
    resume: bool,
    progress: bool,
    record: dict[str, Any],
) -> XStarsBase:
    """Run the loop on the recipe's step; the result is the teacher's encoder (the EMA model, as
    in DINO), in eval mode, on the CPU, with the run recorded in its training record.
    The effective-rank monitor follows the teacher's CLS embeddings of a fixed batch of the
    recipe's monitor sensor. A run whose last step's monitors show a collapse warns with
    :class:`~.monitors.CollapseWarning` and records the verdict under ``"monitors"``. Run inside
    :func:`~.seeding.seeded`: the steps draw from their own stream of the run's seed (a resumed
    run restores the checkpoint's)."""
    config, device, teacher = recipe.config, recipe.device, recipe.teacher
    seed_streams(step_seed(config.seed, rank()), device)
    modules = recipe.modules.to(device)
    sensor = recipe.monitor_sensor
    images = monitor_images(views, sensor, recipe.msad_size(sensor), config.monitor.images).to(device)

    def monitored_step(batch: dict[str, Any], step: int) -> tuple[torch.Tensor, dict[str, float]]:
        loss, scalars = recipe.step(batch, step)
        if step == 0 or (step + 1) % config.monitor.every == 0 or step + 1 == config.steps:
            with torch.no_grad():
                scalars["rank"] = effective_rank(teacher.encoder(images, sensor)[:, 0])
        return loss, scalars

    summary = train_loop(
        modules,
        [(teacher, recipe.student)],
        monitored_step,
        make_loader(views, config, device),
        config,
        out_dir,
        resume=resume,
        progress=progress,
        device=device,
        last_layer_params=list(recipe.student.head.last_layer.parameters()),
    )
    # The EMA teacher was frozen for training; the model handed back trains like any other module
    # (further pretraining, fine-tuning), so its weights require gradients again.
    model = teacher.encoder.to("cpu").eval().requires_grad_(True)
    # A whitening copied from the starting model was fit on other weights.
    model.whitening = None
    verdict = collapse_verdict(summary["final"], math.log(config.dino.out_dim))
    model.training_record = {**record, "settings": config.to_dict(), **summary, "monitors": verdict}
    warn_if_collapsed(verdict, stacklevel=3)
    return model


def pretrain(
    model: ModelT,
    pairs: Dataset,
    config: TrainConfig | None = None,
    out_dir: str | Path = "runs/pretrain",
    resume: bool = False,
    device: str | torch.device | None = None,
    progress: bool = True,
    data_description: str = "",
) -> ModelT:
    """Pretrain ``model`` from its current weights on every one of its sensors.

    DINO runs on augmented views of each sensor's image; MSAD aligns the un-augmented views of
    every pair of sensors (summed over pairs, as the official code does with several sensors).
    With ``config.anchor.weight`` > 0 a frozen copy of ``model`` as passed in anchors each
    sensor's tokens (continued pretraining that should not forget the starting model).

    Args:
        model: e.g. ``XStars.new("vit_small_patch16_224", ["sentinel2_rgb", "landsat8_rgb"])``.
        pairs: items ``{"images": {sensor: C x H x W float digital numbers}}`` with one image per
            model sensor, all covering the same footprint.
        config: training settings (defaults: :class:`TrainConfig`); a setting pretrain would
            ignore (e.g. ``dino.cross_sensor``) is refused.
        out_dir: run folder for checkpoints (``last.pt``) and ``metrics.jsonl``.
        resume: continue from the last checkpoint in ``out_dir``.
        device: ``"cpu"``, ``"cuda[:N]"`` or ``"mps"``, checked before any work; default CUDA
            when available.
        data_description: recorded in the model's training record and model card.

    Returns:
        The trained encoder (the EMA teacher), ready for ``save_pretrained``; the same for the
        same ``config.seed``, data and device (:mod:`.seeding`), whatever the caller's random state.

    Raises:
        InvalidOptionError: a ``device`` this machine cannot train on (``field="device"``).
    """
    config = config or TrainConfig()
    where = _device(device)
    # Every initialisation and every step's draw comes from config.seed, not the caller's random state.
    with seeded(config.seed, where):
        recipe = PretrainStep(model, config, where)
        record = {"recipe": "pretrain", "sensors": recipe.sensors, "data": data_description}
        # The teacher is a deep copy of ``model``, so of its class; the step objects do not carry the type.
        return _train(recipe, recipe.views(pairs), out_dir, resume, progress, record)  # type: ignore[return-value]


def adapt(
    base: ModelT,
    new_sensor: SensorSpec,
    pairs: Dataset,
    old_sensor: str | None = None,
    mode: str = "stem",
    config: TrainConfig | None = None,
    out_dir: str | Path = "runs/adapt",
    resume: bool = False,
    device: str | torch.device | None = None,
    progress: bool = True,
    lora_rank: int = 8,
    patch_size: int | None = None,
    data_description: str = "",
) -> ModelT:
    """Continual pretraining: teach ``base`` a new sensor.

    A frozen copy of ``base`` (in ``eval()`` mode) encodes the old sensor's image; the student,
    initialised from ``base`` with a new input stem for ``new_sensor`` (patch size from the GSD
    ratio, kernel from the nearest-wavelength bands of the old stem), encodes the new sensor's
    image of the same footprint. MSAD aligns the student's tokens to the frozen ones position
    by position, while DINO (teacher = EMA of the student) runs on views of the new sensor.

    Args:
        base: the trained model; it is not modified.
        new_sensor: the new sensor's spec (its ``name`` is the stem's name).
        pairs: items ``{"images": {old_sensor: ..., new_sensor.name: ...}}`` of raw digital numbers.
        old_sensor: which of ``base``'s sensors the pairs' other image comes from (default: its
            primary sensor).
        mode: what is trained: ``"stem"`` (the new stem only), ``"lora"`` (the stem plus LoRA on
            the attention layers) or ``"full"`` (the whole student).
        config: training settings (defaults: :class:`TrainConfig`); a setting adapt would
            ignore (``anchor.weight``) is refused.
        device: ``"cpu"``, ``"cuda[:N]"`` or ``"mps"``, checked before any work; default CUDA
            when available.
        lora_rank: rank of the LoRA updates in ``"lora"`` mode.
        patch_size: override the stem's patch size (pixels).

    Returns:
        The adapted model (EMA teacher) with ``lineage`` naming the base model and revision; the
        same for the same ``config.seed``, data and device (:mod:`.seeding`: the new stem and the
        heads start from the seed), whatever the caller's random state.

    Raises:
        InvalidOptionError: a bad ``mode``, ``lora_rank``, ``patch_size`` or ``device`` (one this
            machine cannot train on), named in ``field``.
    """
    config = config or TrainConfig()
    where = _device(device)
    # The new stem, the heads and every step's draw come from config.seed, not the caller's random state.
    with seeded(config.seed, where):
        recipe = AdaptStep(base, new_sensor, old_sensor, mode, config, where, lora_rank, patch_size)
        record = {"recipe": "adapt", "mode": mode, "new_sensor": recipe.new, "old_sensor": recipe.old, "data": data_description}
        model = _train(recipe, recipe.views(pairs), out_dir, resume, progress, record)
    model.lineage = {"base_model": base.name_or_path, "base_revision": base.revision, "adapt_mode": mode}
    return model  # type: ignore[return-value]  # a deep copy of ``base``, so of its class
