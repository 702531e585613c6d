"""Terms on whole-image embeddings: two that keep a self-distillation run from collapsing at small
scale, the KoLeo regulariser of DINOv2 (spreads the embeddings of a batch) and a CLS-level InfoNCE
between two views (every other image of the batch is a negative), and one that closes the gap
between two sensors' embedding distributions."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import InvalidInputError

__all__ = ["info_nce", "koleo", "sensor_gap"]


def koleo(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Kozachenko-Leonenko entropy estimator as a loss (Sablayrolles et al. 2019, used by DINOv2):
    ``-mean_i log(min_{j != i} ||u_i - u_j||)`` over the L2-normalised rows ``u`` of ``x``
    (B x D, B >= 2). Minimising it pushes each embedding away from its nearest neighbour."""
    if x.dim() != 2 or x.shape[0] < 2:
        raise InvalidInputError(f"koleo needs a B x D batch with B >= 2, got {tuple(x.shape)}.", field="x")
    with torch.autocast(x.device.type, enabled=False):
        unit = F.normalize(x.float(), dim=-1)
        similarity = unit @ unit.T
        similarity.fill_diagonal_(-2.0)  # never one's own neighbour
        nearest = similarity.argmax(dim=1)
        distance = (unit - unit[nearest]).norm(dim=-1)
        return -(distance + eps).log().mean()


def info_nce(a: torch.Tensor, b: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Symmetric InfoNCE between row-paired embeddings ``a`` and ``b`` (B x D each): row i of
    ``a`` must pick row i of ``b`` among all B rows (cosine / ``temperature``) and back; the
    mean of the two cross-entropies, in nats (chance level ln B)."""
    if a.shape != b.shape or a.dim() != 2:
        raise InvalidInputError(
            f"info_nce needs two B x D batches of one shape, got {tuple(a.shape)} and {tuple(b.shape)}.",
            field="a" if a.dim() != 2 else "b",
        )
    with torch.autocast(a.device.type, enabled=False):
        logits = F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T / temperature
        target = torch.arange(a.shape[0], device=a.device)
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def sensor_gap(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared distance between the batch means of the L2-normalised rows of ``a`` and ``b``
    (B x D each, two sensors' embeddings of the same footprints), in [0, 4].

    InfoNCE between two sensors ranks each image's partner above the other images but leaves a
    constant offset between the sensors' embeddings (the "modality gap" of CLIP-style training);
    under the cosine similarity of cross-sensor retrieval that offset ranks images by how much
    they point along it rather than by content. This term pulls the two means together."""
    if a.shape != b.shape or a.dim() != 2:
        raise InvalidInputError(
            f"sensor_gap needs two B x D batches of one shape, got {tuple(a.shape)} and {tuple(b.shape)}.",
            field="a" if a.dim() != 2 else "b",
        )
    with torch.autocast(a.device.type, enabled=False):
        return (F.normalize(a.float(), dim=-1).mean(0) - F.normalize(b.float(), dim=-1).mean(0)).square().sum()
