"""Paired data: footprint pairs cut from the real co-registered homonim rasters, spatial split,
nodata skipping, the MSC-France layout, and multi-crop augmentation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from xstars_models import get_sensor
from xstars_models.data import GeoPairDataset, MSCFrancePairs, MultiCropAugment, RasterSource

HOMONIM = Path(__file__).resolve().parents[2] / "shared" / "data" / "homonim"
AERIAL = RasterSource(tuple(str(HOMONIM / f"source/ngi_rgb_byte_{i}.tif") for i in (1, 2, 3)), (1, 2, 3), 128)
S2 = RasterSource((str(HOMONIM / "reference/sentinel2_b432_byte.tif"),), (1, 2, 3), 64)
LANDSAT = RasterSource((str(HOMONIM / "reference/landsat8_byte.tif"),), (4, 3, 2), 21)


def grey_at_10m(aerial: torch.Tensor) -> np.ndarray:
    return aerial.mean(0).numpy().reshape(64, 2, 64, 2).mean((1, 3))


def test_aerial_sentinel2_pairs_cover_the_same_ground():
    pairs = GeoPairDataset({"sentinel2_rgb": S2, "aerial": AERIAL}, footprint_m=640)
    assert 100 <= len(pairs) <= 130
    item = pairs[0]
    assert item["images"]["sentinel2_rgb"].shape == (3, 64, 64) and item["images"]["aerial"].shape == (3, 128, 128)
    left, bottom, right, top = item["bounds"]
    assert right - left == 640 and top - bottom == 640
    matched, shuffled = [], []
    for i in range(0, len(pairs), 4):
        s2 = pairs[i]["images"]["sentinel2_rgb"].mean(0).numpy().ravel()
        matched.append(np.corrcoef(s2, grey_at_10m(pairs[i]["images"]["aerial"]).ravel())[0, 1])
        other = pairs[(i + len(pairs) // 2) % len(pairs)]["images"]["aerial"]
        shuffled.append(np.corrcoef(s2, grey_at_10m(other).ravel())[0, 1])
    assert np.median(matched) > 0.6 and np.median(shuffled) < 0.3


def test_overlap_and_nodata_skipping():
    strict = GeoPairDataset({"sentinel2_rgb": S2, "aerial": AERIAL}, footprint_m=640, stride_m=320, max_nodata=0.0)
    loose = GeoPairDataset({"sentinel2_rgb": S2, "aerial": AERIAL}, footprint_m=640, stride_m=320, max_nodata=0.5)
    assert len(strict) < len(loose) and len(loose) > 3 * 112
    for i in range(0, len(strict), 7):
        assert not (strict[i]["images"]["aerial"] == 0).all(dim=0).any()


def test_spatial_split_is_disjoint_with_a_gap():
    kwargs = dict(footprint_m=640, split_axis="y", val_fraction=0.25)
    train = GeoPairDataset({"sentinel2_rgb": S2, "aerial": AERIAL}, split="train", **kwargs)
    val = GeoPairDataset({"sentinel2_rgb": S2, "aerial": AERIAL}, split="val", **kwargs)
    assert len(train) > len(val) > 5
    highest_train = max(b[3] for b, _ in train.windows)
    lowest_val = min(b[1] for b, _ in val.windows)
    assert lowest_val - highest_train >= 640


def test_sentinel2_landsat_pairs_and_geojson():
    pairs = GeoPairDataset({"sentinel2_rgb": S2, "landsat8_rgb": LANDSAT}, footprint_m=640)
    assert len(pairs) > 200 and pairs[3]["images"]["landsat8_rgb"].shape == (3, 21, 21)
    assert '"FeatureCollection"' in pairs.to_geojson()


def test_bad_sources_are_explained():
    with pytest.raises(ValueError, match=r"has 3 bands; cannot read bands \[4\]"):
        GeoPairDataset({"s2": RasterSource(S2.paths, (4,), 64), "aerial": AERIAL}, footprint_m=640)
    with pytest.raises(ValueError, match="smaller than one"):
        GeoPairDataset({"s2": S2, "aerial": AERIAL}, footprint_m=100_000)


def make_msc(root: Path, layout: dict[str, dict[str, list[str]]]) -> None:
    for sensor, cities in layout.items():
        for city, tiles in cities.items():
            (root / sensor / city).mkdir(parents=True)
            for tile in tiles:
                Image.fromarray(np.full((16, 16, 3), 7, np.uint8)).save(root / sensor / city / f"{tile}.png")


def test_msc_france_layout(tmp_path):
    make_msc(tmp_path, {"SPOT": {"paris": ["a", "b"], "lyon": ["c"]}, "Sentinel": {"paris": ["a", "b"], "lyon": ["c"]}})
    pairs = MSCFrancePairs(tmp_path, {"SPOT": "spot67_rgb", "Sentinel": "sentinel2_rgb"})
    assert len(pairs) == 3
    item = pairs[0]
    assert set(item["images"]) == {"spot67_rgb", "sentinel2_rgb"} and item["images"]["spot67_rgb"].shape == (3, 16, 16)
    assert item["images"]["spot67_rgb"].dtype == torch.float32 and float(item["images"]["spot67_rgb"].max()) == 7.0


def test_msc_france_unpaired_tile_is_named(tmp_path):
    make_msc(tmp_path, {"SPOT": {"paris": ["a", "b"]}, "Sentinel": {"paris": ["a"]}})
    with pytest.raises(ValueError, match=r"tile 'b' of city 'paris' is missing for sensor\(s\) \['Sentinel'\].*unpaired='skip'"):
        MSCFrancePairs(tmp_path, {"SPOT": "spot67_rgb", "Sentinel": "sentinel2_rgb"})
    assert len(MSCFrancePairs(tmp_path, {"SPOT": "spot67_rgb", "Sentinel": "sentinel2_rgb"}, unpaired="skip")) == 1
    with pytest.raises(FileNotFoundError, match="Landsat"):
        MSCFrancePairs(tmp_path, {"Landsat": "landsat8_rgb"})


def test_multicrop_views_shapes_range_and_determinism():
    augment = MultiCropAugment(get_sensor("sentinel2_rgb"), global_size=64, local_size=32, n_global=2, n_local=3)
    image = torch.rand(3, 96, 96) * 255
    views = augment(image, torch.Generator().manual_seed(1))
    assert [tuple(v.shape) for v in views] == [(3, 64, 64)] * 2 + [(3, 32, 32)] * 3
    assert all(float(v.min()) >= 0 and float(v.max()) <= 255 for v in views)
    again = augment(image, torch.Generator().manual_seed(1))
    assert all(torch.equal(a, b) for a, b in zip(views, again))
    other = augment(image, torch.Generator().manual_seed(2))
    assert not torch.equal(views[0], other[0])
    thirteen = MultiCropAugment(get_sensor("sentinel2"), 32, 16, n_local=1)
    assert thirteen(torch.rand(13, 40, 40) * 3000)[0].shape == (13, 32, 32)
    with pytest.raises(ValueError, match=r"expects C x H x W with C = 3"):
        augment(torch.rand(4, 64, 64))
