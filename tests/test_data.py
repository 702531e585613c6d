"""Paired data: the MSC-France layout, footprint pairs cut from the real co-registered homonim
rasters (aerial 5 m, Sentinel-2 10 m, Landsat-8 30 m), the spatial split, nodata skipping, and the
DINO / MSAD view makers."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import rasterio  # the test extra installs it; a missing install must fail, not skip
import torch
import torch.nn.functional as F
from affine import Affine  # rasterio's dependency
from factories import HOMONIM, require_shared_data, window_of
from PIL import Image

from xstars_models import get_sensor
from xstars_models.data import GeoPairDataset, MSCFrancePairs, MultiCropAugment, RasterSource, plan_pairs
from xstars_models.data.grid import grid_windows, split_regions
from xstars_models.errors import InvalidInputError, InvalidOptionError

S2 = RasterSource(HOMONIM / "reference/sentinel2_b432_byte.tif", bands=(1, 2, 3))  # B4, B3, B2
AERIAL = RasterSource([HOMONIM / f"source/ngi_rgb_byte_{i}.tif" for i in (1, 2, 3)], bands=(1, 2, 3))
LANDSAT = RasterSource(HOMONIM / "reference/landsat8_byte.tif", bands=(4, 3, 2))  # SR_B4, SR_B3, SR_B2


def grey(image: torch.Tensor, factor: int = 1) -> np.ndarray:
    """Band mean, area-averaged by ``factor`` (e.g. 2: 5 m aerial -> 10 m)."""
    return F.avg_pool2d(image.mean(0)[None], factor)[0].numpy().ravel()


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a, b)[0, 1])


# ---- MSC-France --------------------------------------------------------------------------


def make_msc(root: Path, layout: dict[str, dict[str, list[str]]]) -> None:
    """PNG tiles whose value and size say which sensor they belong to."""
    value, size = {"SPOT": 200, "Sentinel": 30, "Landsat": 90}, {"SPOT": 32, "Sentinel": 8, "Landsat": 4}
    for sensor, cities in layout.items():
        for city, tiles in cities.items():
            (root / sensor / city).mkdir(parents=True)
            for tile in tiles:
                pixels = np.full((size[sensor], size[sensor], 3), value[sensor], np.uint8)
                pixels[0, 0] = (1, 2, 3)
                Image.fromarray(pixels).save(root / sensor / city / f"{tile}.png")


NAMES = {"SPOT": "spot67_rgb", "Sentinel": "sentinel2_rgb"}


def test_msc_france_pairs_tiles_by_city_and_name(tmp_path):
    make_msc(tmp_path, {s: {"paris": ["a", "b"], "lyon": ["c"]} for s in ("SPOT", "Sentinel", "Landsat")})
    pairs = MSCFrancePairs(tmp_path, sensor_names=NAMES)
    assert len(pairs) == 3 and [(c, t) for c, t in pairs.items] == [("lyon", "c"), ("paris", "a"), ("paris", "b")]
    item = pairs[1]
    assert (item["city"], item["tile"]) == ("paris", "a")
    spot, s2 = item["images"]["spot67_rgb"], item["images"]["sentinel2_rgb"]
    assert set(item["images"]) == {"spot67_rgb", "sentinel2_rgb"}
    assert spot.dtype == torch.float32 and spot.shape == (3, 32, 32) and s2.shape == (3, 8, 8)
    assert float(spot[0, 1, 1]) == 200 and float(s2[0, 1, 1]) == 30, "raw DNs, each from its own sensor folder"
    assert spot[:, 0, 0].tolist() == [1, 2, 3], "channels first, in the PNG's R, G, B order"

    three = MSCFrancePairs(tmp_path, ("SPOT", "Sentinel", "Landsat"), cities=["paris"], transform=lambda im: sorted(im))
    assert len(three) == 2 and three[0]["images"] == ["Landsat", "SPOT", "Sentinel"]
    with pytest.raises(InvalidOptionError, match=r"Cities \['nice'\] are in no sensor folder") as info:
        MSCFrancePairs(tmp_path, cities=["nice"])
    assert info.value.field == "cities"


def test_msc_france_unpaired_tile_is_named_with_the_way_out(tmp_path):
    make_msc(tmp_path, {"SPOT": {"paris": ["a", "b"], "lyon": ["c"]}, "Sentinel": {"paris": ["a"], "lyon": ["c"]}})
    with pytest.raises(InvalidInputError) as error:
        MSCFrancePairs(tmp_path, sensor_names=NAMES)
    assert error.value.field == "root" and error.value.settings == {"unpaired": "skip"}
    message = str(error.value)
    parts = ("'b'", "'paris'", "missing for sensor(s) ['Sentinel']", "in ['SPOT']", "unpaired='skip'", "Sentinel/paris/b.png")
    for part in parts:
        assert part in message, f"{part!r} not in {message!r}"
    skipping = MSCFrancePairs(tmp_path, sensor_names=NAMES, unpaired="skip")
    assert len(skipping) == 2 and skipping.skipped == [("paris", "b", ("Sentinel",))]


def test_msc_france_missing_or_empty_root_is_explained(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere does not exist.*root/\{sensor\}/\{city\}/\{tile\}\.png"):
        MSCFrancePairs(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"Sensor folder 'SPOT' is not in .* \(it has \[\]\)"):
        MSCFrancePairs(tmp_path)
    (tmp_path / "SPOT" / "paris").mkdir(parents=True)
    (tmp_path / "Sentinel" / "paris").mkdir(parents=True)
    with pytest.raises(InvalidInputError, match="No tile is present in every sensor folder") as info:
        MSCFrancePairs(tmp_path)
    assert info.value.field == "root"
    with pytest.raises(InvalidOptionError, match=r"unpaired must be one of \('error', 'skip'\)") as info:
        MSCFrancePairs(tmp_path, unpaired="drop")
    assert info.value.field == "unpaired"


def overlap_area(a, b) -> float:
    """Square metres two (left, bottom, right, top) boxes share: the tests' own measure."""
    return max(min(a[2], b[2]) - max(a[0], b[0]), 0.0) * max(min(a[3], b[3]) - max(a[1], b[1]), 0.0)


