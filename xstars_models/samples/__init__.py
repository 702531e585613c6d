"""Small real images shipped with the package for the demo, notebooks and tests (origin and
licence in SOURCES.md beside this file)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import MissingExtraError

__all__ = ["list_samples", "load_sample", "sample_path"]

_DIR = Path(__file__).resolve().parent


def list_samples() -> list[str]:
    return sorted(p.stem for p in _DIR.glob("*.tif"))


def sample_path(name: str) -> Path:
    path = _DIR / f"{name}.tif"
    if not path.is_file():
        raise ValueError(f"No sample named {name!r}; samples: {list_samples()}.")
    return path


def load_sample(name: str) -> np.ndarray:
    """The sample as an H x W x C array of its digital numbers (needs rasterio: the geo extra)."""
    try:
        import rasterio
    except ImportError:
        raise MissingExtraError("Reading samples needs rasterio: pip install 'xstars-models[geo]'.") from None
    with rasterio.open(sample_path(name)) as src:
        return np.moveaxis(src.read(), 0, -1)
