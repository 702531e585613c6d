"""What one training step computes, shared by the recipes: the student/teacher network with its
DINO head, the DINO term of one sensor, the anti-collapse terms (KoLeo, InfoNCE), the weighted
total, and the per-step collapse monitors."""

from __future__ import annotations

import copy
from typing import NamedTuple, Sequence

import torch
from torch import nn

from ..heads import DINOHead
from ..losses import DINOLoss, info_nce, koleo, sensor_gap
from ..model import XStars
from .config import TrainConfig
from .monitors import cls_spread

__all__ = [
    "DINONet", "DINOTerm", "cross_sensor_terms", "dino_loss", "dino_parts", "dino_term", "mean_terms", "monitor_scalars",
    "spread_terms", "total_loss",
]


class DINONet(nn.Module):
    """An encoder plus its DINO head; ``forward`` gives head outputs of the CLS token and the
    encoder's tokens (B x T x D), which MSAD reuses when its view is a DINO view."""

    def __init__(self, encoder: XStars, head: DINOHead) -> None:
        super().__init__()
        self.encoder, self.head = encoder, head

    def forward(self, x: torch.Tensor, sensor: str) -> tuple[torch.Tensor, torch.Tensor]:
        logits, tokens, _ = self.forward_with_bottleneck(x, sensor)
        return logits, tokens

    def forward_with_bottleneck(self, x: torch.Tensor, sensor: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Head logits, tokens, and the head's normalised bottleneck of the CLS token."""
        tokens = self.encoder(x, sensor)
        bottleneck = self.head.project(tokens[:, 0])
        return self.head.last_layer(bottleneck), tokens, bottleneck


class DINOTerm(NamedTuple):
    """What :func:`dino_term` computes for one sensor."""

    loss: torch.Tensor  # DINO loss of one sensor
    tokens: torch.Tensor  # student tokens of the first global view, B x T x D
    cls: torch.Tensor  # student CLS of every global view, n_global x B x D
    bottleneck: torch.Tensor  # the DINO head's normalised bottleneck of those, n_global x B x bottleneck
    head_out: torch.Tensor  # student head logits of the first global view, B x K


def dino_term(
    student: DINONet, teacher: DINONet, loss: DINOLoss, views: Sequence[torch.Tensor], sensor: str, n_global: int, step: int
) -> DINOTerm:
    """DINO for one sensor: the teacher sees the global views, the student every view. Views of
    one size go through the network in a single batch."""
    global_views = torch.cat(list(views[:n_global]))
    batch = len(views[0])
    with torch.no_grad():
        teacher_out, _ = teacher(global_views, sensor)
    student_global, tokens, bottleneck = student.forward_with_bottleneck(global_views, sensor)
    student_out = [student_global]
    if len(views) > n_global:
        student_out.append(student(torch.cat(list(views[n_global:])), sensor)[0])
    cls = tokens[:, 0].unflatten(0, (n_global, batch))
    return DINOTerm(
        loss(torch.cat(student_out), teacher_out, step), tokens[:batch], cls,
        bottleneck.unflatten(0, (n_global, batch)), student_global[:batch],
    )


def spread_terms(embeddings: torch.Tensor, config: TrainConfig) -> dict[str, torch.Tensor]:
    """KoLeo on each global view's batch, and InfoNCE between the first two global views
    (``embeddings``: n_global x B x E, the DINO head's bottleneck, where spreading the batch
    also spreads the teacher's prototype scores); only the terms whose weight is > 0."""
    terms = {}
    if config.koleo_weight > 0:
        terms["koleo"] = torch.stack([koleo(view) for view in embeddings]).mean()
    if config.contrast_weight > 0 and len(embeddings) > 1:
        terms["contrast"] = info_nce(embeddings[0], embeddings[1], config.contrast_temp)
    return terms


def cross_sensor_terms(tokens_a: torch.Tensor, tokens_b: torch.Tensor, config: TrainConfig) -> dict[str, torch.Tensor]:
    """Terms between two sensors' tokens of the same footprints (B x T x D each, CLS first):
    InfoNCE between their CLS tokens and the gap between their embedding distributions (CLS and
    mean patch token); only the terms whose weight is > 0."""
    terms = {}
    if config.contrast_weight > 0:
        terms["contrast"] = info_nce(tokens_a[:, 0], tokens_b[:, 0], config.contrast_temp)
    if config.gap_weight > 0:
        terms["gap"] = sensor_gap(tokens_a[:, 0], tokens_b[:, 0]) + sensor_gap(tokens_a[:, 1:].mean(1), tokens_b[:, 1:].mean(1))
    return terms


def dino_parts(encoder: XStars, config: TrainConfig, sensors: Sequence[str]) -> tuple[DINONet, DINONet, nn.ModuleDict]:
    """Student, teacher and one DINO loss per entry of ``sensors``: each keeps its own centre, as
    each sensor's teacher outputs have their own mean (a shared centre would be moved by one
    sensor's batch before centring the next one's)."""
    head = DINOHead(encoder.embed_dim, config.dino_out_dim, bottleneck_dim=config.dino_bottleneck)
    student = DINONet(encoder, head)
    teacher = copy.deepcopy(student)
    teacher.requires_grad_(False)
    losses = nn.ModuleDict({s: dino_loss(config, config.global_crops) for s in sensors})
    return student, teacher, losses


def dino_loss(config: TrainConfig, n_global: int, skip_same_view: bool = True) -> DINOLoss:
    return DINOLoss(
        out_dim=config.dino_out_dim,
        n_global=n_global,
        student_temp=config.student_temp,
        teacher_temp=config.teacher_temp,
        warmup_teacher_temp=config.warmup_teacher_temp,
        warmup_teacher_temp_steps=config.warmup_teacher_temp_steps,
        skip_same_view=skip_same_view,
    )


def total_loss(
    dino: torch.Tensor, msad: torch.Tensor, spread: dict[str, torch.Tensor], config: TrainConfig
) -> tuple[torch.Tensor, dict[str, float]]:
    """``DINO + alpha * MSAD + koleo_weight * KoLeo + contrast_weight * InfoNCE + gap_weight * gap
    + anchor_weight * anchor`` and the terms."""
    weights = {
        "koleo": config.koleo_weight, "contrast": config.contrast_weight, "gap": config.gap_weight,
        "anchor": config.anchor_weight,
    }
    total = dino + config.alpha * msad + sum(weights[k] * v for k, v in spread.items())
    scalars = {"dino": float(dino.detach()), "msad": float(msad.detach())}
    return total, {**scalars, **{k: float(v.detach()) for k, v in spread.items()}}


def monitor_scalars(dino: DINOLoss, cls: torch.Tensor) -> dict[str, float]:
    """The per-step collapse monitors: teacher entropies of ``dino``'s last call and the spread
    of the student's CLS embeddings ``cls`` (B x D)."""
    return {**dino.stats, "cls_spread": cls_spread(cls)}


def mean_terms(per_sensor: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The mean over sensors of each spread term (every sensor has the same terms)."""
    return {k: torch.stack([terms[k] for terms in per_sensor]).mean() for k in per_sensor[0]}
