"""Pictures of embeddings a person can look at."""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["pca_rgb", "stretch_rgb"]


def pca_rgb(maps: torch.Tensor) -> np.ndarray:
    """Project dense features (B x D x h x w) on their first three principal components, fitted
    jointly over all images so colours are comparable between them, and scale each component to
    0-255 (2nd-98th percentile). Returns uint8 B x h x w x 3."""
    b, d, h, w = maps.shape
    flat = maps.permute(0, 2, 3, 1).reshape(-1, d).double()
    flat = flat - flat.mean(0)
    _, _, v = torch.linalg.svd(flat, full_matrices=False)
    comps = (flat @ v[:3].T).numpy()
    lo, hi = np.percentile(comps, 2, axis=0), np.percentile(comps, 98, axis=0)
    scaled = np.clip((comps - lo) / np.maximum(hi - lo, 1e-12), 0, 1)
    return (scaled * 255).astype(np.uint8).reshape(b, h, w, 3)


def stretch_rgb(image: np.ndarray) -> np.ndarray:
    """H x W x 3 imagery of any range to uint8 with a 2-98 percentile stretch per band."""
    image = image.astype(np.float64)
    lo = np.percentile(image, 2, axis=(0, 1))
    hi = np.percentile(image, 98, axis=(0, 1))
    return (np.clip((image - lo) / np.maximum(hi - lo, 1e-12), 0, 1) * 255).astype(np.uint8)
