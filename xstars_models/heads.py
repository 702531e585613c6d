"""Projection heads used only during training (never saved with a model)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

__all__ = ["DINOHead", "ProjectionHead"]


class DINOHead(nn.Module):
    """DINO's head: a 3-layer MLP to an L2-normalised bottleneck, then a weight-normalised linear
    layer to ``out_dim`` prototypes whose norm is fixed to 1 (Caron et al. 2021)."""

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
        magnitude = self.last_layer.parametrizations.weight.original0
        with torch.no_grad():
            magnitude.fill_(1.0)
        magnitude.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))


class ProjectionHead(nn.Module):
    """``LayerNorm(p + Dropout(fc(GELU(p))))`` with ``p = Linear(x)``: the MSAD projection."""

    def __init__(self, in_dim: int, width: int = 256, dropout: float = 0.1) -> None:
        super().__init__()
        self.proj = nn.Linear(in_dim, width)
        self.fc = nn.Linear(width, width)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        projected = self.proj(x)
        return self.norm(projected + self.dropout(self.fc(F.gelu(projected))))
