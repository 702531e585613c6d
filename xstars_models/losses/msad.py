"""MSAD (Multi-Sensor Alignment Dense): a CLIP-style symmetric contrastive loss with soft targets,
applied at every token position at once (``shared/docs/method.md``)."""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..distributed import all_gather_with_grad, rank
from ..heads import ProjectionHead

__all__ = ["MSADLoss"]


class MSADLoss(nn.Module):
    """Aligns the tokens of two sensors seeing the same footprints, position by position.

    For each position i, with ``e_A = h_A(g(z_A[:, i]))`` and ``e_B = h_B(g(z_B[:, i]))``
    (B x E each): logits ``L = e_B e_A^T / tau``, soft targets
    ``T = softmax((e_A e_A^T + e_B e_B^T) / (2 tau))`` (row-wise, smoothed by ``label_smoothing``),
    ``loss_i = (CE(L, T) + CE(L^T, T^T)) / 2``; the loss is the mean over positions. All
    positions are one batched (N x B x B) computation.

    Under ``torch.distributed`` the embeddings of every rank are gathered (with gradients): each
    rank scores its own rows of ``L`` and of ``L^T`` against all columns, with targets taken from
    the rows / columns of the global ``T``. The mean of the ranks' losses equals the
    single-process loss on the whole batch.

    Args:
        embed_dim: token width D of the encoder.
        sensors: names of the sensors to hold a projection head for.
        width: projection width (official 1024).
        temperature: tau (initial value when learnable).
        learnable_temperature: optimise log(tau), clamped to [0.01, 1].
        normalize: L2-normalise embeddings before the dot products.
        label_smoothing: mixes the targets with the uniform distribution.
        include_cls: whether position 0 (the CLS token) is aligned too; ``z`` always holds it.
        dropout: in the projection heads.
    """

    def __init__(
        self,
        embed_dim: int,
        sensors: Sequence[str],
        width: int = 256,
        temperature: float = 0.1,
        learnable_temperature: bool = True,
        normalize: bool = True,
        label_smoothing: float = 0.1,
        include_cls: bool = True,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}.")
        if not 0 <= label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}.")
        self.width, self.dropout_p = width, dropout
        self.shared = ProjectionHead(embed_dim, width, dropout)
        self.sensor_heads = nn.ModuleDict({s: ProjectionHead(width, width, dropout) for s in sensors})
        log_tau = torch.tensor(math.log(temperature))
        if learnable_temperature:
            self.log_tau = nn.Parameter(log_tau)
        else:
            self.register_buffer("log_tau", log_tau)
        self.normalize, self.label_smoothing, self.include_cls = normalize, label_smoothing, include_cls

    @classmethod
    def reference(cls, embed_dim: int, sensors: Sequence[str], width: int = 1024) -> MSADLoss:
        """The official setting (tau = 1, no L2 normalisation, label smoothing 0.3, CLS included),
        with the soft targets divided by tau as the definition says (the official code
        multiplies; the two agree at tau = 1)."""
        return cls(
            embed_dim, sensors, width=width, temperature=1.0, learnable_temperature=False,
            normalize=False, label_smoothing=0.3, include_cls=True,
        )

    def add_sensor(self, sensor: str) -> None:
        self.sensor_heads[sensor] = ProjectionHead(self.width, self.width, self.dropout_p).to(self.log_tau.device)

    @property
    def temperature(self) -> torch.Tensor:
        return self.log_tau.clamp(math.log(0.01), 0.0).exp()

    def embed(self, z: torch.Tensor, sensor: str) -> torch.Tensor:
        """Tokens B x (1 + N) x D -> projected embeddings N' x B x E (position-major)."""
        if sensor not in self.sensor_heads:
            raise ValueError(f"MSADLoss has no projection head for sensor {sensor!r}; it has {list(self.sensor_heads)}.")
        if not self.include_cls:
            z = z[:, 1:]
        e = self.sensor_heads[sensor](self.shared(z)).transpose(0, 1)
        return F.normalize(e, dim=-1) if self.normalize else e

    def forward(self, z_a: torch.Tensor, z_b: torch.Tensor, sensor_a: str, sensor_b: str) -> torch.Tensor:
        """``z_a``, ``z_b``: B x (1 + N) x D tokens (CLS first) of the same footprints."""
        if z_a.shape[:2] != z_b.shape[:2]:
            raise ValueError(
                f"MSAD needs the same batch and token grid for both sensors: {sensor_a} gives "
                f"{tuple(z_a.shape)}, {sensor_b} gives {tuple(z_b.shape)}. Choose patch sizes so tokens "
                "cover the same ground and crop both images to the same footprint."
            )
        e_a, e_b = self.embed(z_a, sensor_a), self.embed(z_b, sensor_b)  # N x b x E
        local = e_a.shape[1]
        all_a = all_gather_with_grad(e_a.transpose(0, 1)).transpose(0, 1)  # N x B x E
        all_b = all_gather_with_grad(e_b.transpose(0, 1)).transpose(0, 1)
        offset = rank() * local
        tau = self.temperature
        similarity = (all_a @ all_a.transpose(1, 2) + all_b @ all_b.transpose(1, 2)) / (2 * tau)
        targets = similarity.softmax(dim=-1)  # N x B x B, rows sum to 1
        if self.label_smoothing:
            targets = (1 - self.label_smoothing) * targets + self.label_smoothing / targets.shape[-1]
        rows = targets[:, offset : offset + local]  # T for our rows of L
        cols = targets[:, :, offset : offset + local].transpose(1, 2)  # T^T for our rows of L^T
        logits_b_a = e_b @ all_a.transpose(1, 2) / tau  # our rows of L
        logits_a_b = e_a @ all_b.transpose(1, 2) / tau  # our rows of L^T
        loss_b = -(rows * logits_b_a.log_softmax(dim=-1)).sum(-1)
        loss_a = -(cols * logits_a_b.log_softmax(dim=-1)).sum(-1)
        return ((loss_a + loss_b) / 2).mean()
