"""What the retrieval and land-cover evaluations share: the embedding features they compare, the
raw-pixel baselines, and the random-initialisation baseline built without touching the global
random state."""

from __future__ import annotations

from typing import Any, Protocol

import torch
import torch.nn.functional as F

from ..errors import InvalidOptionError
from ..model import XStarsBase

__all__ = ["FEATURES", "WHITENED", "PairData", "embedding_features", "pixel_features", "random_init_like"]

WHITENED = "-whitened"
FEATURES = ("cls", "mean", "patch", "cls" + WHITENED, "mean" + WHITENED)


class PairData(Protocol):
    """What the evaluations read pairs from: a map-style data set with a length (a torch
    ``Dataset`` such as :class:`~xstars_models.data.GeoPairDataset`) whose items hold
    ``{"images": {sensor: C x H x W digital numbers}}``."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Any: ...


def embedding_features(model: XStarsBase, images: torch.Tensor, sensor: str, kind: str) -> torch.Tensor:
    """N x D features of ``images`` (N x C x H x W digital numbers of ``sensor``): the ``cls``
    token, the ``mean`` patch token, either whitened by the model's fitted whitening
    (``cls-whitened``, ``mean-whitened``), or the ``patch`` tokens L2-normalised one by one and
    flattened (N x tokens*D), which compares footprints token by token as MSAD aligns them."""
    if kind not in FEATURES:
        raise InvalidOptionError(f"features must be one of {FEATURES}, got {kind!r}.", field="features")
    if kind == "patch":
        patches = model.embed(images, sensor, output="patch", progress=False)
        assert isinstance(patches, torch.Tensor)  # one tensor: no layers asked for
        return F.normalize(patches, dim=-1).flatten(1)
    output, whitened = kind.removesuffix(WHITENED), kind.endswith(WHITENED)
    features = model.embed(images, sensor, output=output, progress=False, whiten=whitened)
    assert isinstance(features, torch.Tensor)  # one tensor: no layers asked for
    return features


def pixel_features(images: torch.Tensor, grid: int) -> dict[str, torch.Tensor]:
    """Raw-pixel baselines of ``images`` (N x C x H x W): the mean colour (N x C, digital
    numbers) and the image area-averaged to ``grid`` x ``grid`` cells, standardised per image
    (N x C*grid*grid), by name."""
    small = F.adaptive_avg_pool2d(images.double(), grid)
    flat = small.flatten(1)
    standardised = (flat - flat.mean(1, keepdim=True)) / flat.std(1, keepdim=True).clamp_min(1e-9)
    return {"mean colour": images.double().mean(dim=(2, 3)), f"pixels {grid}x{grid}": standardised}


def random_init_like(model: XStarsBase, seed: int) -> XStarsBase:
    """A model of ``model``'s configuration with fresh random weights drawn from ``seed``, in
    eval mode on the CPU. The draw happens inside a fork of the CPU random state, so the caller's
    random sequence is the same as if this had never run."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return type(model)(model.config).eval()
