"""The DINO head, used only during training (never saved with a model)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

__all__ = ["DINOHead"]


class DINOHead(nn.Module):
    """DINO's head (Caron et al. 2021): a 3-layer GELU MLP to an L2-normalised bottleneck, then a
    weight-normalised linear layer to ``out_dim`` prototypes.

    The weight-norm magnitude of the last layer is fixed to 1 (DINO's ``norm_last_layer``): the
    prototypes stay unit vectors, so the logits are cosine similarities and the student
    temperature alone sets their scale, which stabilises training.

    Args:
        in_dim: input width (the encoder's CLS width D).
        out_dim: number of prototypes K (65536 in DINO).
        hidden_dim: width of the two hidden layers.
        bottleneck_dim: width of the normalised bottleneck.
    """

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim), nn.GELU(),
            nn.Linear(hidden_dim, hidden_dim), nn.GELU(),
            nn.Linear(hidden_dim, bottleneck_dim),
        )
        for layer in self.mlp:
            if isinstance(layer, nn.Linear):
                nn.init.trunc_normal_(layer.weight, std=0.02)
                nn.init.zeros_(layer.bias)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        magnitude = self.last_layer.parametrizations.weight.original0  # out_dim x 1
        with torch.no_grad():
            magnitude.fill_(1.0)
        magnitude.requires_grad_(False)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ... x in_dim -> the L2-normalised bottleneck ... x bottleneck_dim."""
        return F.normalize(self.mlp(x), dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ... x in_dim -> logits ... x out_dim."""
        return self.last_layer(self.project(x))