# ---- geometry -----------------------------------------------------------------------------


def test_grid_snaps_to_the_reference_pixels_and_split_strips_are_exact():
    windows = grid_windows((3.0, 0.0, 100.0, 47.0), tile_m=20, stride_m=10, origin=(0.0, 50.0), res=(10.0, 10.0))
    assert windows[0] == (10.0, 20.0, 30.0, 40.0) and len(windows) == 8 * 3  # lefts 10..80, tops 40..20
    assert all(w[0] >= 3 and w[2] <= 100 and w[1] >= 0 and w[3] <= 47 for w in windows)
    extent = (0.0, 0.0, 1000.0, 400.0)
    val = split_regions(extent, "val", 0.25, "x", gap_m=50, blocks=2)
    train = split_regions(extent, "train", 0.25, "x", gap_m=50, blocks=2)
    assert val == [(375.0, 0.0, 500.0, 400.0), (875.0, 0.0, 1000.0, 400.0)]
    assert train == [(0.0, 0.0, 325.0, 400.0), (550.0, 0.0, 825.0, 400.0)]
    assert sum(overlap_area(r, extent) for r in val) == pytest.approx(0.25 * 1000 * 400)


# ---- georeferenced pairs: synthetic rasters for the error paths -----------------------------


def write_raster(
    path: Path, crs: str, res: float, size: int | tuple[int, int] = 40, count: int = 3,
    nodata: float | None = None, left: float = 500_000, fill: float | None = None,
) -> Path:
    """A uint8 raster whose top-left corner is (left, 4 000 000) m; DNs 1..250, or ``fill``."""
    height, width = (size, size) if isinstance(size, int) else size
    data = np.arange(count * height * width, dtype=np.float32).reshape(count, height, width) % 250 + 1
    if fill is not None:
        data[:] = fill
    with rasterio.open(
        path, "w", driver="GTiff", width=width, height=height, count=count, dtype="uint8", crs=crs,
        transform=Affine(res, 0, left, 0, -res, 4_000_000), nodata=nodata,
    ) as dst:
        dst.write(data.astype(np.uint8))
    return path


