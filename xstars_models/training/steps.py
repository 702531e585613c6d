"""What one optimisation step of each recipe computes, as an object built once from the model
and the config: :class:`PretrainStep` (every sensor of a model) and :class:`AdaptStep` (a new
sensor against a frozen copy of the base model). Each holds the trained modules (student,
teacher, DINO losses, MSAD heads) and decides once, from the config, which terms its steps
compute; ``views(pairs)`` turns a paired data set into its training samples, and
``step(batch, step)`` gives the loss and the scalars to log (it can be run alone)."""

from __future__ import annotations

import copy
import itertools
from abc import ABC, abstractmethod
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from ..errors import InvalidOptionError
from ..lora import apply_lora
from ..losses import DINOLoss, MaskedTokenLoss, MSADLoss
from ..model import XStarsBase
from ..sensors import SensorSpec
from .config import TrainConfig
from .terms import (
    DINONet,
    DINOTerm,
    cross_sensor_terms,
    dino_loss,
    dino_parts,
    dino_term,
    ibot_key,
    mean_terms,
    monitor_scalars,
    spread_terms,
    total_loss,
)
from .views import TrainingViews, make_augment

__all__ = ["ADAPT_MODES", "AdaptStep", "PretrainStep", "RecipeStep", "frozen_copy"]

ADAPT_MODES = ("stem", "lora", "full")

Batch = dict[str, Any]


def frozen_copy(model: XStarsBase, device: torch.device) -> XStarsBase:
    """A frozen reference of ``model`` in ``eval()`` mode on ``device``: what continual pretraining
    (``adapt``'s old-sensor path, ``pretrain``'s anchor) compares the student with."""
    return copy.deepcopy(model).eval().requires_grad_(False).to(device)


