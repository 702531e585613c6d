"""The package's one definition of a missing pixel, used by every reader (training pairs, whole
scenes): a pixel is missing when any of its bands is not finite (NaN or infinite values cannot be
digital numbers, whatever the file's nodata says), when every band equals the nodata value, or,
when asked, when every band is 0 (imagery whose black collar carries no nodata metadata)."""

from __future__ import annotations

import math

import numpy as np

from ..errors import InvalidInputError

__all__ = ["fill_missing", "missing_mask"]


def missing_mask(block: np.ndarray, nodata: float | None = None, zero_nodata: bool = False) -> np.ndarray:
    """H x W bool mask of the missing pixels of ``block`` (C x H x W digital numbers).

    Args:
        block: the pixels, any numeric dtype.
        nodata: the nodata value; ``None`` or NaN: only non-finite values are missing (a NaN
            nodata is covered by the non-finite rule). A value the dtype cannot hold (e.g. -9999
            in uint8) matches no pixel.
        zero_nodata: also count pixels that are 0 in every band as missing.
    """
    if block.ndim != 3:
        raise InvalidInputError(f"missing_mask expects C x H x W pixels, got shape {block.shape}.", field="block")
    missing = np.zeros(block.shape[1:], dtype=bool)
    if block.dtype.kind == "f":
        missing |= ~np.isfinite(block).all(axis=0)
    if nodata is not None and not math.isnan(nodata):
        value = np.asarray(nodata).astype(block.dtype)
        if value == nodata:
            missing |= (block == value).all(axis=0)
    if zero_nodata:
        missing |= (block == 0).all(axis=0)
    return missing


def fill_missing(block: np.ndarray, missing: np.ndarray, value: float = 0) -> np.ndarray:
    """Set every band of the ``missing`` pixels (H x W bool) of ``block`` (C x H x W) to
    ``value`` DN, in place, and return it: a missing pixel then cannot spread NaN through the
    network's attention, and reads the same from every reader."""
    if missing.any():
        block[:, missing] = value
    return block