def test_geo_pairs_reject_mismatched_crs_bad_bands_and_degrees(tmp_path):
    a = write_raster(tmp_path / "a.tif", "EPSG:32633", 10)
    b = write_raster(tmp_path / "b.tif", "EPSG:32634", 20, size=20)
    crs_message = r"share one CRS: .*b\.tif \(sensor 'b'\).*32634.*a\.tif \(sensor 'a'\).*32633"
    with pytest.raises(InvalidInputError, match=crs_message) as info:
        GeoPairDataset({"a": a, "b": b}, 100)
    assert info.value.field == "sources"
    same = write_raster(tmp_path / "c.tif", "EPSG:32633", 20, size=20)
    with pytest.raises(InvalidOptionError, match=r"Sensor 'c': .*c\.tif has 3 bands; cannot read bands \[4\]") as info:
        GeoPairDataset({"a": a, "c": RasterSource(same, bands=(1, 4))}, 100)
    assert info.value.field == "sources"
    with pytest.raises(InvalidOptionError, match=r"No 1000 m footprint fits.*smaller footprint than footprint_m=1000\.") as info:
        GeoPairDataset({"a": a, "c": same}, 1000)
    assert info.value.field == "footprint_m"
    with pytest.raises(InvalidOptionError, match="either in metres") as info:
        GeoPairDataset({"a": a, "c": same})
    assert info.value.field == "footprint_m"
    with pytest.raises(InvalidOptionError, match="either in metres") as info:
        GeoPairDataset({"a": a, "c": same}, 100, footprint_px=10)
    assert info.value.field == "footprint_m"
    with pytest.raises(InvalidOptionError, match=r"max_nodata is a fraction of pixels in \[0, 1\], got 1\.5") as info:
        GeoPairDataset({"a": a, "c": same}, 100, max_nodata=1.5)
    assert info.value.field == "max_nodata"
    with pytest.raises(InvalidOptionError, match=r"reference sensor 'b' is not one of the sources \['a', 'c'\]") as info:
        GeoPairDataset({"a": a, "c": same}, 100, reference="b")
    assert info.value.field == "reference"
    with pytest.raises(InvalidOptionError, match="split must be one of") as info:
        GeoPairDataset({"a": a, "c": same}, 100, split="test")
    assert info.value.field == "split"
    with pytest.raises(InvalidOptionError, match="Unknown resampling 'cubicish'") as info:
        RasterSource(same, resampling="cubicish")
    assert info.value.field == "resampling"
    geographic = tmp_path / "g.tif"
    with rasterio.open(geographic, "w", driver="GTiff", width=4, height=4, count=1, dtype="uint8", crs="EPSG:4326",
                       transform=Affine(0.1, 0, 10, 0, -0.1, 50)) as dst:
        dst.write(np.ones((1, 4, 4), np.uint8))
    with pytest.raises(InvalidInputError, match="units are not metres") as info:
        GeoPairDataset({"g": geographic}, 100)
    assert info.value.field == "sources"
    with pytest.raises(FileNotFoundError, match=r"Sensor 'x': raster .*missing\.tif does not exist"):
        GeoPairDataset({"a": a, "x": tmp_path / "missing.tif"}, 100)