class RecipeStep(ABC):
    """The parts every recipe trains and what their steps share.

    Attributes:
        student, teacher: the DINO networks (the teacher follows the student by EMA).
        dino: one DINO loss (and iBOT loss) per sensor, keyed as :func:`~.terms.dino_parts` does.
        msad: the MSAD loss with its projection heads.
        share: the MSAD view of a sensor is also its first DINO global view (``msad.share_view``
            with ``msad.alpha`` > 0), which the recipe's :class:`~.views.TrainingViews` must know.
        monitor_sensor: the sensor whose teacher CLS embeddings the collapse monitors follow.
    """

    student: DINONet
    teacher: DINONet
    dino: nn.ModuleDict
    msad: MSADLoss
    monitor_sensor: str

    def __init__(self, config: TrainConfig, device: torch.device) -> None:
        self.config, self.device = config, device
        self.share = config.msad.share_view and config.msad.alpha > 0

    @property
    def modules(self) -> nn.ModuleDict:
        """Everything a checkpoint holds, by the names its keys start with."""
        return nn.ModuleDict({"student": self.student, "teacher": self.teacher, "dino": self.dino, "msad": self.msad})

    @property
    def encoder(self) -> XStarsBase:
        """The student's encoder (what the views are cut for)."""
        return self.student.encoder

    @abstractmethod
    def views(self, pairs: Dataset) -> TrainingViews:
        """The training samples of ``pairs`` (DINO views and MSAD views) that :meth:`step` takes,
        collated into batches."""

    @abstractmethod
    def step(self, batch: Batch, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss of ``batch`` at optimisation step ``step`` and the scalars to log."""

    def msad_size(self, sensor: str) -> int:
        """Side of ``sensor``'s MSAD views (and global views) in its pixels."""
        return self.config.crops.global_tokens * self.encoder.sensors[sensor].patch_size

    def _views(self, pairs: Dataset, dino_sensors: list[str], msad_sensors: list[str]) -> TrainingViews:
        config = self.config
        return TrainingViews(
            pairs,
            {s: make_augment(self.encoder, s, config) for s in dino_sensors},
            {s: self.msad_size(s) for s in msad_sensors},
            config.seed,
            share=self.share,
            native=config.crops.native,
        )

    def _dino_term(self, views: list[torch.Tensor], sensor: str, step: int) -> DINOTerm:
        """``sensor``'s DINO term, with its iBOT loss when the config asks."""
        config = self.config
        masked = (cast(MaskedTokenLoss, self.dino[ibot_key(sensor)]), config.ibot.mask_ratio) if config.ibot.weight > 0 else None
        return dino_term(
            self.student, self.teacher, self._loss(sensor), views, sensor, config.crops.n_global, step, masked
        )

    def _loss(self, key: str) -> DINOLoss:
        """The DINO loss under ``key`` in :attr:`dino`."""
        return cast(DINOLoss, self.dino[key])

    def _no_msad(self) -> torch.Tensor:
        return torch.zeros((), device=self.device)


class PretrainStep(RecipeStep):
    """:func:`~.recipes.pretrain`'s step: DINO on augmented views of each sensor's image, MSAD
    (and the InfoNCE and gap terms) between the un-augmented views of every pair of sensors
    (summed over pairs), and with ``anchor.weight`` > 0 a frozen copy of the starting model that
    each sensor's tokens stay near.

    ``model`` itself becomes the student's encoder, set to train every weight (whatever a previous
    recipe, e.g. adapt's stem mode, left frozen)."""

    def __init__(self, model: XStarsBase, config: TrainConfig, device: torch.device) -> None:
        super().__init__(config, device)
        self.sensors = list(model.sensors)
        config.check_recipe("pretrain", len(self.sensors))
        self.student, self.teacher, self.dino = dino_parts(model.train().requires_grad_(True), config, self.sensors)
        self.msad = MSADLoss(model.embed_dim, sensors=self.sensors).to(device)
        # Copied before any step: on resume, ``model`` is again the starting model, not the checkpoint.
        self.anchor = frozen_copy(model, device) if config.anchor.weight > 0 else None
        self.monitor_sensor = self.sensors[0]
        across = config.msad.alpha > 0 or config.contrast.weight > 0 or config.contrast.gap_weight > 0
        self.pairs_needed = len(self.sensors) > 1 and across

    def views(self, pairs: Dataset) -> TrainingViews:
        # MSAD views only between several sensors.
        return self._views(pairs, self.sensors, self.sensors if len(self.sensors) > 1 else [])

    def step(self, batch: Batch, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        config, views = self.config, batch["views"]
        terms = {s: self._dino_term(views[s], s, step) for s in self.sensors}
        dino_total = cast(torch.Tensor, sum(term.loss for term in terms.values())) / len(self.sensors)
        spread = mean_terms([spread_terms(term, config) for term in terms.values()])
        if self.anchor is not None:
            anchor = self.anchor
            spread["anchor"] = torch.stack([_anchor_term(anchor, terms[s].tokens, views[s][0], s) for s in self.sensors]).mean()
        msad_total = self._no_msad()
        pair_tokens = {}
        if self.pairs_needed:
            pair_tokens = {s: terms[s].tokens if self.share else self.encoder(batch["pairs"][s], s) for s in self.sensors}
        for a, b in itertools.combinations(pair_tokens, 2):
            if config.msad.alpha > 0:
                msad_total = msad_total + self.msad(pair_tokens[a], pair_tokens[b], a, b)
            for name, value in cross_sensor_terms(pair_tokens[a], pair_tokens[b], config).items():
                spread[name] = spread[name] + value if name in spread else value
        total, scalars = total_loss(dino_total, msad_total, spread, config)
        first = self.monitor_sensor
        return total, {**scalars, **monitor_scalars(self._loss(first), terms[first].cls[0])}


def _anchor_term(anchor: XStarsBase, tokens: torch.Tensor, view: torch.Tensor, sensor: str) -> torch.Tensor:
    """1 - cosine similarity between the student's ``tokens`` of ``view`` and the frozen
    ``anchor``'s, averaged over every token (CLS included) of the batch."""
    with torch.no_grad():
        reference = anchor(view, sensor)
    return 1 - F.cosine_similarity(tokens.float(), reference.float(), dim=-1).mean()


class AdaptStep(RecipeStep):
    """:func:`~.recipes.adapt`'s step: DINO on views of the new sensor, and against a frozen
    copy of ``base`` on the old sensor's image of the same footprint: MSAD, the InfoNCE and gap
    terms, and with ``dino.cross_sensor`` a DINO term whose teacher sees the old sensor's view.

    The student is a copy of ``base`` with a new stem for ``new_sensor`` (patch size from the
    GSD ratio unless ``patch_size``, kernel from the nearest-wavelength bands of the stem of
    ``old_sensor``, by default ``base``'s primary sensor); ``mode`` says what trains: ``"stem"``
    (the new stem only), ``"lora"`` (the stem plus LoRA of rank ``lora_rank`` on the attention
    layers) or ``"full"`` (everything). ``base`` is not modified."""

    def __init__(
        self, base: XStarsBase, new_sensor: SensorSpec, old_sensor: str | None, mode: str, config: TrainConfig,
        device: torch.device, lora_rank: int = 8, patch_size: int | None = None,
    ) -> None:
        if mode not in ADAPT_MODES:
            raise InvalidOptionError(f"mode must be one of {ADAPT_MODES}, got {mode!r}.", field="mode")
        if mode == "lora" and (not isinstance(lora_rank, int) or isinstance(lora_rank, bool) or lora_rank < 1):
            raise InvalidOptionError(
                "{lora_rank}: the rank of the LoRA updates must be a whole number >= 1 (8 by default).",
                field="lora_rank", settings={"lora_rank": lora_rank},
            )
        super().__init__(config, device)
        config.check_recipe("adapt", 2)
        self.new, self.old = new_sensor.name, old_sensor or base.primary_sensor
        base.check_sensor(self.old)
        if self.new in base.sensors:
            raise InvalidOptionError(
                f"The base model already has a sensor named {self.new!r}; give the new spec another name.",
                field="new_sensor",
            )
        self.frozen = frozen_copy(base, device)
        encoder = copy.deepcopy(base)
        encoder.add_sensor(new_sensor, patch_size=patch_size, init_from=self.old)
        encoder.requires_grad_(mode == "full")
        if mode == "lora":
            apply_lora(encoder.trunk, rank=lora_rank)
        encoder.stems[self.new].requires_grad_(True)
        self.student, self.teacher, self.dino = dino_parts(encoder.train(), config, [self.new])
        if config.dino.cross_sensor:
            # The teacher's distribution for the old sensor's view of a footprint, as the target of
            # the student's new-sensor view of it: one teacher view, its own centre.
            self.dino["cross"] = dino_loss(config, n_global=1, skip_same_view=False)
        self.msad = MSADLoss(encoder.embed_dim, sensors=[self.new, self.old]).to(device)
        self.monitor_sensor = self.new
        self.reference_needed = config.msad.alpha > 0 or config.contrast.weight > 0 or config.contrast.gap_weight > 0
        # Without a shared view, MSAD, the terms across sensors and the cross-sensor DINO term
        # need the student's own forward of the new sensor's MSAD view.
        self.pair_forward = not self.share and (self.reference_needed or config.dino.cross_sensor)

    def views(self, pairs: Dataset) -> TrainingViews:
        # DINO on the new sensor only; the old sensor's image is the frozen reference's input.
        return self._views(pairs, [self.new], [self.new, self.old])

    def step(self, batch: Batch, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        config, new, old, pairs = self.config, self.new, self.old, batch["pairs"]
        term = self._dino_term(batch["views"][new], new, step)
        dino_total, tokens, head_out = term.loss, term.tokens, term.head_out
        # The InfoNCE of adapt is across sensors (below), not between two views of the new one.
        spread = spread_terms(term, config, contrast_views=False)
        if self.pair_forward:
            head_out, tokens = self.student(pairs[new], new)
        if config.dino.cross_sensor:
            with torch.no_grad():
                teacher_old, _ = self.teacher(pairs[old], old)
            dino_total = (dino_total + self._loss("cross")(head_out, teacher_old, step)) / 2
        msad_total = self._no_msad()
        if self.reference_needed:
            with torch.no_grad():
                reference = self.frozen(pairs[old], old)
            if config.msad.alpha > 0:
                msad_total = self.msad(tokens, reference, new, old)
            spread.update(cross_sensor_terms(tokens, reference, config))
        total, scalars = total_loss(dino_total, msad_total, spread, config)
        return total, {**scalars, **monitor_scalars(self._loss(new), term.cls[0])}
