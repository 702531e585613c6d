"""The space a search ranks in: stored vectors whitened with the model's fitted whitening (each
sensor's own training mean removed, one PCA whitening for all; see :mod:`xstars_models.whitening`)
unless they were written whitened, then scaled to unit length, so that the inner product of two
is their cosine similarity and tiles of different sensors compare."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..errors import InvalidOptionError

if TYPE_CHECKING:
    from ..whitening import GlobalWhitening

__all__ = ["Space", "unit_rows"]


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """``vectors`` (n x D) scaled to unit length, float32 (an all-zero row stays zero)."""
    vectors = np.asarray(vectors, np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.ascontiguousarray(vectors / np.where(norms > 0, norms, 1), np.float32)


class Space:
    """How a dataset's stored vectors become the vectors its index holds.

    Args:
        whiten: rank in the whitened space.
        whitening: the model's fitted whitening, needed when ``whiten`` and some vectors are
            stored unwhitened (or a query image is embedded); ``None`` otherwise.
        model_id: what identifies the model the vectors come from.
        whitens_parts: some stored vectors are whitened here (then the whitening is part of what
            the index holds).
    """

    def __init__(self, whiten: bool, whitening: GlobalWhitening | None, model_id: str, whitens_parts: bool) -> None:
        self.whiten, self.whitening, self.model_id, self.whitens_parts = whiten, whitening, model_id, whitens_parts

    @property
    def key(self) -> dict[str, Any]:
        """What an index built in this space records: vectors of another model, or whitened by
        another whitening, are another space."""
        whitening = _fingerprint(self.whitening) if self.whiten and self.whitens_parts else None
        return {"model": self.model_id, "whiten": self.whiten, "whitening": whitening}

    def index_vectors(self, vectors: np.ndarray, sensor: str, whitened: bool) -> np.ndarray:
        """Stored ``vectors`` (n x D) of ``sensor`` (``whitened``: stored whitened) in this space
        (refused as :meth:`check` says)."""
        self.check(sensor, whitened)
        if self.whiten and not whitened:
            assert self.whitening is not None  # check() refused a space without one
            writable = np.array(vectors, np.float32)  # a copy: torch warns about read-only arrays (pyarrow's)
            vectors = self.whitening.apply(torch.from_numpy(writable), "cls", sensor).numpy()
        return unit_rows(vectors)

    def check(self, sensor: str, whitened: bool) -> None:
        """Refuse, naming the fix, vectors of ``sensor`` (``whitened``: stored whitened) that this
        space cannot hold.

        Raises:
            InvalidOptionError: whitened vectors in an unwhitened space, or no whitening to whiten
                with (``field="whiten"``); a whitening that does not cover ``sensor``
                (``field="sensor"``).
        """
        if whitened and not self.whiten:
            raise InvalidOptionError(
                f"the {sensor} vectors are stored whitened and cannot be compared unwhitened; search without {{whiten}}.",
                field="whiten",
                settings={"whiten": False},
            )
        if self.whiten and not whitened:
            if self.whitening is None:
                raise _no_whitening()
            self.whitening.check("cls", sensor)


def _no_whitening() -> InvalidOptionError:
    return InvalidOptionError(
        "ranking across sensors needs the model's fitted whitening, and this model has none; search with {whiten} to "
        "rank the stored vectors as they are (which compares tiles of one sensor only).",
        field="whiten",
        settings={"whiten": False},
    )


def _fingerprint(whitening: GlobalWhitening | None) -> str | None:
    if whitening is None:
        return None
    digest = hashlib.sha256()
    for name, tensor in sorted(whitening.tensors().items()):
        digest.update(name.encode())
        digest.update(tensor.double().numpy().tobytes())
    return digest.hexdigest()