def test_geo_pairs_mosaic_several_files_and_honour_nodata_choices(tmp_path):
    reference = write_raster(tmp_path / "ref.tif", "EPSG:32633", 10)
    with rasterio.open(reference, "r+") as dst:  # a black corner, 100 m x 100 m, with no nodata metadata
        dst.write(np.zeros((3, 10, 10), np.uint8), window=rasterio.windows.Window(0, 0, 10, 10))
    west = write_raster(tmp_path / "west.tif", "EPSG:32633", 10, size=(40, 20), fill=10)
    east = write_raster(tmp_path / "east.tif", "EPSG:32633", 10, size=(40, 20), left=500_200, fill=20)
    sources = {"ref": reference, "sheets": RasterSource([west, east], size_px=15)}
    pairs = GeoPairDataset(sources, 150, stride_m=50, max_nodata=0.0)
    assert len(pairs) == 36, "black pixels are data unless asked otherwise"
    straddling = pairs.windows.index((500_100.0, 3_999_850.0, 500_250.0, 4_000_000.0))
    sheets = pairs[straddling]["images"]["sheets"]
    assert (sheets[:, :, :10] == 10).all() and (sheets[:, :, 10:] == 20).all(), "the second file fills the first's gap"
    assert pairs.reads["sheets"].pixel_aligned and pairs.reads["sheets"].paths == (str(west), str(east))

    no_black = GeoPairDataset({**sources, "ref": RasterSource(reference, zero_nodata=True)}, 150, stride_m=50, max_nodata=0.0)
    assert all(overlap_area(w, (500_000, 3_999_900, 500_100, 4_000_000)) == 0 for w in no_black.windows)
    assert len(no_black) == 36 - 4  # the 2 x 2 windows touching the black corner
    west_missing = GeoPairDataset(
        {"ref": reference, "sheets": RasterSource([west, east], nodata=10)}, 150, stride_m=50, max_nodata=0.0
    )
    assert min(w[0] for w in west_missing.windows) >= 500_200 and west_missing.reads["sheets"].nodata == 10


def test_the_data_set_reads_exactly_the_planned_footprints(tmp_path):
    """The planner alone decides the footprints (grid, split, nodata filter); the data set yields
    one chip per planned window, in order, holding that window's pixels. Both are checked against
    the test's own enumeration of the grid and its own reads of the files."""
    a = write_raster(tmp_path / "a.tif", "EPSG:32633", 10, nodata=0)
    with rasterio.open(a, "r+") as dst:  # 80 m x 180 m of nodata inside the training area
        dst.write(np.zeros((3, 8, 18), np.uint8), window=rasterio.windows.Window(0, 10, 18, 8))
    b = write_raster(tmp_path / "b.tif", "EPSG:32633", 5, size=80)
    kwargs = dict(stride_m=50, max_nodata=0.2, split="train", val_fraction=0.25, gap_m=0)
    plan = plan_pairs({"a": a, "b": b}, 100, **kwargs)
    pairs = GeoPairDataset({"a": a, "b": b}, 100, **kwargs)
    assert pairs.plan == plan

    def own_read(path, bounds):
        with rasterio.open(path) as src:
            return src.read(window=rasterio.windows.from_bounds(*bounds, transform=src.transform)).astype(np.float32)

    # The training area is the southern 300 m (validation: the northern 100 m); windows of 100 m
    # every 50 m, left to right then top to bottom; kept where at most 20 % of a's pixels are 0.
    grid = [(500_000.0 + x, top - 100.0, 500_100.0 + x, top) for top in (3_999_900.0, 3_999_850.0, 3_999_800.0,
            3_999_750.0, 3_999_700.0) for x in range(0, 301, 50)]
    missing = [float((own_read(a, w) == 0).all(axis=0).mean()) for w in grid]
    assert 0 < sum(m > 0.2 for m in missing) < len(grid), "the filter drops some windows, not all"
    assert plan.windows == [w for w, m in zip(grid, missing) if m <= 0.2]
    assert [f["a"] for f in plan.nodata_fractions] == pytest.approx([m for m in missing if m <= 0.2])
    assert all(f["b"] == 0 for f in plan.nodata_fractions)
    assert plan.regions == [(500_000.0, 3_999_600.0, 500_400.0, 3_999_900.0)]

    items = list(pairs)
    assert [item["bounds"] for item in items] == plan.windows and [item["index"] for item in items] == list(range(len(items)))
    for item, window in zip(items, plan.windows):
        assert np.array_equal(item["images"]["a"].numpy(), own_read(a, window))
        assert np.array_equal(item["images"]["b"].numpy(), own_read(b, window))
    planned = GeoPairDataset.from_plan(plan, transform=lambda images: images["b"])
    assert len(planned) == len(items) and planned.windows == pairs.windows and planned.reads == pairs.reads
    assert all(torch.equal(planned[i]["images"], item["images"]["b"]) for i, item in enumerate(items))


