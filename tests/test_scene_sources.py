"""Scenes that are not local files: a cloud-optimised GeoTIFF behind HTTP (read by GDAL with range
requests from a loopback server that counts the bytes it sends), STAC Items (JSON file, URL or
pystac.Item) whose assets are picked by band name, and areas of interest (bounds= / window=)."""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import numpy as np
import pystac
import pytest
import rasterio
from affine import Affine
from rasterio.windows import Window

from factories import tiny_model
from range_server import RangeServer
from xstars_models.cli import main
from xstars_models.errors import InvalidInputError, InvalidOptionError
from xstars_models.samples import sample_path
from xstars_models.scenes import embed_scene
from xstars_models.scenes.stac import open_stac_item, pick_assets
from xstars_models.sensors import get_sensor

SENSOR = "sentinel2_rgb"  # 10 m, patch 8 px in the tiny model
SAMPLE = sample_path("sentinel2_rgb_inland")  # 256 x 256 px, 3 x uint8, EPSG:32618, 10 m
WINDOW = (512, 768, 128, 128)  # row, col, height, width in input pixels


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A 2048 x 2048 px COG (the sample tiled 8 x 8, each copy shifted in value so no two are the
    same), its pixels, single-band COGs of each band, and the server."""
    root = tmp_path_factory.mktemp("www")
    with rasterio.open(SAMPLE) as src:
        tile, profile = src.read(), src.profile
    pixels = np.concatenate(
        [np.concatenate([(tile.astype(np.int32) + 7 * (8 * i + j)) % 256 for j in range(8)], axis=2) for i in range(8)],
        axis=1,
    ).astype(np.uint8)
    profile.update(driver="COG", width=2048, height=2048, compress="DEFLATE", blocksize=256)
    for key in ("blockxsize", "blockysize", "tiled", "interleave"):
        profile.pop(key, None)
    with rasterio.open(root / "scene.tif", "w", **profile) as dst:
        dst.write(pixels)
    for k, band in enumerate(("red", "green", "blue")):
        with rasterio.open(root / f"{band}.tif", "w", **{**profile, "count": 1}) as dst:
            dst.write(pixels[k : k + 1])
    server = RangeServer(root)
    base = server.start()
    yield root, pixels, server, base
    server.stop()


def read_map(path: Path) -> tuple[np.ndarray, dict]:
    with rasterio.open(path) as src:
        return src.read(), src.profile


def test_window_of_a_remote_cog_reads_a_small_part_of_it(model, served, tmp_path):
    root, pixels, server, base = served
    server.clear_log()
    result = embed_scene(model, f"{base}/scene.tif", SENSOR, out=tmp_path / "aoi.tif", window=WINDOW, tile=64, progress=False)
    size = (root / "scene.tif").stat().st_size
    assert server.requests, "GDAL never asked the server"
    assert all(method in ("HEAD", "GET") for method, _, _ in server.requests)
    assert [r for r in server.requests if r[0] == "GET" and r[2] is None] == [], "a GET without Range: full download"
    assert server.bytes_sent < size / 10, f"{server.bytes_sent} of {size} bytes for a 1/256 window"
    values, profile = read_map(result.path)
    row, col, h, w = WINDOW
    expected = model.embed(pixels[:, row : row + h, col : col + w], SENSOR, output="map", progress=False)[0].numpy()
    assert values.shape == expected.shape == (model.embed_dim, 16, 16)
    # Tiles of 8 x 8 tokens: each equals embed() of its pixels.
    np.testing.assert_allclose(values[:, :8, :8], model.embed(pixels[:, row : row + 64, col : col + 64], SENSOR, output="map", progress=False)[0].numpy(), atol=1e-4)
    with rasterio.open(root / "scene.tif") as src:
        assert profile["transform"] == src.transform @ Affine.translation(col, row) @ Affine.scale(8)
        assert profile["crs"] == src.crs


def test_bounds_and_window_select_the_same_area(model, served, tmp_path):
    root, _, _, base = served
    with rasterio.open(root / "scene.tif") as src:
        t = src.transform
    row, col, h, w = WINDOW
    # Bounds a little inside the window's edges still cover every pixel they touch: the window.
    bounds = (t.c + (col + 0.3) * t.a, t.f + (row + h - 0.3) * t.e, t.c + (col + w - 0.3) * t.a, t.f + (row + 0.3) * t.e)
    by_window = embed_scene(model, root / "scene.tif", SENSOR, out=tmp_path / "w.tif", window=WINDOW, tile=64, progress=False)
    by_bounds = embed_scene(model, f"{base}/scene.tif", SENSOR, out=tmp_path / "b.tif", bounds=bounds, tile=64, progress=False)
    np.testing.assert_array_equal(read_map(by_bounds.path)[0], read_map(by_window.path)[0])
    assert read_map(by_bounds.path)[1]["transform"] == read_map(by_window.path)[1]["transform"]
    with pytest.raises(InvalidOptionError, match=r"bounds .* do not overlap the scene, which spans") as info:
        embed_scene(model, root / "scene.tif", SENSOR, out=tmp_path / "x.tif", bounds=(0, 0, 10, 10), progress=False)
    assert info.value.field == "bounds"
    with pytest.raises(InvalidOptionError, match=r"window \(row 2000, col 0, height 128, width 128\) is not inside the scene's 2048 x 2048") as info:
        embed_scene(model, root / "scene.tif", SENSOR, out=tmp_path / "x.tif", window=(2000, 0, 128, 128), progress=False)
    assert info.value.field == "window"
    with pytest.raises(InvalidOptionError, match="bounds= or window=, not both") as info:
        embed_scene(model, root / "scene.tif", SENSOR, out=tmp_path / "x.tif", bounds=bounds, window=WINDOW, progress=False)
    assert info.value.field == "window"
    with pytest.raises(InvalidOptionError, match=r"transform= and crs= are for array sources") as info:
        embed_scene(model, root / "scene.tif", SENSOR, out=tmp_path / "x.tif", crs="EPSG:32618", progress=False)
    assert info.value.field == "crs"


def test_a_rasterio_window_and_the_tuple_of_the_same_area_give_identical_outputs(model, served, tmp_path):
    root, _, _, _ = served
    # Not square and not on the diagonal, so that any swap of rows and columns moves the area.
    row, col, height, width = 512, 768, 64, 128
    by_tuple = embed_scene(model, root / "scene.tif", SENSOR, out=tmp_path / "t.tif", window=(row, col, height, width),
                           tile=64, progress=False)
    by_window = embed_scene(model, root / "scene.tif", SENSOR, out=tmp_path / "w.tif",
                            window=Window(col_off=col, row_off=row, width=width, height=height), tile=64, progress=False)
    values, profile = read_map(by_tuple.path)
    assert values.shape == (model.embed_dim, height // 8, width // 8)
    np.testing.assert_array_equal(read_map(by_window.path)[0], values)
    with rasterio.open(root / "scene.tif") as src:
        assert profile["transform"] == src.transform @ Affine.translation(col, row) @ Affine.scale(8)
    assert read_map(by_window.path)[1]["transform"] == profile["transform"]
    # The same numbers in rasterio's order as a tuple are another area.
    swapped = embed_scene(model, root / "scene.tif", SENSOR, out=tmp_path / "s.tif", window=(col, row, width, height),
                          tile=64, progress=False)
    assert read_map(swapped.path)[0].shape == (model.embed_dim, width // 8, height // 8)


def write_item(root: Path, base: str, assets: dict[str, tuple[str, list[dict]]], extra: dict | None = None) -> pystac.Item:
    with rasterio.open(root / "scene.tif") as src:
        left, bottom, right, top = src.bounds
    item = pystac.Item("S2-test", geometry=None, bbox=None, datetime=__import__("datetime").datetime(2024, 6, 1), properties={})
    for key, (name, bands) in assets.items():
        item.add_asset(key, pystac.Asset(f"{base}/{name}", media_type=pystac.MediaType.COG, roles=["data"],
                                         extra_fields={"eo:bands": bands, **(extra or {}).get(key, {})}))
    item.set_self_href(str(root / "item.json"))
    item.save_object(include_self_link=False, dest_href=str(root / "item.json"))
    return item


def test_stac_item_by_url_file_or_object_picks_bands_by_name(model, served, tmp_path):
    root, pixels, server, base = served
    # Bands in another order than the sensor's, one per asset, named as Sentinel-2 items name them.
    item = write_item(root, base, {
        "blue": ("blue.tif", [{"name": "B02", "common_name": "blue"}]),
        "green": ("green.tif", [{"name": "B03", "common_name": "green"}]),
        "red": ("red.tif", [{"name": "B04", "common_name": "red"}]),
        "thumbnail": ("none.png", []),
    })
    reference = read_map(embed_scene(model, root / "scene.tif", SENSOR, out=tmp_path / "ref.tif", window=WINDOW, tile=64, progress=False).path)
    server.clear_log()
    via_url = embed_scene(model, f"{base}/item.json", SENSOR, out=tmp_path / "url.tif", window=WINDOW, tile=64, progress=False)
    assets_size = sum((root / f"{b}.tif").stat().st_size for b in ("red", "green", "blue"))
    assert server.bytes_sent < assets_size / 10
    assert {path for _, path, _ in server.requests} >= {"/item.json", "/red.tif", "/green.tif", "/blue.tif"}
    for source in (f"{base}/item.json", root / "item.json", item):
        out = tmp_path / f"{type(source).__name__}.tif"
        result = via_url if isinstance(source, str) else embed_scene(model, source, SENSOR, out=out, window=WINDOW, tile=64, progress=False)
        values, profile = read_map(result.path)
        np.testing.assert_array_equal(values, reference[0])
        assert profile["transform"] == reference[1]["transform"] and profile["crs"] == reference[1]["crs"]


def test_stac_cls_output_through_the_cli(model, served, tmp_path, capsys):
    root, _, _, base = served
    write_item(root, base, {"visual": ("scene.tif", [{"name": n, "common_name": n} for n in ("red", "green", "blue")])})
    folder = model.save_pretrained(tmp_path / "model")
    out = tmp_path / "tiles.parquet"
    argv = ["embed-scene", str(folder), f"{base}/item.json", "--sensor", SENSOR, "--output", "cls", "--out", str(out),
            "--window", *map(str, WINDOW), "--tile", "64", "--no-progress", "--offline"]
    assert main(argv) == 0
    assert "4 tiles" in capsys.readouterr().out
    frame = __import__("geopandas").read_parquet(out)
    assert len(frame) == 4 and frame.crs.to_epsg() == 32618
    np.testing.assert_array_equal(frame["window"].iloc[3], [WINDOW[0] + 64, WINDOW[1] + 64, 64, 64])


def earth_search_like_item() -> pystac.Item:
    item = pystac.Item("x", geometry=None, bbox=None, datetime=__import__("datetime").datetime(2024, 6, 1), properties={})
    bands = {"B02": "blue", "B03": "green", "B04": "red", "B08": "nir"}
    for band, common in bands.items():
        for suffix, media in (("", pystac.MediaType.COG), ("-jp2", pystac.MediaType.JPEG2000)):
            item.add_asset(common + suffix, pystac.Asset(f"https://x/{band}{suffix or '.tif'}", media_type=media, extra_fields={
                "eo:bands": [{"name": band, "common_name": common}], "raster:bands": [{"data_type": "uint16"}]}))
    item.add_asset("visual", pystac.Asset("https://x/TCI.tif", media_type=pystac.MediaType.COG, extra_fields={
        "eo:bands": [{"name": "red", "common_name": "red"}, {"name": "green", "common_name": "green"}, {"name": "blue", "common_name": "blue"}],
        "raster:bands": [{"data_type": "uint8"}] * 3}))
    return item


def test_asset_choice_follows_band_names_and_data_types():
    item = earth_search_like_item()
    # An 8-bit RGB sensor: the one true-colour asset holds all its bands.
    assert pick_assets(item, get_sensor("sentinel2_rgb")) == [("visual", 1), ("visual", 2), ("visual", 3)]
    # 16-bit reflectance: the visual asset's uint8 does not fit; per-band COGs before JPEG 2000.
    reflectance = get_sensor("sentinel2").select(["B04", "B03", "B02", "B08"])
    assert pick_assets(item, reflectance) == [("red", 1), ("green", 1), ("blue", 1), ("nir", 1)]
    with pytest.raises(InvalidInputError, match=r"no asset with band 'coastal' \(B01\) of sensor 'sentinel2'\. Assets with eo:bands: blue: \['b02'\].*Passed over for a data type other than uint16: \['visual'\]") as info:
        pick_assets(item, get_sensor("sentinel2"))
    assert info.value.field == "source"


def test_remote_sources_need_an_explicit_out(model, served):
    _, _, _, base = served
    with pytest.raises(InvalidOptionError, match="out= is required when the scene is a URL or a STAC Item") as info:
        embed_scene(model, f"{base}/scene.tif", SENSOR, progress=False)
    assert info.value.field == "out"
    with pytest.raises(FileNotFoundError, match=r"Cannot open .*/missing\.tif as a raster over HTTP"):
        embed_scene(model, f"{base}/missing.tif", SENSOR, out=Path("unused.tif"), progress=False)


def test_units_are_checked_on_scenes_too(model, tmp_path):
    with rasterio.open(SAMPLE) as src:
        profile, data = src.profile, src.read()
    profile.update(dtype="float32")
    path = tmp_path / "scaled.tif"
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data.astype(np.float32) / 255)
    with pytest.raises(ValueError, match=r"scaled\.tif, rows 0-64 .*look already scaled.*uint8 digital numbers 0-255"):
        embed_scene(model, path, SENSOR, out=tmp_path / "x.tif", tile=64, progress=False)
    shutil.rmtree(tmp_path)


def test_stac_bands_at_another_resolution_are_resampled_onto_the_finest_grid(model, served, tmp_path):
    root, pixels, _, base = served
    with rasterio.open(root / "blue.tif") as src:
        profile = src.profile
    coarse = pixels[2].reshape(1024, 2, 1024, 2).mean(axis=(1, 3)).round().astype(np.uint8)[None]
    t = profile["transform"]
    with rasterio.open(root / "blue20.tif", "w", **{**profile, "width": 1024, "height": 1024,
                                                    "transform": Affine(t.a * 2, 0, t.c, 0, t.e * 2, t.f)}) as dst:
        dst.write(coarse)
    write_item(root, base, {
        "red": ("red.tif", [{"name": "B04", "common_name": "red"}]),
        "green": ("green.tif", [{"name": "B03", "common_name": "green"}]),
        "blue": ("blue20.tif", [{"name": "B02", "common_name": "blue"}]),
    })
    result = embed_scene(model, f"{base}/item.json", SENSOR, out=tmp_path / "mixed.tif", window=WINDOW, tile=64, progress=False)
    values, profile_out = read_map(result.path)
    reference = read_map(embed_scene(model, root / "scene.tif", SENSOR, out=tmp_path / "ref.tif", window=WINDOW, tile=64, progress=False).path)
    assert values.shape == reference[0].shape and profile_out["transform"] == reference[1]["transform"]
    # The 20 m blue band, upsampled onto the 10 m grid, gives features close to the 10 m scene's.
    similarity = (values * reference[0]).sum(0) / np.linalg.norm(values, axis=0) / np.linalg.norm(reference[0], axis=0)
    assert np.median(similarity) > 0.9 and not np.array_equal(values, reference[0])
    # The band itself lands where it belongs: close to the 20 m values repeated 2 x 2.
    with contextlib.ExitStack() as stack:
        dataset, _, _ = open_stac_item(root / "item.json", get_sensor(SENSOR), SENSOR, stack)
        row, col, h, w = WINDOW
        blue = dataset.read(3, window=Window(col, row, w, h)).astype(float)
    nearest = np.repeat(np.repeat(coarse[0], 2, axis=0), 2, axis=1)[row : row + h, col : col + w]
    error = np.abs(blue - nearest).mean()
    assert error < 1.0 and error < 0.5 * np.abs(blue - np.roll(nearest, 8, axis=1)).mean()
