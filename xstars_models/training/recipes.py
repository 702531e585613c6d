"""The X-STARS recipes: pretraining from scratch on several sensors, and continual pretraining
(:func:`adapt`) of a trained model to a new sensor against a frozen copy of itself.

Both optimise ``DINO + alpha * MSAD`` (see ``docs/method.md``) and avoid the official
code's defects: the MSAD term keeps its autograd graph, the projection heads are optimised, the
frozen reference runs in ``eval()`` mode, every load is strict, and inputs are normalised once
(by the model's own sensor stems; datasets hand over raw digital numbers).
"""

from __future__ import annotations

import copy
import itertools
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from ..losses import MSADLoss
from ..model import ModelT, XStarsBase
from ..sensors import SensorSpec
from .config import TrainConfig
from .loop import train_loop
from .monitors import collapse_verdict, effective_rank, warn_if_collapsed
from .terms import (
    DINONet, DINOTerm, cross_sensor_terms, dino_loss, dino_parts, dino_term, ibot_key, mean_terms, monitor_scalars,
    spread_terms, total_loss,
)
from .views import TrainingViews, make_augment, make_loader, monitor_images

__all__ = ["adapt", "pretrain"]

ADAPT_MODES = ("stem", "lora", "full")


def _device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _train(
    parts: tuple[DINONet, DINONet, nn.ModuleDict, MSADLoss],
    step_fn: Any,
    views: TrainingViews,
    config: TrainConfig,
    out_dir: str | Path,
    resume: bool,
    progress: bool,
    device: torch.device,
    record: dict[str, Any],
    monitor: tuple[str, torch.Tensor],
) -> XStarsBase:
    """Run the loop on the recipe's parts; the result is the teacher's encoder (the EMA model, as
    in DINO), in eval mode, on the CPU, with the run recorded in its training record.
    ``monitor`` is ``(sensor, images)``: the fixed batch whose teacher CLS embeddings give the
    effective-rank monitor. A run whose last step's monitors show a collapse warns with
    :class:`~.monitors.CollapseWarning` and records the verdict under ``"monitors"``."""
    student, teacher, dino, msad = parts
    modules = nn.ModuleDict({"student": student, "teacher": teacher, "dino": dino, "msad": msad}).to(device)
    images = monitor[1].to(device)

    def monitored_step(batch: dict[str, Any], step: int) -> tuple[torch.Tensor, dict[str, float]]:
        loss, scalars = step_fn(batch, step)
        if step == 0 or (step + 1) % config.monitor_every == 0 or step + 1 == config.steps:
            with torch.no_grad():
                scalars["rank"] = effective_rank(teacher.encoder(images, monitor[0])[:, 0])
        return loss, scalars

    summary = train_loop(
        modules,
        [(teacher, student)],
        monitored_step,
        make_loader(views, config, device),
        config,
        out_dir,
        resume=resume,
        progress=progress,
        device=device,
        last_layer_params=list(student.head.last_layer.parameters()),
    )
    # The EMA teacher was frozen for training; the model handed back trains like any other module
    # (further pretraining, fine-tuning), so its weights require gradients again.
    model = teacher.encoder.to("cpu").eval().requires_grad_(True)
    # A whitening copied from the starting model was fit on other weights.
    model.whitening = None
    verdict = collapse_verdict(summary["final"], math.log(config.dino_out_dim))
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
    With ``config.anchor_weight`` > 0 a frozen copy of ``model`` as passed in anchors each
    sensor's tokens (continued pretraining that should not forget the starting model).

    Args:
        model: e.g. ``XStars.new("vit_small_patch16_224", ["sentinel2_rgb", "landsat8_rgb"])``.
        pairs: items ``{"images": {sensor: C x H x W float digital numbers}}`` with one image per
            model sensor, all covering the same footprint.
        config: training settings (defaults: :class:`TrainConfig`).
        out_dir: run folder for checkpoints (``last.pt``) and ``metrics.jsonl``.
        resume: continue from the last checkpoint in ``out_dir``.
        device: default CUDA when available.
        data_description: recorded in the model's training record and model card.

    Returns:
        The trained encoder (the EMA teacher), ready for ``save_pretrained``.
    """
    config = config or TrainConfig()
    device = _device(device)
    sensors = list(model.sensors)
    # Every weight trains, whatever a previous recipe (e.g. adapt's stem mode) left frozen.
    student, teacher, dino = dino_parts(model.train().requires_grad_(True), config, sensors)
    msad = MSADLoss(model.embed_dim, sensors=sensors).to(device)
    # Copied before any step: on resume, ``model`` is again the starting model, not the checkpoint.
    anchor = _frozen_copy(model, device) if config.anchor_weight > 0 else None
    grid = config.global_tokens
    views = TrainingViews(
        pairs,
        {s: make_augment(model, s, config) for s in sensors},
        {s: grid * model.sensors[s].patch_size for s in sensors} if len(sensors) > 1 else {},
        config.seed,
        share=config.share_msad_view and config.alpha > 0,
        native=config.native_crops,
    )

    def step_fn(batch: dict[str, Any], step: int) -> tuple[torch.Tensor, dict[str, float]]:
        terms = {s: _dino_term(student, teacher, dino, batch["views"][s], s, config, step) for s in sensors}
        dino_loss = sum(term.loss for term in terms.values()) / len(sensors)
        spread = mean_terms([spread_terms(term, config) for term in terms.values()])
        if anchor is not None:
            spread["anchor"] = torch.stack([
                _anchor_term(terms[s].tokens, anchor, batch["views"][s][0], s) for s in sensors
            ]).mean()
        msad_loss = torch.zeros((), device=device)
        pair_tokens = {}
        if len(sensors) > 1 and (config.alpha > 0 or config.contrast_weight > 0 or config.gap_weight > 0):
            pair_tokens = {s: terms[s].tokens if views.share else student.encoder(batch["pairs"][s], s) for s in sensors}
        for a, b in itertools.combinations(pair_tokens, 2):
            if config.alpha > 0:
                msad_loss = msad_loss + msad(pair_tokens[a], pair_tokens[b], a, b)
            for name, value in cross_sensor_terms(pair_tokens[a], pair_tokens[b], config).items():
                spread[name] = spread[name] + value if name in spread else value
        first = sensors[0]
        total, scalars = total_loss(dino_loss, msad_loss, spread, config)
        return total, {**scalars, **monitor_scalars(dino[first], terms[first].cls[0])}

    record = {"recipe": "pretrain", "sensors": sensors, "data": data_description}
    monitor = (sensors[0], monitor_images(views, sensors[0], grid * model.sensors[sensors[0]].patch_size, config.monitor_images))
    return _train((student, teacher, dino, msad), step_fn, views, config, out_dir, resume, progress, device, record, monitor)


def _dino_term(
    student: DINONet, teacher: DINONet, losses: nn.ModuleDict, views: list[torch.Tensor], sensor: str, config: TrainConfig,
    step: int,
) -> DINOTerm:
    """``sensor``'s DINO term, with its iBOT loss (from ``losses``, see ``dino_parts``) when the config asks."""
    masked = (losses[ibot_key(sensor)], config.mask_ratio) if config.ibot_weight > 0 else None
    return dino_term(student, teacher, losses[sensor], views, sensor, config.global_crops, step, masked)