def test_geo_pairs_items_pickle_and_load_in_worker_processes(tmp_path):
    a = write_raster(tmp_path / "a.tif", "EPSG:32633", 10)
    b = write_raster(tmp_path / "b.tif", "EPSG:32633", 20, size=20)
    pairs = GeoPairDataset({"a": a, "b": b}, footprint_px=10)
    assert len(pairs) == 16 and pairs.reads["a"].pixel_aligned and pairs.reads["b"].out_shape == (5, 5)
    first = pairs[0]
    clone = pickle.loads(pickle.dumps(pairs))
    assert torch.equal(clone[0]["images"]["a"], first["images"]["a"])
    loader = torch.utils.data.DataLoader(pairs, batch_size=4, num_workers=2)
    batches = list(loader)
    assert len(batches) == 4 and torch.equal(batches[0]["images"]["b"][0], first["images"]["b"])


# ---- georeferenced pairs: the real co-registered homonim rasters ---------------------------


@pytest.fixture(scope="module")
def aerial_pairs() -> GeoPairDataset:
    require_shared_data()
    return GeoPairDataset({"sentinel2_rgb": S2, "aerial": AERIAL}, footprint_m=640)


def test_homonim_rasters_are_what_the_notice_says():
    require_shared_data()
    with rasterio.open(S2.paths[0]) as s2, rasterio.open(AERIAL.paths[0]) as aerial, rasterio.open(LANDSAT.paths[0]) as landsat:
        assert s2.crs == aerial.crs == landsat.crs and s2.crs.is_projected
        assert (s2.res, aerial.res, landsat.res) == ((10.0, 10.0), (5.0, 5.0), (30.0, 30.0))
        assert (s2.nodata, aerial.nodata, landsat.nodata) == (None, 0.0, 0.0)
        assert landsat.count == 24 and landsat.descriptions[1:4] == ("SR_B2", "SR_B3", "SR_B4")


def test_aerial_sentinel2_pairs_share_their_footprint(aerial_pairs):
    pairs = aerial_pairs
    assert 100 <= len(pairs) <= 130  # 116 with GDAL 3.10: 170 grid cells, the rest mostly nodata
    item = pairs[5]
    assert item["images"]["sentinel2_rgb"].shape == (3, 64, 64) and item["images"]["aerial"].shape == (3, 128, 128)
    assert item["images"]["aerial"].dtype == torch.float32 and float(item["images"]["aerial"].max()) > 1.0
    left, bottom, right, top = item["bounds"]
    assert (right - left, top - bottom) == (640, 640) and item["bounds"] == pairs.windows[5] and item["index"] == 5
    assert "Transverse_Mercator" in item["crs"]
    s2, aerial = pairs.reads["sentinel2_rgb"], pairs.reads["aerial"]
    assert s2.pixel_aligned and s2.out_res_m == (10.0, 10.0)
    assert not aerial.pixel_aligned and aerial.resampling == "bilinear"  # the survey's grid is offset by a sub-pixel
    assert len(aerial.paths) == 3 and aerial.nodata == "file"
    by_px = GeoPairDataset({"sentinel2_rgb": S2, "aerial": AERIAL}, footprint_px=64)
    assert by_px.windows == pairs.windows


def test_nodata_dominated_footprints_are_skipped(aerial_pairs):
    everything = GeoPairDataset({"sentinel2_rgb": S2, "aerial": AERIAL}, footprint_m=640, max_nodata=1.0)
    assert len(everything) > len(aerial_pairs) + 40
    assert max(f["aerial"] for f in everything.nodata_fractions) > 0.9
    for i in range(len(aerial_pairs)):
        aerial = aerial_pairs[i]["images"]["aerial"]
        assert float((aerial == 0).all(dim=0).float().mean()) <= 0.05, f"footprint {i} is mostly nodata"
    geojson = aerial_pairs.to_geojson()
    assert len(geojson["features"]) == len(aerial_pairs)
    assert geojson["features"][0]["geometry"]["coordinates"][0][0] == list(aerial_pairs.windows[0][:2])


