"""Small real images shipped with the package for the demo, notebooks and tests (origin and
licence in SOURCES.md beside this file)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import InvalidOptionError
from ..io import read_raster

__all__ = ["co_registered_pair", "list_samples", "load_sample", "sample_path"]

_DIR = Path(__file__).resolve().parent


def co_registered_pair() -> dict[str, Path]:
    """Real co-registered rasters of one area (Baviaanskloof, South Africa; 6.72 x 10.08 km, same
    Transverse Mercator CRS and bounds), by the package's sensor name: ``"sentinel2_rgb"``
    (Sentinel-2 L1C B4/B3/B2, 8-bit, 10 m) and ``"landsat8_rgb"`` (Landsat-8 C2 L2 SR_B4/SR_B3/SR_B2,
    8-bit, 30 m, nodata 0). Origin and credits in SOURCES.md."""
    folder = _DIR / "baviaanskloof"
    return {"sentinel2_rgb": folder / "sentinel2_rgb.tif", "landsat8_rgb": folder / "landsat8_rgb.tif"}


def list_samples() -> list[str]:
    return sorted(p.stem for p in _DIR.glob("*.tif"))


def sample_path(name: str) -> Path:
    path = _DIR / f"{name}.tif"
    if not path.is_file():
        raise InvalidOptionError(f"No sample named {name!r}; samples: {list_samples()}.", field="name")
    return path


def load_sample(name: str) -> np.ndarray:
    """The sample as an H x W x C array of its digital numbers (needs rasterio: the geo extra)."""
    return np.moveaxis(read_raster(sample_path(name), purpose="Reading samples"), 0, -1)
