"""What one training step computes, shared by the recipes: the student/teacher network with its
DINO head, the DINO (and iBOT masked-token) term of one sensor, the anti-collapse terms (KoLeo,
InfoNCE), the weighted total, and the per-step collapse monitors."""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
from torch import nn

from ..errors import InvalidOptionError
from ..losses import DINOLoss, MaskedTokenLoss, info_nce, koleo, random_patch_mask, sensor_gap
from ..model import XStarsBase
from .config import TrainConfig
from .heads import DINOHead
from .monitors import cls_spread

__all__ = [
    "DINONet", "DINOTerm", "cross_sensor_terms", "dino_loss", "dino_parts", "dino_term", "ibot_key", "mean_terms",
    "monitor_scalars", "spread_terms", "total_loss",
]


class DINONet(nn.Module):
    """An encoder plus its DINO head; ``forward`` gives head outputs of the CLS token and the
    encoder's tokens (B x T x D), which MSAD reuses when its view is a DINO view. With
    ``mask_token``, a learnt D-vector that replaces masked patch embeddings (iBOT); it belongs
    to the training network, not to the encoder that is saved."""

    def __init__(self, encoder: XStarsBase, head: DINOHead, mask_token: bool = False) -> None:
        super().__init__()
        self.encoder, self.head = encoder, head
        self.mask_token = nn.Parameter(torch.zeros(encoder.embed_dim)) if mask_token else None

    def forward(self, x: torch.Tensor, sensor: str) -> tuple[torch.Tensor, torch.Tensor]:
        logits, tokens, _ = self.forward_with_bottleneck(x, sensor)
        return logits, tokens

    def forward_with_bottleneck(
        self, x: torch.Tensor, sensor: str, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Head logits, tokens, and the head's normalised bottleneck of the CLS token; ``mask``
        (B x N booleans over the patch tokens, row-major) replaces those patch embeddings by the
        mask token before the position embedding is added."""
        with self._masked(mask):
            tokens = self.encoder(x, sensor)
        bottleneck = self.head.project(tokens[:, 0])
        return self.head.last_layer(bottleneck), tokens, bottleneck

    @contextmanager
    def _masked(self, mask: torch.Tensor | None) -> Iterator[None]:
        if mask is None:
            yield
            return
        if self.mask_token is None:
            raise InvalidOptionError(
                "This DINONet has no mask token: build it with mask_token=True to mask patches.", field="mask"
            )
        token = self.mask_token

        def replace(module: nn.Module, inputs: tuple, embedded: torch.Tensor) -> torch.Tensor:
            # The patch embedding gives B x h x w x D (timm's dynamic image size) or B x N x D.
            return torch.where(mask.view(embedded.shape[:-1]).unsqueeze(-1), token.to(embedded.dtype), embedded)

        handle = self.encoder.trunk.patch_embed.register_forward_hook(replace)
        try:
            yield
        finally:
            handle.remove()


class DINOTerm(NamedTuple):
    """What :func:`dino_term` computes for one sensor."""

    loss: torch.Tensor  # DINO loss of one sensor
    tokens: torch.Tensor  # student tokens of the first global view, B x T x D
    cls: torch.Tensor  # student CLS of every global view, n_global x B x D
    bottleneck: torch.Tensor  # the DINO head's normalised bottleneck of those, n_global x B x bottleneck
    head_out: torch.Tensor  # student head logits of the first global view, B x K
    masked: torch.Tensor | None = None  # iBOT masked-token loss, when asked for


def dino_term(
    student: DINONet, teacher: DINONet, loss: DINOLoss, views: Sequence[torch.Tensor], sensor: str, n_global: int,
    step: int, masked: tuple[MaskedTokenLoss, tuple[float, float]] | None = None,
) -> DINOTerm:
    """DINO for one sensor: the teacher sees the global views, the student every view. Views of
    one size go through the network in a single batch.

    With ``masked`` = (iBOT loss, mask ratio), the student's global views after the first have a
    random fraction (within the ratio's bounds) of their patches masked, and at those positions
    the student's patch tokens must match the teacher's of the whole view (the shared DINO head
    on both). The first view stays whole: MSAD, the anchor and the monitors use its tokens."""
    global_views = torch.cat(list(views[:n_global]))
    batch = len(views[0])
    with torch.no_grad():
        teacher_out, teacher_tokens = teacher(global_views, sensor)
    prefix = student.encoder.trunk.num_prefix_tokens
    mask: torch.Tensor | None = None
    if masked is not None:
        if n_global < 2:
            raise InvalidOptionError(
                "The iBOT term masks the global views after the first: it needs n_global >= 2.", field="n_global"
            )
        mask = torch.zeros(len(global_views), teacher_tokens.shape[1] - prefix, dtype=torch.bool, device=global_views.device)
        mask[batch:] = random_patch_mask(len(global_views) - batch, mask.shape[1], masked[1], device=mask.device)
    student_global, tokens, bottleneck = student.forward_with_bottleneck(global_views, sensor, mask)
    student_out = [student_global]
    if len(views) > n_global:
        student_out.append(student(torch.cat(list(views[n_global:])), sensor)[0])
    masked_loss = None
    if masked is not None and mask is not None:
        image, position = mask.nonzero(as_tuple=True)
        with torch.no_grad():
            target = teacher.head(teacher_tokens[image, prefix + position])
        masked_loss = masked[0](student.head(tokens[image, prefix + position]), target, image, step)
    cls = tokens[:, 0].unflatten(0, (n_global, batch))
    return DINOTerm(
        loss(torch.cat(student_out), teacher_out, step), tokens[:batch], cls,
        bottleneck.unflatten(0, (n_global, batch)), student_global[:batch], masked_loss,
    )


def spread_terms(term: DINOTerm, config: TrainConfig, contrast_views: bool = True) -> dict[str, torch.Tensor]:
    """KoLeo on each global view's batch, and (with ``contrast_views``) InfoNCE between the first
    two global views (on the DINO head's bottleneck ``term.bottleneck``, n_global x B x E, where
    spreading the batch also spreads the teacher's prototype scores), and the iBOT term; only the
    terms whose weight is > 0."""
    embeddings = term.bottleneck
    terms = {}
    if config.dino.koleo_weight > 0:
        terms["koleo"] = torch.stack([koleo(view) for view in embeddings]).mean()
    if contrast_views and config.contrast.weight > 0 and len(embeddings) > 1:
        terms["contrast"] = info_nce(embeddings[0], embeddings[1], config.contrast.temperature)
    if term.masked is not None:
        terms["ibot"] = term.masked
    return terms


def cross_sensor_terms(tokens_a: torch.Tensor, tokens_b: torch.Tensor, config: TrainConfig) -> dict[str, torch.Tensor]:
    """Terms between two sensors' tokens of the same footprints (B x T x D each, CLS first):
    InfoNCE between their CLS tokens and the gap between their embedding distributions (CLS and
    mean patch token); only the terms whose weight is > 0."""
    terms = {}
    if config.contrast.weight > 0:
        terms["contrast"] = info_nce(tokens_a[:, 0], tokens_b[:, 0], config.contrast.temperature)
    if config.contrast.gap_weight > 0:
        terms["gap"] = sensor_gap(tokens_a[:, 0], tokens_b[:, 0]) + sensor_gap(tokens_a[:, 1:].mean(1), tokens_b[:, 1:].mean(1))
    return terms


def dino_parts(encoder: XStarsBase, config: TrainConfig, sensors: Sequence[str]) -> tuple[DINONet, DINONet, nn.ModuleDict]:
    """Student, teacher and one DINO loss per entry of ``sensors``: each keeps its own centre, as
    each sensor's teacher outputs have their own mean (a shared centre would be moved by one
    sensor's batch before centring the next one's). With ``config.ibot.weight`` > 0, the
    student has a mask token and each sensor an iBOT loss too, under :func:`ibot_key`."""
    head = DINOHead(encoder.embed_dim, config.dino.out_dim, bottleneck_dim=config.dino.bottleneck)
    student = DINONet(encoder, head, mask_token=config.ibot.weight > 0)
    teacher = copy.deepcopy(student)
    teacher.requires_grad_(False)
    losses = nn.ModuleDict({s: dino_loss(config, config.crops.n_global) for s in sensors})
    if config.ibot.weight > 0:
        losses.update({ibot_key(s): MaskedTokenLoss(config.dino.out_dim, **_temperatures(config)) for s in sensors})
    return student, teacher, losses


def ibot_key(sensor: str) -> str:
    """Where :func:`dino_parts` keeps ``sensor``'s iBOT loss."""
    return f"ibot_{sensor}"


def _temperatures(config: TrainConfig) -> dict[str, Any]:
    dino = config.dino
    return {
        "student_temp": dino.student_temp,
        "teacher_temp": dino.teacher_temp,
        "warmup_teacher_temp": dino.warmup_teacher_temp,
        "warmup_teacher_temp_steps": dino.warmup_teacher_temp_steps,
    }


def dino_loss(config: TrainConfig, n_global: int, skip_same_view: bool = True) -> DINOLoss:
    """A DINO loss with ``config``'s prototypes and temperatures for ``n_global`` teacher views."""
    return DINOLoss(out_dim=config.dino.out_dim, n_global=n_global, skip_same_view=skip_same_view, **_temperatures(config))


def total_loss(
    dino: torch.Tensor, msad: torch.Tensor, spread: dict[str, torch.Tensor], config: TrainConfig
) -> tuple[torch.Tensor, dict[str, float]]:
    """``DINO + msad.alpha * MSAD + dino.koleo_weight * KoLeo + contrast.weight * InfoNCE
    + contrast.gap_weight * gap + anchor.weight * anchor + ibot.weight * iBOT`` and the terms."""
    weights = {
        "koleo": config.dino.koleo_weight, "contrast": config.contrast.weight, "gap": config.contrast.gap_weight,
        "anchor": config.anchor.weight, "ibot": config.ibot.weight,
    }
    total = dino + config.msad.alpha * msad + sum(weights[k] * v for k, v in spread.items())
    scalars = {"dino": float(dino.detach()), "msad": float(msad.detach())}
    return total, {**scalars, **{k: float(v.detach()) for k, v in spread.items()}}


def monitor_scalars(dino: DINOLoss, cls: torch.Tensor) -> dict[str, float]:
    """The per-step collapse monitors: teacher entropies of ``dino``'s last call and the spread
    of the student's CLS embeddings ``cls`` (B x D)."""
    return {**dino.stats, "cls_spread": cls_spread(cls)}


def mean_terms(per_sensor: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The mean over sensors of each spread term (every sensor has the same terms)."""
    return {k: torch.stack([terms[k] for terms in per_sensor]).mean() for k in per_sensor[0]}
