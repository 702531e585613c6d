"""Tiny models and imagery for the tests (depth 2, width 32: fast on 2 CPU cores)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from xstars_models import XStars, get_sensor

# Real co-registered aerial 5 m / Sentinel-2 10 m / Landsat-8 30 m rasters, beside the repository.
HOMONIM = Path(__file__).resolve().parents[2] / "shared" / "data" / "homonim"
HOMONIM_S2 = HOMONIM / "reference/sentinel2_b432_byte.tif"  # B4, B3, B2 as bands 1-3
HOMONIM_AERIAL = [HOMONIM / f"source/ngi_rgb_byte_{i}.tif" for i in (1, 2, 3)]

TINY = dict(patch_size=8, img_size=64, embed_dim=32, depth=2, num_heads=2)


EXTRA_SENSORS = {
    "aerial": get_sensor("aerial_rgb").with_gsd(5.0, name="aerial"),
    "sentinel2": get_sensor("sentinel2"),
}


def tiny_model(seed: int = 0, extra_sensors: Sequence[str] = ("aerial", "sentinel2")) -> XStars:
    """Sentinel-2 RGB (10 m, patch 8) as primary; by default aerial RGB at 5 m (patch 16) and the
    13-band Sentinel-2 (patch 8) as extra stems."""
    torch.manual_seed(seed)
    sensors = {"sentinel2_rgb": get_sensor("sentinel2_rgb")}
    sensors.update({name: EXTRA_SENSORS[name] for name in extra_sensors})
    return XStars.new("vit_tiny_patch16_224", sensors, **TINY).eval()


def rgb_images(n: int = 2, size: int = 64, seed: int = 0) -> np.ndarray:
    """``n`` uint8 H x W x 3 images with some spatial structure."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(n, size // 8, size // 8, 3), dtype=np.uint8)
    return np.repeat(np.repeat(base, 8, axis=1), 8, axis=2)


def window_of(view: torch.Tensor, image: torch.Tensor) -> tuple[int, int] | None:
    """(top, left) of the square window of ``image`` (C x H x W) that ``view`` is, pixel for
    pixel up to flips (atol 1e-3), else None."""
    size = view.shape[-1]
    for flips in ((), (-1,), (-2,), (-1, -2)):
        unflipped = view.flip(flips) if flips else view
        for top in range(image.shape[1] - size + 1):
            for left in range(image.shape[2] - size + 1):
                if torch.allclose(unflipped, image[:, top : top + size, left : left + size], atol=1e-3):
                    return top, left
    return None


def require_shared_data() -> None:
    """Skip, naming what is missing, when the real rasters beside the repository
    (``../shared/data/homonim``) are absent; with ``XSTARS_REQUIRE_SHARED_DATA=1`` (set by
    ``.ci/run``) fail instead, so CI proves every such test."""
    import os

    import pytest

    if HOMONIM.is_dir():
        return
    message = f"needs the real co-registered rasters at {HOMONIM}, which are absent"
    if os.environ.get("XSTARS_REQUIRE_SHARED_DATA") == "1":
        pytest.fail(message + " (XSTARS_REQUIRE_SHARED_DATA=1)")
    pytest.skip(message)


def registry_entry(folder: Path, repo_id: str, commit: str) -> dict:
    """A registry entry for the tiny model saved in ``folder`` and committed to ``repo_id`` at
    ``commit`` on the loopback Hub: every file's sha256 and size, pinned to that commit."""
    import hashlib

    files = {
        p.name: {"sha256": hashlib.sha256(p.read_bytes()).hexdigest(), "size": p.stat().st_size}
        for p in sorted(folder.iterdir())
    }
    return {
        "arch": "vit_tiny_patch16_224",
        "sensors": ["sentinel2_rgb", "aerial", "sentinel2"],
        "source": {"repo_id": repo_id, "revision": commit},
        "files": files,
        "license": "MIT",
    }
