"""The default ground footprint of a model's windows: one rule for ``adapt``'s pairs, ``eval``'s
pairs and the tiles of ``embed_scene``, so that they all cut the ground the model was trained on."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import InvalidOptionError

if TYPE_CHECKING:
    from ..model import XStarsBase

__all__ = ["default_footprint_m", "pretraining_grid"]


def pretraining_grid(model: XStarsBase) -> int:
    """Tokens per side of the trunk's position-embedding grid (timm's ``img_size / patch``): at
    this many tokens per side the position embeddings are used as trained, not interpolated."""
    return int(max(model.trunk.patch_embed.grid_size))


def default_footprint_m(model: XStarsBase, sensor: str, tokens: int | None = None) -> float:
    """Side in metres of a window of ``tokens`` tokens (default: :func:`pretraining_grid`) of the
    model's ``sensor``: ``tokens x patch size x GSD``. ``adapt`` passes its config's
    ``global_tokens``, so that each pair is one global crop of the old sensor."""
    if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1):
        raise InvalidOptionError(f"tokens must be a whole number >= 1, got {tokens!r}.", field="tokens")
    grid = pretraining_grid(model) if tokens is None else tokens
    return grid * model.check_sensor(sensor).token_ground_m