def test_half_overlap_multiplies_the_pairs(aerial_pairs, tmp_path):
    overlapping = GeoPairDataset({"sentinel2_rgb": S2, "aerial": AERIAL}, footprint_m=640, stride_m=320)
    assert 3.5 * len(aerial_pairs) <= len(overlapping) <= 4.5 * len(aerial_pairs)
    a, b = overlapping.windows[0], overlapping.windows[1]
    assert (b[0] - a[0], b[1] - a[1]) in {(320.0, 0.0), (0.0, -320.0)}  # half a footprint apart
    saved = json.loads(overlapping.to_geojson(tmp_path / "windows.geojson") and (tmp_path / "windows.geojson").read_text())
    assert len(saved["features"]) == len(overlapping)


def test_pairs_are_co_registered_not_just_same_sized(aerial_pairs):
    pairs = aerial_pairs
    matched, mismatched = [], []
    for i in range(0, len(pairs), 3):
        s2 = grey(pairs[i]["images"]["sentinel2_rgb"])
        matched.append(pearson(s2, grey(pairs[i]["images"]["aerial"], 2)))
        mismatched.append(pearson(s2, grey(pairs[(i + len(pairs) // 2) % len(pairs)]["images"]["aerial"], 2)))
    assert np.median(matched) > 0.6 and np.median(np.abs(mismatched)) < 0.3

    # The aerial resampled to 10 m by the data set itself correlates best at zero shift (+-1 px).
    at_10m = GeoPairDataset(
        {"sentinel2_rgb": S2, "aerial": RasterSource(AERIAL.paths, size_px=64)}, footprint_m=640, max_nodata=0.0
    )
    assert at_10m.reads["aerial"].resampling == "average"
    score = np.zeros((7, 7))
    for i in range(0, len(at_10m), 4):
        images = at_10m[i]["images"]
        s2, aerial = images["sentinel2_rgb"].mean(0).numpy(), images["aerial"].mean(0).numpy()
        for dy in range(-3, 4):
            for dx in range(-3, 4):
                score[dy + 3, dx + 3] += pearson(s2[4:-4, 4:-4].ravel(), aerial[4 + dy : 60 + dy, 4 + dx : 60 + dx].ravel())
    best = np.unravel_index(score.argmax(), score.shape)
    assert abs(best[0] - 3) <= 1 and abs(best[1] - 3) <= 1 and score[3, 3] > 1.2 * score[0, 0]


def test_spatial_split_is_disjoint_and_sized_by_area():
    require_shared_data()
    kwargs = dict(footprint_m=640, stride_m=320, split_axis="y", val_fraction=0.25, gap_m=640)
    sources = {"sentinel2_rgb": S2, "aerial": AERIAL}
    train = GeoPairDataset(sources, split="train", **kwargs)
    val = GeoPairDataset(sources, split="val", **kwargs)
    extent = train.extent
    area = (extent[2] - extent[0]) * (extent[3] - extent[1])
    assert sum(overlap_area(r, extent) for r in val.regions) == pytest.approx(0.25 * area)
    assert val.regions[0][3] == extent[3], "validation is the northern strip"
    assert len(train) > 2 * len(val) > 20
    assert all(overlap_area(t, v) == 0 for t in train.windows for v in val.windows)
    assert min(v[1] for v in val.windows) - max(t[3] for t in train.windows) >= 640
    assert all(any(overlap_area(w, r) == 640 * 640 for r in val.regions) for w in val.windows)
    again = GeoPairDataset(sources, split="val", **kwargs)
    assert again.windows == val.windows and torch.equal(again[0]["images"]["aerial"], val[0]["images"]["aerial"])


def test_sentinel2_landsat_pairs():
    require_shared_data()
    pairs = GeoPairDataset({"sentinel2_rgb": S2, "landsat8_rgb": LANDSAT}, footprint_m=640)
    assert 200 <= len(pairs) <= 300  # 252: the whole Sentinel-2 extent is valid
    item = pairs[3]
    assert item["images"]["sentinel2_rgb"].shape == (3, 64, 64) and item["images"]["landsat8_rgb"].shape == (3, 21, 21)
    landsat = pairs.reads["landsat8_rgb"]
    assert landsat.resampling == "average" and not landsat.pixel_aligned
    assert landsat.out_res_m[0] == pytest.approx(640 / 21)

    aligned = GeoPairDataset({"sentinel2_rgb": S2, "landsat8_rgb": LANDSAT}, footprint_m=960, reference="landsat8_rgb")
    assert aligned.reads["landsat8_rgb"].pixel_aligned and aligned.reads["sentinel2_rgb"].pixel_aligned
    scores = [
        pearson(grey(aligned[i]["images"]["sentinel2_rgb"], 3), grey(aligned[i]["images"]["landsat8_rgb"]))
        for i in range(0, len(aligned), 5)
    ]
    assert np.median(scores) > 0.8


# ---- views -----------------------------------------------------------------------------------


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
    with pytest.raises(InvalidInputError, match=r"expects C x H x W with C = 3") as info:
        augment(torch.rand(4, 64, 64))
    assert info.value.field == "image"
    with pytest.raises(InvalidOptionError, match=r"local_scale must be area fractions") as info:
        MultiCropAugment(get_sensor("sentinel2_rgb"), 64, 32, local_scale=(0.5, 0.4))
    assert info.value.field == "local_scale"


def test_native_multicrop_views_are_unresized_windows_at_random_positions():
    augment = MultiCropAugment(
        get_sensor("sentinel2_rgb"), 16, 8, n_global=2, n_local=2, jitter=0.0, blur_p=0.0, grey_p=0.0, noise_p=0.0,
        native=True,
    )
    image = torch.rand(3, 24, 24) * 255
    positions = set()
    for seed in range(4):
        views = augment(image, torch.Generator().manual_seed(seed))
        assert [v.shape[-1] for v in views] == [16, 16, 8, 8]
        for view in views:
            window = window_of(view, image)
            assert window is not None, "a native view is a window of the image, pixel for pixel"
            positions.add((view.shape[-1], window))
    assert len(positions) > 8, "views land at different positions"
    resized = MultiCropAugment(get_sensor("sentinel2_rgb"), 16, 8, jitter=0.0, blur_p=0.0, grey_p=0.0, noise_p=0.0)
    assert window_of(resized(image, torch.Generator().manual_seed(0))[2], image) is None
    with pytest.raises(InvalidInputError, match=r"native-resolution views of 16 px need images of at least that size") as info:
        augment(torch.rand(3, 24, 12) * 255)
    assert info.value.field == "images"


def test_multicrop_handles_any_band_count_and_dn_scale_and_greys_only_rgb():
    thirteen = MultiCropAugment(get_sensor("sentinel2"), 32, 16, n_local=1, grey_p=1.0, noise_p=1.0)
    assert thirteen.grey_p == 0.0, "no colour-to-grey for a 13-band sensor"
    image = torch.rand(13, 40, 40) * 3000 + 1000
    views = thirteen(image, torch.Generator().manual_seed(0))
    assert [v.shape for v in views] == [(13, 32, 32)] * 2 + [(13, 16, 16)]
    ratio = views[0].mean() / image.mean()
    assert 0.5 < float(ratio) < 1.7, "photometric jitter stays relative to the image's own level"
    rgb = MultiCropAugment(get_sensor("sentinel2_rgb"), 16, 8, n_local=0, grey_p=1.0, blur_p=0.0, noise_p=0.0)
    grey_view = rgb(torch.rand(3, 20, 20) * 255, torch.Generator().manual_seed(0))[0]
    assert torch.allclose(grey_view[0], grey_view[1]) and torch.allclose(grey_view[1], grey_view[2])
