"""A scene, or blocks of its strips, embedded into memory (scenes/tiles.py) equals embed_scene's
cls output on the real Sentinel-2 sample; footprints in EPSG:4326; bounds given in another CRS
(bounds_crs); the out-of-scene error names the scene's bounds in order."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pyarrow.parquet
import pytest
import rasterio
from factories import tiny_model
from rasterio.warp import transform as warp

from xstars_models.cli import main
from xstars_models.errors import InvalidInputError, InvalidOptionError
from xstars_models.samples import sample_path
from xstars_models.scenes import SceneOptions, TileTable, embed_scene, embed_tiles, scene_grid

SENSOR = "sentinel2_rgb"  # 10 m, patch 8 px in the tiny model
SAMPLE = sample_path("sentinel2_rgb_inland")  # 256 x 256 px, 3 x uint8, EPSG:32618, 10 m
LEFT, TOP = 437730.0, 4176460.0  # its upper-left corner; 2560 m on a side


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def holed(tmp_path_factory) -> Path:
    """The sample with nodata=0 and a zero block over rows 0-47 and columns 0-95: with 64 px tiles
    and no overlap, tile (0, 0) is 75 % missing (left out at max_nodata=0.5), tile (0, 1) 37.5 %."""
    with rasterio.open(SAMPLE) as src:
        meta, data = src.profile, src.read()
    data[:, :48, :96] = 0
    meta.update(nodata=0)
    path = tmp_path_factory.mktemp("scene") / "holed.tif"
    with rasterio.open(path, "w", **meta) as dst:
        dst.write(data)
    return path


def concat(tables: list[TileTable]) -> dict[str, np.ndarray]:
    return {name: np.concatenate([getattr(t, name) for t in tables])
            for name in ("row", "col", "embedding", "native_bounds", "rings_4326", "bbox_4326")}


def assert_tables_equal(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


@pytest.mark.parametrize("overlap", [0, 16])
def test_blocks_of_strips_equal_embed_scene_cls_on_the_valid_tiles(model, holed, tmp_path, overlap):
    options = SceneOptions(tile=64, overlap=overlap, precision="fp32", progress=False)
    written = embed_scene(model, holed, SENSOR, out=tmp_path / "tiles.parquet", output="cls", options=options)
    reference = pyarrow.parquet.read_table(written.path).to_pydict()
    valid = np.asarray(reference["valid"])
    assert 0 < (~valid).sum() < len(valid)  # max_nodata left some tiles out
    expected = {(r, c): np.asarray(e, np.float32)
                for r, c, e, v in zip(reference["row"], reference["col"], reference["embedding"], valid) if v}

    before = sorted(p.name for p in holed.parent.iterdir())
    grid = scene_grid(model, holed, SENSOR, options)
    assert (grid.strips, grid.tiles_per_strip, grid.crs) == ((4, 4) if overlap == 0 else (5, 5)) + ("EPSG:32618",)
    whole = embed_tiles(model, holed, SENSOR, options)
    k = grid.strips // 2
    blocks = [embed_tiles(model, holed, SENSOR, options, strips=range(0, k)),
              embed_tiles(model, holed, SENSOR, options, strips=range(k, grid.strips))]
    assert sorted(p.name for p in holed.parent.iterdir()) == before  # nothing written beside the scene
    assert all(t.crs == "EPSG:32618" and t.precision == "fp32" for t in (whole, *blocks))
    assert blocks[0].skipped + blocks[1].skipped == whole.skipped == written.skipped == (~valid).sum()
    assert_tables_equal(concat(blocks), concat([whole]))

    keys = list(zip(whole.row.tolist(), whole.col.tolist()))
    assert keys == list(expected)  # same tiles, same order: strip by strip, left to right
    assert whole.row.dtype == whole.col.dtype == np.int32 and whole.embedding.dtype == np.float32
    np.testing.assert_allclose(whole.embedding, np.stack(list(expected.values())), rtol=0, atol=1e-6)

    # Native footprints are embed_scene's geometries; the EPSG:4326 rings map back onto them.
    import geopandas

    frame = geopandas.read_parquet(written.path)
    np.testing.assert_allclose(whole.native_bounds, frame.geometry.bounds.to_numpy()[valid], rtol=0, atol=1e-6)
    rings = whole.rings_4326
    assert rings.shape == (len(keys), 5, 2) and np.array_equal(rings[:, 0], rings[:, -1])
    x, y = warp("EPSG:4326", "EPSG:32618", rings[..., 0].ravel(), rings[..., 1].ravel())
    back = np.stack([x, y], axis=-1).reshape(rings.shape)
    corners = np.stack([back.min(axis=1), back.max(axis=1)], axis=1).reshape(-1, 4)
    np.testing.assert_allclose(corners, whole.native_bounds, rtol=0, atol=1e-3)  # metres
    for ring, (minx, miny, maxx, maxy) in zip(back, whole.native_bounds):  # each corner is one of the box's
        assert sorted(map(tuple, np.round(ring[:4], 3))) == sorted(
            map(tuple, np.round([(minx, miny), (minx, maxy), (maxx, miny), (maxx, maxy)], 3)))
    # (longitude, latitude) of a scene in Virginia, counter-clockwise, boxed by bbox_4326.
    assert np.all((-77 < rings[..., 0]) & (rings[..., 0] < -75) & (37 < rings[..., 1]) & (rings[..., 1] < 38.5))
    xs, ys = rings[..., 0], rings[..., 1]
    assert np.all((xs[:, :-1] * ys[:, 1:] - xs[:, 1:] * ys[:, :-1]).sum(axis=1) > 0)
    np.testing.assert_array_equal(whole.bbox_4326, np.concatenate([rings.min(axis=1), rings.max(axis=1)], axis=1))
    west, south, east, north = grid.bounds_4326
    assert west <= rings[..., 0].min() and rings[..., 0].max() <= east
    assert south <= rings[..., 1].min() and rings[..., 1].max() <= north


def test_an_empty_block_and_bad_strips(model, holed):
    options = SceneOptions(tile=128, precision="fp32", progress=False)
    empty = embed_tiles(model, holed, SENSOR, options, strips=range(1, 1))
    assert empty.embedding.shape == (0, model.embed_dim) and empty.rings_4326.shape == (0, 5, 2) and empty.skipped == 0
    for bad in (range(0, 3), range(0, 2, 2), range(-1, 1), [0, 1]):
        with pytest.raises(InvalidOptionError, match="strips must be a range") as info:
            embed_tiles(model, holed, SENSOR, options, strips=bad)
        assert info.value.field == "strips"
    with pytest.raises(InvalidOptionError, match="needs at least one strip") as info:
        embed_tiles(model, holed, SENSOR, options, strips=range(1, 1), map_piece=holed.parent / "piece.tif")
    assert info.value.field == "strips" and not (holed.parent / "piece.tif").exists()


@pytest.mark.parametrize(("overlap", "per_block"), [(0, 1), (16, 2), (48, 1)])
def test_map_pieces_of_blocks_stack_into_embed_scene_map(model, holed, tmp_path, overlap, per_block):
    """With overlap, a block's first rows also get tiles of the strips above it (48 px of 64 px
    tiles: three strips), which the block embeds for its piece but not for its table."""
    options = SceneOptions(tile=64, overlap=overlap, precision="fp32", progress=False)
    written = embed_scene(model, holed, SENSOR, out=tmp_path / "map.tif", output="map", options=options)
    strips = scene_grid(model, holed, SENSOR, options).strips
    pieces, tables = [], []
    for k, start in enumerate(range(0, strips, per_block)):
        pieces.append(tmp_path / f"piece{k}.tif")
        tables.append(embed_tiles(model, holed, SENSOR, options, strips=range(start, min(start + per_block, strips)),
                                  map_piece=pieces[-1]))
    assert_tables_equal(concat(tables), concat([embed_tiles(model, holed, SENSOR, options)]))
    with rasterio.open(written.path) as src:
        expected, transform, crs = src.read(), src.transform, src.crs
    stacked = []
    for piece in pieces:
        with rasterio.open(piece) as src:
            assert src.crs == crs and src.transform == transform @ rasterio.Affine.translation(0, sum(
                a.shape[1] for a in stacked))
            stacked.append(src.read())
    assert np.isnan(expected).any() and not np.isnan(expected).all()  # the hole has no tokens
    np.testing.assert_allclose(np.concatenate(stacked, axis=1), expected, rtol=0, atol=1e-6, equal_nan=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["map.tif", *(p.name for p in pieces)])


def test_a_map_piece_is_not_whitened(model, holed, tmp_path):
    options = SceneOptions(tile=128, precision="fp32", progress=False, whiten=True)
    with pytest.raises(InvalidOptionError, match="not whitened") as info:
        embed_tiles(model, holed, SENSOR, options, map_piece=tmp_path / "piece.tif")
    assert info.value.field == "whiten" and not list(tmp_path.iterdir())


def test_whitened_tiles_equal_embed_scene_whitened(tmp_path):
    from toy_data import ToyPairs

    from xstars_models.training import fit_global_whitening

    model = tiny_model()
    model.whitening = fit_global_whitening(model, ToyPairs(6), fit_on="six toy pairs", progress=False)
    options = SceneOptions(tile=128, precision="fp32", progress=False, whiten=True)
    written = embed_scene(model, SAMPLE, SENSOR, out=tmp_path / "w.parquet", output="cls", options=options)
    expected = np.asarray(pyarrow.parquet.read_table(written.path).column("embedding").to_pylist(), np.float32)
    table = embed_tiles(model, SAMPLE, SENSOR, options)
    np.testing.assert_allclose(table.embedding, expected, rtol=0, atol=1e-6)
    plain = embed_tiles(model, SAMPLE, SENSOR, SceneOptions(tile=128, precision="fp32", progress=False))
    assert not np.allclose(plain.embedding, table.embedding, atol=1e-3)


def test_a_scene_without_a_crs_is_refused(model):
    with rasterio.open(SAMPLE) as src:
        pixels, transform = src.read(), src.transform
    options = SceneOptions(tile=128, precision="fp32", progress=False)
    for call in (scene_grid, embed_tiles):
        with pytest.raises(InvalidInputError, match="has no CRS") as info:
            call(model, pixels, SENSOR, options)
        assert info.value.field == "source"
    # The same pixels with their CRS and transform are the file's tiles.
    placed = embed_tiles(model, pixels, SENSOR, SceneOptions(tile=128, precision="fp32", progress=False,
                                                              crs="EPSG:32618", transform=transform))
    assert_tables_equal(concat([placed]), concat([embed_tiles(model, SAMPLE, SENSOR, options)]))


def _envelope(box: tuple[float, float, float, float], src: str, dst: str, points: int = 2001) -> tuple[float, ...]:
    """The envelope in ``dst`` of ``box`` in ``src``, its edges sampled at ``points`` points."""
    left, bottom, right, top = box
    t = np.linspace(0, 1, points)
    xs = np.concatenate([left + (right - left) * t, np.full(points, right), right - (right - left) * t, np.full(points, left)])
    ys = np.concatenate([np.full(points, bottom), bottom + (top - bottom) * t, np.full(points, top), top - (top - bottom) * t])
    x, y = warp(src, dst, xs, ys)
    return min(x), min(y), max(x), max(y)


def test_lonlat_bounds_select_the_same_area_as_their_utm_envelope(model, tmp_path):
    # A box of about 1.3 x 1.1 km inside the scene, in longitude and latitude.
    (lon0,), (lat0,) = warp("EPSG:32618", "EPSG:4326", [LEFT + 700.3], [TOP - 1900.7])
    lonlat = (lon0, lat0, lon0 + 0.015, lat0 + 0.01)
    utm = _envelope(lonlat, "EPSG:4326", "EPSG:32618")
    # Its edges fall well inside pixels, so rounding to pixels cannot differ between the two.
    edges = np.array([utm[0] - LEFT, TOP - utm[1], utm[2] - LEFT, TOP - utm[3]]) / 10
    assert np.all(np.abs(edges - np.round(edges)) > 0.01), edges
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "holed|.*not a multiple of sensor", UserWarning)
        by_lonlat = SceneOptions(tile=64, precision="fp32", progress=False, bounds=lonlat, bounds_crs="EPSG:4326")
        by_utm = SceneOptions(tile=64, precision="fp32", progress=False, bounds=utm)
        assert scene_grid(model, SAMPLE, SENSOR, by_lonlat) == scene_grid(model, SAMPLE, SENSOR, by_utm)
        a, b = embed_tiles(model, SAMPLE, SENSOR, by_lonlat), embed_tiles(model, SAMPLE, SENSOR, by_utm)
        assert len(a.row) >= 4
        assert_tables_equal(concat([a]), concat([b]))
        # The area starts at the first pixel the box touches.
        assert a.native_bounds[:, 0].min() == LEFT + 10 * np.floor((utm[0] - LEFT) / 10)
        assert a.native_bounds[:, 3].max() == TOP - 10 * np.floor((TOP - utm[3]) / 10)
        # embed_scene and the command take it too, and select the same tiles.
        written = embed_scene(model, SAMPLE, SENSOR, out=tmp_path / "ll.parquet", output="cls", options=by_lonlat)
        assert written.tiles == len(a.row)
        folder = model.save_pretrained(tmp_path / "model")
        out = tmp_path / "cli.parquet"
        argv = ["embed-scene", str(folder), str(SAMPLE), "--sensor", SENSOR, "--out", str(out), "--output", "cls",
                "--tile", "64", "--precision", "fp32", "--no-progress", "--offline",
                "--bounds", *map(repr, lonlat), "--bounds-crs", "EPSG:4326"]
        assert main(argv) == 0
    cli = pyarrow.parquet.read_table(out).to_pydict()
    assert list(zip(cli["row"], cli["col"])) == list(zip(a.row.tolist(), a.col.tolist()))
    np.testing.assert_allclose(np.asarray(cli["embedding"], np.float32), a.embedding, rtol=0, atol=1e-6)


def test_out_of_scene_bounds_name_the_scene_bounds_in_order(model, tmp_path):
    with rasterio.open(SAMPLE) as src:
        left, bottom, right, top = src.bounds
    assert (left, bottom, right, top) == (LEFT, TOP - 2560, LEFT + 2560, TOP)
    spans = f"which spans ({left:.0f}, {bottom:.0f}, {right:.0f}, {top:.0f}) (left, bottom, right, top) in its CRS."
    with pytest.raises(InvalidOptionError) as info:
        embed_scene(model, SAMPLE, SENSOR, out=tmp_path / "x.tif", bounds=(0, 0, 10, 10), progress=False)
    assert info.value.field == "bounds"
    assert "bounds (0, 0, 10, 10) do not overlap the scene, " + spans in str(info.value)
    # In longitude/latitude: the box as given, as placed in the scene's CRS, and the scene's bounds.
    with pytest.raises(InvalidOptionError) as info:
        scene_grid(model, SAMPLE, SENSOR, SceneOptions(bounds=(2, 48, 3, 49), bounds_crs="EPSG:4326"))
    assert info.value.field == "bounds"
    assert "bounds (2, 48, 3, 49) in EPSG:4326 (" in str(info.value) and str(info.value).endswith(spans)
    assert not list(tmp_path.iterdir())


def test_bounds_crs_is_checked_once(model, capsys, tmp_path):
    import pickle

    for bad in ("EPSG:99999999", "not a crs", "", 4326):
        with pytest.raises(InvalidOptionError, match="is not a CRS") as info:
            SceneOptions(bounds=(0, 0, 1, 1), bounds_crs=bad)
        assert info.value.field == "bounds_crs"
    options = SceneOptions(bounds=(-76.5, 37.5, -76.4, 37.6), bounds_crs="EPSG:4326")
    assert pickle.loads(pickle.dumps(options)) == options
    # An array without a CRS cannot place bounds given in one.
    pixels = np.zeros((3, 64, 64), np.uint8)
    with pytest.raises(InvalidOptionError, match="has no CRS") as info:
        scene_grid(model, pixels, SENSOR, options)
    assert info.value.field == "bounds_crs"
    # The command names its flag.
    folder = model.save_pretrained(tmp_path / "model")
    argv = ["embed-scene", str(folder), str(SAMPLE), "--sensor", SENSOR, "--out", str(tmp_path / "x.tif"),
            "--bounds", "0", "0", "1", "1", "--bounds-crs", "EPSG:bogus"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "xstars embed-scene: error: --bounds-crs EPSG:bogus is not a CRS" in err and err.count("\n") == 1