def _frozen_copy(model: XStarsBase, device: torch.device) -> XStarsBase:
    """A frozen reference of ``model`` in ``eval()`` mode on ``device``: what continual pretraining
    (``adapt``'s old-sensor path, ``pretrain``'s anchor) compares the student with."""
    return copy.deepcopy(model).eval().requires_grad_(False).to(device)


def _anchor_term(tokens: torch.Tensor, anchor: XStarsBase, view: torch.Tensor, sensor: str) -> torch.Tensor:
    """1 - cosine similarity between the student's ``tokens`` of ``view`` and the frozen
    ``anchor``'s, averaged over every token (CLS included) of the batch."""
    with torch.no_grad():
        reference = anchor(view, sensor)
    return 1 - F.cosine_similarity(tokens.float(), reference.float(), dim=-1).mean()


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
        lora_rank: rank of the LoRA updates in ``"lora"`` mode.
        patch_size: override the stem's patch size (pixels).

    Returns:
        The adapted model (EMA teacher) with ``lineage`` naming the base model and revision.
    """
    if mode not in ADAPT_MODES:
        raise ValueError(f"mode must be one of {ADAPT_MODES}, got {mode!r}.")
    config = config or TrainConfig()
    if config.anchor_weight > 0:
        raise ValueError(
            f"TrainConfig.anchor_weight={config.anchor_weight} is for pretrain; adapt already keeps the base model "
            "frozen for the old sensor. Set anchor_weight=0."
        )
    device = _device(device)
    old_sensor = old_sensor or base.primary_sensor
    base.check_sensor(old_sensor)
    if new_sensor.name in base.sensors:
        raise ValueError(f"The base model already has a sensor named {new_sensor.name!r}; give the new spec another name.")
    frozen = _frozen_copy(base, device)
    encoder = copy.deepcopy(base)
    encoder.add_sensor(new_sensor, patch_size=patch_size, init_from=old_sensor)
    new = new_sensor.name
    encoder.requires_grad_(mode == "full")
    if mode == "lora":
        from ..lora import apply_lora

        apply_lora(encoder.trunk, rank=lora_rank)
    encoder.stems[new].requires_grad_(True)
    student, teacher, dino = dino_parts(encoder.train(), config, [new])
    if config.cross_sensor_dino:
        # The teacher's distribution for the old sensor's view of a footprint, as the target of
        # the student's new-sensor view of it: one teacher view, its own centre.
        dino["cross"] = dino_loss(config, n_global=1, skip_same_view=False)
    msad = MSADLoss(encoder.embed_dim, sensors=[new, old_sensor]).to(device)
    grid = config.global_tokens
    views = TrainingViews(
        pairs,
        {new: make_augment(encoder, new, config)},
        {new: grid * encoder.sensors[new].patch_size, old_sensor: grid * base.sensors[old_sensor].patch_size},
        config.seed,
        share=config.share_msad_view and config.alpha > 0,
        native=config.native_crops,
    )

    def step_fn(batch: dict[str, Any], step: int) -> tuple[torch.Tensor, dict[str, float]]:
        term = _dino_term(student, teacher, dino, batch["views"][new], new, config, step)
        dino_loss, tokens, head_out = term.loss, term.tokens, term.head_out
        spread = spread_terms(term, config)
        spread.pop("contrast", None)  # across sensors below, not between two views of one
        across = config.contrast_weight > 0 or config.gap_weight > 0
        if not views.share and (config.alpha > 0 or across or config.cross_sensor_dino):
            head_out, tokens = student(batch["pairs"][new], new)
        if config.cross_sensor_dino:
            with torch.no_grad():
                teacher_old, _ = teacher(batch["pairs"][old_sensor], old_sensor)
            dino_loss = (dino_loss + dino["cross"](head_out, teacher_old, step)) / 2
        msad_loss = torch.zeros((), device=device)
        if config.alpha > 0 or across:
            with torch.no_grad():
                reference = frozen(batch["pairs"][old_sensor], old_sensor)
            if config.alpha > 0:
                msad_loss = msad(tokens, reference, new, old_sensor)
            spread.update(cross_sensor_terms(tokens, reference, config))
        total, scalars = total_loss(dino_loss, msad_loss, spread, config)
        return total, {**scalars, **monitor_scalars(dino[new], term.cls[0])}

    record = {"recipe": "adapt", "mode": mode, "new_sensor": new, "old_sensor": old_sensor, "data": data_description}
    monitor = (new, monitor_images(views, new, grid * encoder.sensors[new].patch_size, config.monitor_images))
    model = _train((student, teacher, dino, msad), step_fn, views, config, out_dir, resume, progress, device, record, monitor)
    model.lineage = {"base_model": base.name_or_path, "base_revision": base.revision, "adapt_mode": mode}
    return model
