"""Raster I/O has one owner (``xstars_models.io``): one definition of a missing pixel shared by the
training pairs and whole-scene embedding, and a pair index built without reading every window."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio  # the test extra installs it; a missing install must fail, not skip
from affine import Affine

from xstars_models import get_sensor
from xstars_models.data import GeoPairDataset, RasterSource
from xstars_models.errors import InvalidInputError
from xstars_models.io import missing_mask
from xstars_models.io.mosaic import Mosaic
from xstars_models.scenes.reading import Scene

CRS = "EPSG:32633"


def write_float_raster(path: Path, pixels: np.ndarray, res: float, nodata: float | None = None) -> Path:
    count, height, width = pixels.shape
    with rasterio.open(path, "w", driver="GTiff", width=width, height=height, count=count, dtype="float32", crs=CRS,
                       transform=Affine(res, 0, 500_000, 0, -res, 4_000_000), nodata=nodata) as dst:
        dst.write(pixels.astype(np.float32))
    return path


@pytest.mark.parametrize(
    "pixel, nodata, zero_nodata, missing",
    [
        ([1.0, np.nan, 3.0], None, False, True),  # one non-finite band: not a digital number
        ([1.0, np.inf, 3.0], 0.0, False, True),
        ([7.0, 7.0, 7.0], 7.0, False, True),  # every band at nodata
        ([7.0, 1.0, 7.0], 7.0, False, False),  # one band at nodata is a dark band, not a gap
        ([0.0, 0.0, 0.0], None, False, False),  # black is data unless asked otherwise
        ([0.0, 0.0, 0.0], None, True, True),
        ([5.0, 5.0, 5.0], float("nan"), False, False),
    ],
)
def test_missing_mask_policy(pixel, nodata, zero_nodata, missing):
    block = np.array(pixel, dtype=np.float32).reshape(3, 1, 1)
    assert bool(missing_mask(block, nodata, zero_nodata)[0, 0]) is missing


def test_nodata_the_dtype_cannot_hold_matches_nothing():
    block = np.full((3, 2, 2), 255, np.uint8)
    assert not missing_mask(block, -9999.0).any() and missing_mask(block, 255.0).all()
    with pytest.raises(InvalidInputError, match=r"expects C x H x W pixels, got shape \(2, 2\)") as info:
        missing_mask(block[0])
    assert info.value.field == "block"


def test_training_pairs_and_scenes_agree_on_missing_pixels(tmp_path):
    """NaN pixels of a file whose nodata is 0: the old pair reader took them as data (only a NaN
    nodata made NaN missing) while the scene reader dropped them."""
    rng = np.random.default_rng(0)
    pixels = rng.uniform(1, 250, (3, 40, 40)).astype(np.float32)
    pixels[1, 3:9, 4:12] = np.nan  # NaN in one band only
    pixels[:, 20:22, 30:33] = 0.0  # nodata in every band
    path = write_float_raster(tmp_path / "s2.tif", pixels, 10.0, nodata=0.0)
    expected = np.zeros((40, 40), bool)
    expected[3:9, 4:12] = expected[20:22, 30:33] = True

    pairs = GeoPairDataset({"sentinel2_rgb": path}, footprint_m=400, max_nodata=1.0)
    assert len(pairs) == 1
    assert pairs.nodata_fractions[0]["sentinel2_rgb"] == pytest.approx(expected.mean())
    tile = pairs[0]["images"]["sentinel2_rgb"].numpy()
    assert np.isfinite(tile).all() and (tile[:, expected] == 0).all()

    spec = get_sensor("sentinel2_rgb")
    with rasterio.open(path) as src:
        scene = Scene(str(path), src, None, src.transform, src.crs, src.nodata, spec, "sentinel2_rgb", False, {})
        strip, missing = scene.read(0, 40, 40)
    assert np.array_equal(missing, expected)
    assert np.array_equal(strip, tile), "both readers give a missing pixel the same 0 DN"


def test_the_pair_index_reads_each_file_once_not_each_window(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    fine = rng.uniform(1, 250, (3, 120, 120)).astype(np.float32)
    fine[:, rng.uniform(size=(120, 120)) < 0.03] = 0.0  # scattered gaps
    fine[:, 40:75, 10:52] = 0.0  # and a hole
    coarse = rng.uniform(1, 250, (3, 60, 60)).astype(np.float32)
    sources = {
        "sentinel2_rgb": write_float_raster(tmp_path / "coarse.tif", coarse, 10.0, nodata=0.0),
        "aerial": RasterSource(write_float_raster(tmp_path / "fine.tif", fine, 5.0, nodata=0.0)),
    }
    calls = {"window reads": 0}
    original = Mosaic.read

    def counting(self, *args, **kwargs):
        calls["window reads"] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Mosaic, "read", counting)
    pairs = GeoPairDataset(sources, footprint_m=100, stride_m=40, max_nodata=0.2)
    assert calls["window reads"] == 0, "construction reads no window"
    everything = GeoPairDataset(sources, footprint_m=100, stride_m=40, max_nodata=1.0)
    assert 0 < len(pairs) < len(everything)

    # The indexed fractions are those of the windows' own pixels (both grids are pixel copies).
    for window, fractions in zip(everything.windows, everything.nodata_fractions):
        for name in everything.sources:
            valid = everything._read(name, window)[1]
            assert fractions[name] == pytest.approx(1.0 - valid.mean(), abs=1e-9), (name, window)
    kept = [w for w, f in zip(everything.windows, everything.nodata_fractions) if max(f.values()) <= 0.2]
    assert kept == pairs.windows


def test_coarse_pixels_that_do_not_divide_the_footprint_are_not_counted_missing(tmp_path):
    """Landsat's 30 m pixels in 100 m footprints: 3 or 4 pixel centres per side, never a gap."""
    rng = np.random.default_rng(2)
    fine = write_float_raster(tmp_path / "fine.tif", rng.uniform(1, 250, (3, 120, 120)), 5.0, nodata=0.0)
    coarse_pixels = rng.uniform(1, 250, (3, 20, 20))
    coarse_pixels[:, 10:, :] = 0.0  # the southern half is nodata
    coarse = write_float_raster(tmp_path / "coarse.tif", coarse_pixels, 30.0, nodata=0.0)
    pairs = GeoPairDataset({"aerial": fine, "landsat8": coarse}, footprint_m=100, stride_m=50, max_nodata=1.0)
    north = [f["landsat8"] for w, f in zip(pairs.windows, pairs.nodata_fractions) if w[1] >= 4_000_000 - 300]
    south = [f["landsat8"] for w, f in zip(pairs.windows, pairs.nodata_fractions) if w[3] <= 4_000_000 - 300]
    assert north and south and max(north) == 0.0 and min(south) == 1.0
    strict = GeoPairDataset({"aerial": fine, "landsat8": coarse}, footprint_m=100, stride_m=50, max_nodata=0.0)
    assert len(strict) == sum(max(f.values()) == 0.0 for f in pairs.nodata_fractions) >= len(north)
