"""The shipped co-registered Sentinel-2 / Landsat-8 pair: what SOURCES.md says it is, small, the
same ground in both, and pixel for pixel the open-data rasters it was cut from."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.windows import from_bounds

from factories import HOMONIM, require_shared_data
from xstars_models.data import GeoPairDataset, RasterSource
from xstars_models.errors import InvalidOptionError
from xstars_models.samples import co_registered_pair, list_samples, sample_path

PAIR = co_registered_pair()


def test_the_pair_is_small_co_registered_and_credited():
    assert set(PAIR) == {"sentinel2_rgb", "landsat8_rgb"}
    assert sum(p.stat().st_size for p in PAIR.values()) < 2_000_000  # bytes: a package sample, not a data set
    with rasterio.open(PAIR["sentinel2_rgb"]) as s2, rasterio.open(PAIR["landsat8_rgb"]) as l8:
        assert s2.crs == l8.crs and s2.crs.is_projected and s2.bounds == l8.bounds
        assert (s2.res, l8.res) == ((10.0, 10.0), (30.0, 30.0))
        assert (s2.count, l8.count) == (3, 3) and s2.dtypes[0] == l8.dtypes[0] == "uint8"
        assert s2.descriptions == ("B4", "B3", "B2") and l8.descriptions == ("SR_B4", "SR_B3", "SR_B2")
    sources = (Path(PAIR["sentinel2_rgb"]).parents[1] / "SOURCES.md").read_text(encoding="utf-8")
    for credit in ("Copernicus Sentinel data", "U.S.\nGeological Survey", "baviaanskloof/landsat8_rgb.tif"):
        assert credit.replace("\n", " ") in sources.replace("\n", " ")


def test_the_pair_makes_footprint_pairs_that_agree():
    # The notebook's reading: 640 m footprints, Sentinel-2 at 64 px, Landsat-8 resampled to 32 px.
    pairs = GeoPairDataset(
        {"sentinel2_rgb": RasterSource(PAIR["sentinel2_rgb"], bands=(1, 2, 3), size_px=64),
         "landsat8": RasterSource(PAIR["landsat8_rgb"], bands=(1, 2, 3), size_px=32)},
        footprint_m=640, stride_m=640,
    )
    assert len(pairs) >= 100
    scores = []
    for i in range(0, len(pairs), 7):
        images = pairs[i]["images"]
        s2 = images["sentinel2_rgb"].mean(0).reshape(32, 2, 32, 2).mean((1, 3)).numpy().ravel()
        l8 = images["landsat8"].mean(0).numpy().ravel()
        scores.append(np.corrcoef(s2, l8)[0, 1])
    assert np.median(scores) > 0.8, "the two sensors see the same ground in each footprint"


@pytest.mark.parametrize("name, source, bands", [
    ("sentinel2_rgb", "reference/sentinel2_b432_byte.tif", (1, 2, 3)),
    ("landsat8_rgb", "reference/landsat8_byte.tif", (4, 3, 2)),
])
def test_the_pair_is_an_exact_crop_of_the_open_rasters(name, source, bands):
    require_shared_data()
    with rasterio.open(PAIR[name]) as sample, rasterio.open(HOMONIM / source) as original:
        window = from_bounds(*sample.bounds, transform=original.transform)
        assert np.array_equal(sample.read(), original.read(bands, window=window.round_offsets().round_lengths()))
        assert sample.crs == original.crs and sample.nodata == original.nodata


def test_an_unknown_sample_is_refused_naming_the_samples():
    assert "sentinel2_rgb_coast" in list_samples() and sample_path("sentinel2_rgb_coast").is_file()
    with pytest.raises(InvalidOptionError, match=r"No sample named 'moon'; samples: \[.*'sentinel2_rgb_coast'") as info:
        sample_path("moon")
    assert info.value.field == "name"
