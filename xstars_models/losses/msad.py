"""MSAD (Multi-Sensor Alignment Dense): a CLIP-style symmetric contrastive loss with soft targets,
applied at every token position at once (``docs/method.md``)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..distributed import all_gather_with_grad
from ..errors import InvalidInputError, InvalidOptionError

__all__ = ["MSADLoss", "ProjectionHead"]


class ProjectionHead(nn.Module):
    """The MSAD projection: ``LayerNorm(p + Dropout(fc(GELU(p))))`` with ``p = proj(x)``.

    Args:
        in_dim: input width.
        width: output width (1024 in the official code).
        dropout: on the residual branch (0.2 in the official code).
    """

    def __init__(self, in_dim: int, width: int = 256, dropout: float = 0.1) -> None:
        super().__init__()
        self.proj = nn.Linear(in_dim, width)
        self.fc = nn.Linear(width, width)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ... x in_dim -> ... x width (any leading shape, projected with one matmul)."""
        projected = self.proj(x)
        return self.norm(projected + self.dropout(self.fc(F.gelu(projected))))


class MSADLoss(nn.Module):
    """Aligns the tokens of two sensors seeing the same footprints, position by position.

    For each token position i, with ``e_A = h_A(g(z_A[:, i]))`` and ``e_B = h_B(g(z_B[:, i]))``
    (B x E each; ``g`` shared, ``h_A``/``h_B`` per sensor; optionally L2-normalised):

    - logits ``L = e_B e_A^T / tau`` (B x B),
    - soft targets ``T = softmax_rows((e_A e_A^T + e_B e_B^T) / (2 tau))`` (divided by tau, as
      the definition says; the official code multiplies, which agrees only at tau = 1),
    - ``loss_i = (CE(L, T) + CE(L^T, T^T)) / 2``, each CE averaged over its B rows, with label
      smoothing ``T <- (1 - eps) T + eps / B`` (``nn.CrossEntropyLoss`` semantics),

    and the loss is the mean of ``loss_i`` over positions. All positions are one batched
    (N x B x B) computation. The targets are not detached (as in the definition).

    Distributed (``torch.distributed`` initialised, world size W, local batch b, global batch
    B = W b, the same b on every rank): the embeddings of all ranks are gathered with gradients,
    in rank order, so rank r owns the global rows ``R = [r b, (r + 1) b)``. Rank r computes

    - its rows of ``L``: ``e_B[R] e_A^T / tau`` (b x B, negatives from every rank),
    - its rows of ``L^T``: ``e_A[R] e_B^T / tau``,
    - its rows of ``S = (e_A e_A^T + e_B e_B^T) / (2 tau)`` (b x B), so its rows of ``T`` are
      ``softmax(S[R])``; the rows of ``T^T`` it needs are columns of ``T``, which need every
      row's normaliser: ``T[k, j] = exp(S[k, j] - lse_k) = exp(S[j, k] - lse_k)`` because ``S``
      is symmetric, so each rank gathers the row log-sum-exps ``lse`` (W b values per position,
      with gradients) instead of computing the whole B x B target matrix,

    and returns the mean CE over positions and its b rows of both directions. The mean of the
    ranks' losses is exactly the single-process loss on the global batch, and with gradients
    averaged over ranks (``all_gather_with_grad`` sums the ranks' contributions to each local
    embedding) it has the same gradient. With W = 1 every gather is the identity and the
    formulas above are the single-process definition.

    Args:
        embed_dim: token width D of the encoder.
        sensors: names of the sensors to hold a projection head for.
        width: projection width E (official 1024).
        temperature: tau (initial value when learnable).
        learnable_temperature: optimise log(tau), clamped to ``temperature_range``.
        temperature_range: bounds of a learnable tau (lower bound 0.01 as CLIP's logit scale 100).
        normalize: L2-normalise embeddings before the dot products.
        label_smoothing: eps, mixes the targets with the uniform distribution.
        has_cls: ``z`` carries a CLS token at index 0 (the encoder's layout).
        include_cls: align the CLS token too (only when ``has_cls``).
        dropout: in the projection heads.
    """

    def __init__(
        self,
        embed_dim: int,
        sensors: Sequence[str],
        width: int = 256,
        temperature: float = 0.1,
        learnable_temperature: bool = True,
        temperature_range: tuple[float, float] = (0.01, 1.0),
        normalize: bool = True,
        label_smoothing: float = 0.1,
        has_cls: bool = True,
        include_cls: bool = True,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if isinstance(sensors, str):  # a string would give one head per character; a wrong type is a TypeError
            raise TypeError(f"sensors must be a sequence of sensor names, got the string {sensors!r}.")
        low, high = temperature_range
        if temperature <= 0 or (learnable_temperature and not 0 < low <= temperature <= high):
            raise InvalidOptionError(
                f"temperature must be > 0 (and within {temperature_range} when learnable), got {temperature}.",
                field="temperature",
            )
        if not 0 <= label_smoothing < 1:
            raise InvalidOptionError(f"label_smoothing must be in [0, 1), got {label_smoothing}.", field="label_smoothing")
        self.width, self.dropout_p = width, dropout
        self.normalize, self.label_smoothing = normalize, label_smoothing
        self.has_cls, self.include_cls = has_cls, include_cls
        self.learnable_temperature = learnable_temperature
        self.log_tau_range = (math.log(low), math.log(high))
        self.shared = ProjectionHead(embed_dim, width, dropout)
        self.sensor_heads = nn.ModuleDict({s: ProjectionHead(width, width, dropout) for s in sensors})
        log_tau = torch.tensor(math.log(temperature))
        if learnable_temperature:
            self.log_tau = nn.Parameter(log_tau)
        else:
            self.register_buffer("log_tau", log_tau)

    @classmethod
    def reference(cls, embed_dim: int, sensors: Sequence[str], width: int = 1024, has_cls: bool = True) -> MSADLoss:
        """The official setting: tau = 1 (fixed), no L2 normalisation, label smoothing 0.3, CLS
        included, 1024-wide heads with dropout 0.2. Its value is the per-position definition
        with the targets divided by tau, which equals the official value since tau = 1."""
        return cls(
            embed_dim, sensors, width=width, temperature=1.0, learnable_temperature=False,
            normalize=False, label_smoothing=0.3, has_cls=has_cls, include_cls=True, dropout=0.2,
        )

    def add_sensor(self, sensor: str) -> None:
        """Add a fresh projection head for a new sensor (e.g. in continual pretraining)."""
        if sensor in self.sensor_heads:
            raise InvalidOptionError(f"MSADLoss already has a projection head for sensor {sensor!r}.", field="sensor")
        reference = self.shared.proj.weight
        head = ProjectionHead(self.width, self.width, self.dropout_p)
        self.sensor_heads[sensor] = head.to(device=reference.device, dtype=reference.dtype)

    @property
    def temperature(self) -> torch.Tensor:
        """tau as a 0-d tensor (differentiable when learnable)."""
        if self.learnable_temperature:
            return self.log_tau.clamp(*self.log_tau_range).exp()
        return self.log_tau.exp()

    def embed(self, z: torch.Tensor, sensor: str) -> torch.Tensor:
        """Tokens b x T x D -> embeddings b x N x E of the aligned positions, every token
        projected by one matmul per layer."""
        if sensor not in self.sensor_heads:
            raise InvalidOptionError(
                f"MSADLoss has no projection head for sensor {sensor!r}; it has {list(self.sensor_heads)}.", field="sensor"
            )
        if self.has_cls and not self.include_cls:
            z = z[:, 1:]
        e = self.sensor_heads[sensor](self.shared(z))
        return F.normalize(e, dim=-1) if self.normalize else e

    def forward(self, z_a: torch.Tensor, z_b: torch.Tensor, sensor_a: str, sensor_b: str) -> torch.Tensor:
        """``z_a``, ``z_b``: b x T x D tokens of the same b footprints on the same token grid
        (T = N patch tokens, plus the CLS token first when ``has_cls``). Returns the 0-d loss."""
        if z_a.dim() != 3 or z_a.shape[:2] != z_b.shape[:2]:
            raise InvalidInputError(
                f"MSAD needs the same batch and token grid for both sensors: {sensor_a} gives "
                f"{tuple(z_a.shape)}, {sensor_b} gives {tuple(z_b.shape)}. Choose patch sizes so tokens "
                "cover the same ground and crop both images to the same footprint.",
                field="z_a" if z_a.dim() != 3 else "z_b",
            )
        e_a, e_b = self.embed(z_a, sensor_a), self.embed(z_b, sensor_b)
        # The heads may run under bf16 autocast, but the B x B part stays in (at least) float32:
        # logits divided by a small tau would amplify bf16 rounding, and it is cheap.
        dtype = torch.promote_types(e_a.dtype, torch.float32)
        with torch.autocast(e_a.device.type, enabled=False):
            return self._soft_clip(e_a.to(dtype), e_b.to(dtype))

    def _soft_clip(self, e_a: torch.Tensor, e_b: torch.Tensor) -> torch.Tensor:
        """``e_a``, ``e_b``: b x N x E local embeddings -> mean soft-target CLIP loss over the N
        positions and this rank's rows R (see the class docstring)."""
        tau = self.temperature
        mine_a, mine_b = e_a.transpose(0, 1), e_b.transpose(0, 1)  # N x b x E
        all_a = all_gather_with_grad(e_a).transpose(0, 1)  # N x B x E
        all_b = all_gather_with_grad(e_b).transpose(0, 1)
        sim = (mine_a @ all_a.mT + mine_b @ all_b.mT) / (2 * tau)  # S[R]: N x b x B
        lse_mine = sim.logsumexp(dim=-1)  # N x b
        lse = all_gather_with_grad(lse_mine.transpose(0, 1)).transpose(0, 1)  # N x B
        targets = (sim - lse_mine.unsqueeze(-1)).exp()  # T[R]
        targets_t = (sim - lse.unsqueeze(-2)).exp()  # T^T[R], by the symmetry of S
        logits = mine_b @ all_a.mT / tau  # L[R]
        logits_t = mine_a @ all_b.mT / tau  # L^T[R]
        return (self._cross_entropy(logits, targets) + self._cross_entropy(logits_t, targets_t)) / 2

    def _cross_entropy(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean soft-target CE over all N x b rows (N x b x B inputs), fused log-softmax."""
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(0, 1), label_smoothing=self.label_smoothing)

    def extra_repr(self) -> str:
        tau = f"{float(self.temperature.detach()):.3g}" + (" (learnable)" if self.learnable_temperature else "")
        return (
            f"width={self.width}, tau={tau}, normalize={self.normalize}, label_smoothing={self.label_smoothing}, "
            f"has_cls={self.has_cls}, include_cls={self.include_cls}"
        )
