"""Blending overlapping tiles into one token grid: the running weighted sums over the token rows a
strip of tiles touches, shared by the scene's feature map (:class:`~.writers.MapWriter`) and a
collection block's piece of it (:class:`~.maprows.MapRows`), so that both add the same numbers in
the same order and their maps agree to the bit."""

from __future__ import annotations

import numpy as np
import torch

from .tiling import Plan, ramps

__all__ = ["TokenBlend"]


class TokenBlend:
    """Weighted sums of the tokens of the tiles added so far, over the scene's token rows
    ``[base, base + th)`` at full width (``th``: a tile's height in tokens): the only rows still
    changing while strips of tiles are added top to bottom. Each tile's tokens are weighted by the
    linear ramps across its overlaps (:func:`.tiling.ramps`); a token whose pixels are all missing
    gets no weight, so a row no tile covered divides 0 by 0: NaN."""

    def __init__(self, plan: Plan, dim: int, prefix: int, device: torch.device, base: int = 0) -> None:
        th, tw = plan.tile_tokens
        width = plan.grid_tokens[1]
        self.plan, self.dim, self.prefix, self.base = plan, dim, prefix, base
        self.row_w = [torch.from_numpy(w).to(device) for w in ramps(plan.row_starts, th)]
        self.col_w = torch.from_numpy(np.stack(ramps(plan.col_starts, tw))).to(device)  # tiles x tw
        # Scene token column of each token column of each tile in a tile-row: tiles x tw.
        self.col_index = (torch.tensor(plan.col_starts)[:, None] + torch.arange(tw)).to(device)
        self.acc = torch.zeros(th, width, dim, device=device)
        self.wsum = torch.zeros(th, width, device=device)
        self.token_missing = torch.zeros(th, width, device=device)

    def begin_strip(self, token_missing: torch.Tensor, tile_missing: np.ndarray) -> None:
        """Missing-pixel fractions of the strip's tokens (th x scene width) and tiles."""
        self.token_missing = token_missing

    def add(self, strip: int, cols: list[int], tokens: torch.Tensor) -> None:
        """Add the final tokens (B x (prefix + h*w) x D) of tiles ``cols`` of tile-row ``strip``."""
        th, tw = self.plan.tile_tokens
        picked = torch.tensor(cols, device=self.col_w.device)
        # The whole batch in one scatter-add over scene columns (overlapping tiles accumulate),
        # rather than a handful of small tensor operations per tile.
        index = self.col_index[picked].reshape(-1)  # B*tw
        features = tokens[:, self.prefix :].reshape(len(cols), th, tw, self.dim)
        features = features.permute(1, 0, 2, 3).reshape(th, -1, self.dim)  # th x B*tw x D
        weight = self.row_w[strip][:, None] * self.col_w[picked].reshape(1, -1)  # th x B*tw
        weight = weight * (self.token_missing[:, index] < 1)
        self.acc.index_add_(1, index, features * weight[..., None])
        self.wsum.index_add_(1, index, weight)

    def next_row(self, strip: int) -> int:
        """The scene's first token row a strip after ``strip`` touches (past the last strip: the
        grid's height): the rows above it are final once ``strip`` is added."""
        starts = self.plan.row_starts
        return starts[strip + 1] if strip + 1 < len(starts) else self.plan.grid_tokens[0]

    def blended(self, rows: slice) -> np.ndarray:
        """The blended features of the band's ``rows`` (band-relative), as D x rows x width
        float32 (0 / 0 -> NaN: tokens no embedded tile covered)."""
        return (self.acc[rows] / self.wsum[rows, :, None]).permute(2, 0, 1).float().cpu().numpy()

    def advance(self, strip: int) -> int:
        """Drop the rows that are final after ``strip`` and move the band down to the next
        strip's first row; returns how many band rows are kept (what the next strip adds to)."""
        nxt = self.next_row(strip)
        done = nxt - self.base
        kept = self.plan.tile_tokens[0] - done
        self.acc[:kept] = self.acc[done:].clone()
        self.wsum[:kept] = self.wsum[done:].clone()
        self.acc[kept:] = 0
        self.wsum[kept:] = 0
        self.base = nxt
        return kept
