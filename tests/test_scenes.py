"""Whole-scene embedding: the real Sentinel-2 sample GeoTIFF in, georeferenced maps and tile
vectors out, checked against model.embed() on the same tiles."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable

import geopandas
import numpy as np
import pyarrow.parquet
import pytest
import rasterio
import torch
from affine import Affine

from factories import tiny_model
from xstars_models.cli import main
from xstars_models.errors import InvalidInputError, InvalidOptionError, InvalidTypeError
from xstars_models.samples import sample_path
from xstars_models.scenes import embed_scene

SENSOR = "sentinel2_rgb"  # 10 m, patch 8 px in the tiny model
SAMPLE = sample_path("sentinel2_rgb_inland")  # 256 x 256 px, 3 x uint8, EPSG:32618, 10 m


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def pixels() -> np.ndarray:
    with rasterio.open(SAMPLE) as src:
        return src.read()  # C x H x W


def read_map(path: Path) -> tuple[np.ndarray, dict]:
    with rasterio.open(path) as src:
        return src.read(), src.profile


def tile_maps(model, pixels: np.ndarray, starts: list[int], size: int) -> dict[tuple[int, int], np.ndarray]:
    """embed(output="map") of every tile (token starts x starts, ``size`` tokens), D x size x size."""
    p = 8
    tiles = [pixels[:, r * p : (r + size) * p, c * p : (c + size) * p] for r in starts for c in starts]
    maps = model.embed(np.stack(tiles), SENSOR, output="map", progress=False).numpy()
    return {(r, c): maps[k] for k, (r, c) in enumerate((r, c) for r in starts for c in starts)}


def copy_sample(tmp_path: Path, name: str, edit: Callable[[np.ndarray], None] | None = None, **profile) -> Path:
    with rasterio.open(SAMPLE) as src:
        meta, data = src.profile, src.read()
    meta.update(profile)
    if edit is not None:
        edit(data)
    path = tmp_path / name
    with rasterio.open(path, "w", **meta) as dst:
        dst.write(data)
    return path


def test_one_tile_scene_equals_embed_and_is_georeferenced(model, pixels, tmp_path):
    result = embed_scene(model, SAMPLE, SENSOR, out=tmp_path / "map.tif", tile=256, progress=False)
    values, profile = read_map(result.path)
    with rasterio.open(SAMPLE) as src:
        assert profile["crs"] == src.crs
        assert profile["transform"] == src.transform @ Affine.scale(8)
    expected = model.embed(pixels, SENSOR, output="map", progress=False)[0].numpy()
    assert values.shape == expected.shape == (model.embed_dim, 32, 32)
    np.testing.assert_allclose(values, expected, atol=1e-4)
    assert (result.tiles, result.embedded, result.skipped, result.resumed) == (1, 1, 0, 0)
    assert result.shape == (model.embed_dim, 32, 32)
    assert not list(tmp_path.glob("*.partial*"))


def test_tiles_without_overlap_each_equal_embed_of_the_tile(model, pixels, tmp_path):
    result = embed_scene(model, SAMPLE, SENSOR, out=tmp_path / "map.tif", tile=64, progress=False)
    values, _ = read_map(result.path)
    assert result.tiles == 16
    for (r, c), expected in tile_maps(model, pixels, [0, 8, 16, 24], 8).items():
        np.testing.assert_allclose(values[:, r : r + 8, c : c + 8], expected, atol=1e-4)


def crossfade(starts: list[int], size: int) -> list[np.ndarray]:
    """Linear ramps across each neighbour overlap (the documented stitching weights)."""
    out = []
    for i, s in enumerate(starts):
        k = np.arange(size) + 0.5
        w = np.ones(size)
        if i > 0:
            w = np.minimum(w, k / (starts[i - 1] + size - s))
        if i + 1 < len(starts):
            w = np.minimum(w, (size - k) / (s + size - starts[i + 1]))
        out.append(w)
    return out


def test_overlapping_tiles_are_blended_and_edge_tiles_shifted_inward(model, pixels, tmp_path):
    # 96 px tiles every 64 px: token starts 0, 8, 16 and a last tile shifted in to 20 (32 tokens).
    result = embed_scene(model, SAMPLE, SENSOR, out=tmp_path / "map.tif", tile=96, overlap=32, progress=False)
    values, _ = read_map(result.path)
    starts, size = [0, 8, 16, 20], 12
    assert result.tiles == 16
    maps = tile_maps(model, pixels, starts, size)
    ramps = crossfade(starts, size)
    acc = np.zeros_like(values, dtype=np.float64)
    wsum = np.zeros(values.shape[1:])
    for i, r in enumerate(starts):
        for j, c in enumerate(starts):
            w = np.outer(ramps[i], ramps[j])
            acc[:, r : r + size, c : c + size] += maps[r, c] * w
            wsum[r : r + size, c : c + size] += w
    assert np.isfinite(values).all()
    np.testing.assert_allclose(values, acc / wsum, atol=1e-4)


def test_nodata_tiles_are_skipped_and_nan(model, tmp_path):
    def holes(data: np.ndarray) -> None:
        data[:, 0:64, 0:64] = 0  # all of tile (0, 0)
        data[:, 64:80, 128:192] = 0  # a quarter of tile (1, 2): two token rows

    path = copy_sample(tmp_path, "holes.tif", holes, nodata=0)
    result = embed_scene(model, path, SENSOR, out=tmp_path / "map.tif", tile=64, progress=False)
    values, profile = read_map(result.path)
    assert np.isnan(profile["nodata"])
    assert (result.skipped, result.embedded) == (1, 15)
    assert np.isnan(values[:, 0:8, 0:8]).all()
    assert np.isnan(values[:, 8:10, 16:24]).all()  # missing tokens of an embedded tile
    assert np.isfinite(values[:, 10:16, 16:24]).all()
    finite = np.isfinite(values).all(axis=0)
    assert finite.sum() == 32 * 32 - 64 - 16

    strict = embed_scene(model, path, SENSOR, out=tmp_path / "strict.tif", tile=64, max_nodata=0.2, progress=False)
    assert strict.skipped == 2
    assert np.isnan(read_map(strict.path)[0][:, 8:16, 16:24]).all()


def test_gsd_is_checked_against_the_sensor(model, tmp_path):
    with rasterio.open(SAMPLE) as src:
        t = src.transform
    coarse = copy_sample(tmp_path, "20m.tif", transform=Affine(20.0, 0, t.c, 0, -20.0, t.f))
    with pytest.raises(ValueError, match=r"20 m.*10 m.*resample=True"):
        embed_scene(model, coarse, SENSOR, out=tmp_path / "bad.tif", progress=False)

    near = copy_sample(tmp_path, "10.5m.tif", transform=Affine(10.5, 0, t.c, 0, -10.5, t.f))
    with pytest.warns(UserWarning, match=r"10\.5 m.*10 m"):
        result = embed_scene(model, near, SENSOR, out=tmp_path / "near.tif", tile=256, progress=False)
    assert result.resample_scale is None

    result = embed_scene(model, coarse, SENSOR, out=tmp_path / "up.tif", tile=256, resample=True, progress=False)
    values, profile = read_map(result.path)
    assert result.resample_scale == (0.5, 0.5)
    assert values.shape == (model.embed_dim, 64, 64)  # 512 px at 10 m
    assert profile["transform"] == Affine(20.0, 0, t.c, 0, -20.0, t.f) @ Affine.scale(0.5) @ Affine.scale(8)
    assert np.isfinite(values).all()


def test_interrupted_run_resumes_without_redoing_finished_strips(model, tmp_path, monkeypatch):
    # 64 px tiles every 32 px: 7 strips of 7 tiles; one batch per strip.
    options = dict(tile=64, overlap=32, batch_size=7, progress=False)
    reference = read_map(embed_scene(model, SAMPLE, SENSOR, out=tmp_path / "ref.tif", **options).path)[0]

    forward = model.forward_tokens
    calls: list[int] = []

    def counting(fail_after: int | None):
        def wrapped(x, *args, **kwargs):
            if fail_after is not None and sum(calls) >= fail_after:
                raise KeyboardInterrupt
            calls.append(len(x))
            return forward(x, *args, **kwargs)

        return wrapped

    out = tmp_path / "map.tif"
    monkeypatch.setattr(model, "forward_tokens", counting(fail_after=21))
    with pytest.raises(KeyboardInterrupt):
        embed_scene(model, SAMPLE, SENSOR, out=out, **options)
    assert not out.exists()
    record = json.loads((tmp_path / "map.tif.partial.json").read_text())
    assert record["strips_done"] == 3
    # The keys of the record's settings are those of earlier versions: their partial runs resume.
    assert set(record["settings"]) == {"source", "sensor", "patch_px", "output", "tile_px", "overlap_px",
                                       "resample_scale", "nodata", "max_nodata", "precision", "whiten", "model"}

    with pytest.raises(InvalidOptionError, match=r"tile_px.*resume=False") as refused:
        embed_scene(model, SAMPLE, SENSOR, out=out, **{**options, "tile": 128})
    assert refused.value.field == "resume"

    calls.clear()
    monkeypatch.setattr(model, "forward_tokens", counting(fail_after=None))
    result = embed_scene(model, SAMPLE, SENSOR, out=out, **options)
    assert sum(calls) == 28  # strips 4-7 only
    assert (result.resumed, result.embedded) == (21, 28)
    np.testing.assert_array_equal(read_map(out)[0], reference)
    assert not list(tmp_path.glob("map.tif.partial*"))


def test_resume_false_starts_over(model, tmp_path, monkeypatch):
    forward = model.forward_tokens
    calls: list[int] = []

    def failing(x, *args, **kwargs):
        if calls:
            raise RuntimeError("stop")
        calls.append(len(x))
        return forward(x, *args, **kwargs)

    monkeypatch.setattr(model, "forward_tokens", failing)
    with pytest.raises(RuntimeError, match="stop"):
        embed_scene(model, SAMPLE, SENSOR, out=tmp_path / "m.tif", tile=64, batch_size=4, progress=False)
    monkeypatch.undo()
    result = embed_scene(model, SAMPLE, SENSOR, out=tmp_path / "m.tif", tile=64, resume=False, progress=False)
    assert (result.resumed, result.embedded) == (0, 16)


def read_tiles(path: Path):
    """The GeoParquet of tile vectors, read by geopandas, with the embeddings as an n x D array."""
    frame = geopandas.read_parquet(path)
    return frame, np.stack(frame["embedding"].to_numpy())


def test_cls_output_is_geoparquet_that_geopandas_reads(model, pixels, tmp_path):
    model.revision = "0123abcd" * 5
    try:
        result = embed_scene(model, SAMPLE, SENSOR, out=tmp_path / "tiles.parquet", tile=64, output="cls", progress=False)
    finally:
        model.revision = None
    frame, vectors = read_tiles(result.path)
    assert vectors.shape == (16, model.embed_dim) and vectors.dtype == np.float32
    tiles = [pixels[:, r : r + 64, c : c + 64] for r in range(0, 256, 64) for c in range(0, 256, 64)]
    expected = model.embed(np.stack(tiles), SENSOR, output="cls", progress=False).numpy()
    np.testing.assert_allclose(vectors, expected, atol=1e-4)
    assert frame["valid"].all() and list(frame["tile"]) == list(range(16))
    assert list(frame["row"])[:5] == [0, 0, 0, 0, 1] and list(frame["col"])[:5] == [0, 1, 2, 3, 0]
    with rasterio.open(SAMPLE) as src:
        left, top = src.transform.c, src.transform.f
        assert frame.crs.to_epsg() == src.crs.to_epsg() == 32618
    assert frame.geometry.iloc[5].bounds == (left + 640, top - 1280, left + 1280, top - 640)  # row 1, col 1
    assert all(polygon.exterior.is_ccw for polygon in frame.geometry)
    np.testing.assert_array_equal(frame["window"].iloc[5], [64, 64, 64, 64])
    geo = json.loads(pyarrow.parquet.read_schema(result.path).metadata[b"geo"])
    assert geo["version"] == "1.1.0" and geo["columns"]["geometry"]["encoding"] == "WKB"
    assert geo["columns"]["geometry"]["bbox"] == [left, top - 2560, left + 2560, top]
    meta = json.loads(pyarrow.parquet.read_schema(result.path).metadata[b"xstars"])
    assert (meta["sensor"], meta["revision"], meta["model"]) == (SENSOR, "0123abcd" * 5, "vit_tiny_patch16_224")
    assert (meta["tile_px"], meta["patch_px"]) == ("64", "8")


def test_map_output_is_a_compressed_tiled_cog(model, tmp_path):
    plain = embed_scene(model, SAMPLE, SENSOR, out=tmp_path / "map.tif", tile=64, progress=False)
    with rasterio.open(plain.path) as src:
        assert src.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
        assert src.profile["tiled"] and src.compression.name.lower() == "deflate"
        assert src.overviews(1) == [] and src.tags()["xstars_sensor"] == SENSOR
        values = src.read()
    with_overviews = embed_scene(model, SAMPLE, SENSOR, out=tmp_path / "ov.tif", tile=64, overviews=True, progress=False)
    with rasterio.open(with_overviews.path) as src:
        assert src.overviews(1) == [2]
        np.testing.assert_array_equal(src.read(), values)
        # The overview is the average of 2 x 2 tokens.
        half = src.read(1, out_shape=(16, 16))
    np.testing.assert_allclose(half, values[0].reshape(16, 2, 16, 2).mean(axis=(1, 3)), atol=1e-5)


def test_cls_output_resumes_after_an_interruption(model, tmp_path, monkeypatch):
    options = dict(tile=64, output="cls", batch_size=4, progress=False)
    reference = read_tiles(embed_scene(model, SAMPLE, SENSOR, out=tmp_path / "ref.parquet", **options).path)[1]
    forward = model.forward_tokens
    calls: list[int] = []

    def wrapped(x, *args, **kwargs):
        if len(calls) == 3:
            raise RuntimeError("stop")
        calls.append(len(x))
        return forward(x, *args, **kwargs)

    monkeypatch.setattr(model, "forward_tokens", wrapped)
    with pytest.raises(RuntimeError, match="stop"):
        embed_scene(model, SAMPLE, SENSOR, out=tmp_path / "t.parquet", **options)
    assert not (tmp_path / "t.parquet").exists()
    monkeypatch.undo()
    result = embed_scene(model, SAMPLE, SENSOR, out=tmp_path / "t.parquet", **options)
    assert (result.resumed, result.embedded) == (12, 4)
    np.testing.assert_array_equal(read_tiles(result.path)[1], reference)


def test_array_source_matches_file_source(model, pixels, tmp_path):
    with rasterio.open(SAMPLE) as src:
        transform, crs = src.transform, src.crs
    from_file = read_map(embed_scene(model, SAMPLE, SENSOR, out=tmp_path / "f.tif", tile=128, progress=False).path)
    result = embed_scene(
        model, pixels, SENSOR, out=tmp_path / "a.tif", tile=128, transform=transform, crs=crs, progress=False
    )
    from_array = read_map(result.path)
    np.testing.assert_array_equal(from_array[0], from_file[0])
    assert from_array[1]["transform"] == from_file[1]["transform"]
    assert from_array[1]["crs"] == from_file[1]["crs"]
    with pytest.raises(InvalidOptionError, match="out= is required") as info:
        embed_scene(model, pixels, SENSOR, progress=False)
    assert info.value.field == "out"


def test_clear_errors(model, tmp_path, monkeypatch):
    out = tmp_path / "x.tif"
    with pytest.raises(InvalidOptionError, match=r"tile=60 px.*'sentinel2_rgb'.*8 px") as info:
        embed_scene(model, SAMPLE, SENSOR, out=out, tile=60, progress=False)
    assert info.value.field == "tile"
    with pytest.raises(InvalidOptionError, match="overlap=64 px must be smaller than tile=64") as info:
        embed_scene(model, SAMPLE, SENSOR, out=out, tile=64, overlap=64, progress=False)
    assert info.value.field == "overlap"
    with pytest.raises(InvalidInputError, match=r"sentinel2_rgb_inland\.tif: 3 bands.*'sentinel2' has 13 bands") as info:
        embed_scene(model, SAMPLE, "sentinel2", out=out, progress=False)
    assert info.value.field == "source"
    with pytest.raises(InvalidInputError, match=r"geographic CRS.*reproject") as info:
        embed_scene(model, copy_sample(tmp_path, "lonlat.tif", crs="EPSG:4326"), SENSOR, out=out, progress=False)
    assert info.value.field == "source"
    with pytest.raises(InvalidOptionError, match=r"x\.tif'?: output='cls' writes a \.parquet") as info:
        embed_scene(model, SAMPLE, SENSOR, out=out, output="cls", progress=False)
    assert info.value.field == "out"
    with pytest.raises(InvalidInputError, match=r"array \(3, 4, 4\): 4 x 4 px .* smaller than one 8 x 8 px patch") as info:
        embed_scene(model, np.zeros((3, 4, 4), np.uint8), SENSOR, out=out, progress=False)
    assert info.value.field == "source"
    with pytest.raises(InvalidTypeError, match="source must be a C x H x W numpy array.*got int") as info:
        embed_scene(model, 42, SENSOR, out=out, progress=False)
    assert info.value.field == "source"
    monkeypatch.setitem(sys.modules, "rasterio", None)
    with pytest.raises(ImportError, match=r"xstars-models\[geo\]"):
        embed_scene(model, SAMPLE, SENSOR, out=out, progress=False)


def test_defaults_pretraining_grid_tiles_and_output_beside_the_scene(model, tmp_path):
    scene = copy_sample(tmp_path, "scene.tif")
    result = embed_scene(model, scene, SENSOR, progress=False)
    assert result.path == tmp_path / "scene.sentinel2_rgb.map.tif"
    assert result.tiles == 16  # img_size 64 px / patch 8 -> 8 x 8 token tiles of 64 px


def test_method_and_cli_embed_a_scene_like_the_function(model, tmp_path, capsys):
    expected = embed_scene(model, SAMPLE, SENSOR, out=tmp_path / "fn.tif", tile=128, progress=False)
    via_method = model.embed_scene(SAMPLE, SENSOR, out=tmp_path / "method.tif", tile=128, progress=False)
    assert via_method.tiles == expected.tiles == 4
    folder = model.save_pretrained(tmp_path / "model")
    out = tmp_path / "cli.tif"
    argv = ["embed-scene", str(folder), str(SAMPLE), "--sensor", SENSOR, "--out", str(out), "--tile", "128", "--no-progress", "--offline"]
    assert main(argv) == 0
    assert "4 tiles" in capsys.readouterr().out
    reference = read_map(expected.path)[0]
    assert reference.shape == (model.embed_dim, 32, 32)
    np.testing.assert_array_equal(read_map(via_method.path)[0], reference)
    np.testing.assert_array_equal(read_map(out)[0], reference)


def test_cli_scene_errors_are_one_line(model, tmp_path, capsys):
    folder = model.save_pretrained(tmp_path / "model")
    assert main(["embed-scene", str(folder), str(SAMPLE), "--sensor", SENSOR, "--tile", "100", "--out", str(tmp_path / "x.tif")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("xstars embed-scene: error:") and "100" in err and err.count("\n") == 1
    # The option at fault is named by its flag, not by the API's keyword.
    assert "xstars embed-scene: error: --tile 100 px: must be a whole number" in err and "tile=" not in err


def test_options_are_checked_once_and_name_the_option():
    import pickle

    from rasterio.windows import Window

    from xstars_models.errors import UnknownOptionError
    from xstars_models.scenes import SceneOptions

    for bad, field in [
        (dict(output="pooled"), "output"), (dict(tile=60.5), "tile"), (dict(overlap=None), "overlap"),
        (dict(batch_size=0), "batch_size"), (dict(max_nodata=2), "max_nodata"), (dict(max_nodata=float("nan")), "max_nodata"),
        (dict(precision="fp16"), "precision"), (dict(device="gpu7"), "device"), (dict(bounds=(0, 0, 0, 1)), "bounds"),
        (dict(window=(0, 0, 1.5, 2)), "window"), (dict(bounds=(0, 0, 1, 1), window=(0, 0, 1, 1)), "window"),
    ]:
        with pytest.raises(InvalidOptionError) as info:
            SceneOptions(**bad)
        assert info.value.field == field, bad
    with pytest.raises(InvalidOptionError, match="max_nodata is a fraction of a tile's pixels"):
        SceneOptions(max_nodata=-0.1)
    with pytest.raises(InvalidOptionError, match=r"bounds=\(0, 0, 0, 1\) must be \(left, bottom, right, top\)"):
        SceneOptions(bounds=(0, 0, 0, 1))

    # An unknown keyword names itself and the options there are; it is still the TypeError Python raises.
    with pytest.raises(UnknownOptionError, match=r"'tiles'.*tile, overlap, output") as info:
        SceneOptions.from_call(None, (), {"tiles": 64})
    assert info.value.field == "tiles" and isinstance(info.value, TypeError)
    with pytest.raises(TypeError, match="multiple values for argument 'tile'"):
        SceneOptions.from_call(None, (64,), {"tile": 64})

    # Values are normalised, so that equal options compare, hash and pickle alike.
    options = SceneOptions(tile=np.int64(128), window=Window(8, 16, 64, 32), max_nodata=np.float32(0.25), device="cpu")
    assert (options.tile, options.window, options.max_nodata) == (128, (16, 8, 32, 64), 0.25)
    assert type(options.tile) is int and pickle.loads(pickle.dumps(options)) == options
    assert hash(options) == hash(SceneOptions(tile=128, window=(16, 8, 32, 64), max_nodata=0.25, device="cpu"))
    with pytest.raises(AttributeError):
        options.tile = 64  # frozen

    # Keywords replace the values of options=, which is left as it was.
    merged = SceneOptions.from_call(options, (), {"overlap": 32, "output": "cls"})
    assert (merged.tile, merged.overlap, merged.output, options.overlap) == (128, 32, "cls", 0)
    assert SceneOptions.from_call(options, (), {}) is options
    with pytest.raises(InvalidTypeError) as info:
        SceneOptions.from_call({"tile": 64}, (), {})  # type: ignore[arg-type]
    assert info.value.field == "options"
    assert options.settings() == {"output": "map", "tile_px": 128, "overlap_px": 0, "max_nodata": 0.25,
                                  "precision": "auto", "whiten": False}


def test_options_object_keywords_and_positional_calls_write_the_same(model, tmp_path):
    from xstars_models.scenes import SceneOptions

    expected = read_map(embed_scene(model, SAMPLE, SENSOR, out=tmp_path / "kw.tif", tile=128, overlap=64, batch_size=3,
                                    progress=False).path)[0]
    options = SceneOptions(tile=128, overlap=64, batch_size=3, progress=False)
    by_object = embed_scene(model, SAMPLE, SENSOR, tmp_path / "obj.tif", options=options)
    # Calls written before SceneOptions: tile, overlap, output, batch_size, device positionally.
    by_position = model.embed_scene(SAMPLE, SENSOR, tmp_path / "pos.tif", 128, 64, "map", 3, "cpu", progress=False)
    overridden = model.embed_scene(SAMPLE, SENSOR, tmp_path / "over.tif",
                                   options=SceneOptions(tile=256, batch_size=3, progress=False), tile=128, overlap=64)
    for result in (by_object, by_position, overridden):
        assert result.tiles == 9
        np.testing.assert_array_equal(read_map(result.path)[0], expected)
    with pytest.raises(TypeError, match="unexpected keyword argument 'overlaps'"):
        model.embed_scene(SAMPLE, SENSOR, tmp_path / "x.tif", overlaps=64)
    assert not (tmp_path / "x.tif").exists()


def test_the_strip_runner_commits_each_strip_through_the_writer_protocol(model, pixels, tmp_path):
    """The runner knows the writer only as a SceneWriter: per strip, begin_strip, add for each
    batch, then commit; the partial record follows each commit, counting skipped tiles."""
    import contextlib

    from xstars_models.precision import resolve_precision
    from xstars_models.scenes import SceneOptions
    from xstars_models.scenes.sources import open_scene
    from xstars_models.scenes.strips import run_strips
    from xstars_models.scenes.tiling import Plan
    from xstars_models.scenes.writers import Partial, Progress

    class Recorder:
        transform = Affine.identity()

        def __init__(self):
            self.calls = []

        def start(self, record):
            raise AssertionError("the runner does not start writers")

        def begin_strip(self, token_missing, tile_missing):
            self.calls.append(("begin", tuple(token_missing.shape), len(tile_missing)))

        def add(self, strip, cols, tokens):
            self.calls.append(("add", strip, list(cols), tokens.shape[0]))

        def commit(self, strip):
            record = json.loads(partial.json.read_text()) if partial.json.exists() else {"strips_done": 0}
            self.calls.append(("commit", strip, record["strips_done"]))
            return None

        def finish(self, out):
            raise AssertionError("the runner does not finish writers")

    holes = pixels.astype(np.float32)
    holes[:, :128, :128] = np.nan  # tile (0, 0) of 2 x 2 all missing
    options = SceneOptions(tile=128, batch_size=1, progress=False)
    partial = Partial(tmp_path / "x.tif", {"k": 1})
    writer, progress = Recorder(), Progress()
    spec = model.check_sensor(SENSOR).spec
    with contextlib.ExitStack() as stack:
        scene = open_scene(holes, spec, SENSOR, options, stack)
        plan = Plan.build(scene, 8, 128, 0, SENSOR)
        run_strips(model, scene, plan, writer, partial, progress, sensor=SENSOR, options=options,
                   device=torch.device("cpu"), autocast=resolve_precision("fp32", "cpu").autocast)
    # Commits see the record of the strip before: the strip is recorded only after its commit.
    assert [c for c in writer.calls if c[0] != "add"] == [
        ("begin", (16, 32), 2), ("commit", 0, 0), ("begin", (16, 32), 2), ("commit", 1, 1)]
    assert [c for c in writer.calls if c[0] == "add"] == [("add", 0, [1], 1), ("add", 1, [0], 1), ("add", 1, [1], 1)]
    assert (progress.strips_done, progress.embedded, progress.skipped) == (2, 3, 1)
    record = json.loads(partial.json.read_text())
    assert (record["strips_done"], record["skipped"], record["settings"]) == (2, 1, {"k": 1})


@pytest.mark.parametrize("output, suffix", [("map", ".tif"), ("cls", ".parquet")])
def test_a_failed_final_write_leaves_no_output_and_a_resumable_partial(model, tmp_path, monkeypatch, output, suffix):
    import rasterio.shutil

    import xstars_models.scenes.writers as writers

    def copy_dies_half_way(source, target, **options):
        Path(target).write_bytes(b"half a file")
        raise OSError("disk full")

    def write_dies_half_way(handle, *args):
        handle.write(b"half a file")
        raise OSError("disk full")

    if output == "map":
        monkeypatch.setattr(rasterio.shutil, "copy", copy_dies_half_way)
    else:
        monkeypatch.setattr(writers, "write_geoparquet", write_dies_half_way)
    out = tmp_path / f"t{suffix}"
    with pytest.raises(OSError, match="disk full"):
        embed_scene(model, SAMPLE, SENSOR, out=out, tile=128, output=output, progress=False)
    assert not out.exists() and not list(tmp_path.glob("*.tmp"))
    monkeypatch.undo()
    result = embed_scene(model, SAMPLE, SENSOR, out=out, tile=128, output=output, progress=False)
    assert (result.resumed, result.embedded) == (4, 0)
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]


def test_cls_output_columns_have_fixed_types_a_bbox_covering_and_read_in_duckdb(model, tmp_path):
    import duckdb
    import shapely

    result = embed_scene(model, SAMPLE, SENSOR, out=tmp_path / "tiles.parquet", tile=64, overlap=16, output="cls",
                         progress=False)
    schema = pyarrow.parquet.read_schema(result.path)
    dim = model.embed_dim
    assert schema.field("embedding").type == pyarrow.list_(pyarrow.float32(), dim)
    assert schema.field("window").type == pyarrow.list_(pyarrow.int32(), 4)
    assert (schema.field("row").type, schema.field("col").type, schema.field("tile").type) == (
        pyarrow.int32(), pyarrow.int32(), pyarrow.int64())
    bbox_type = schema.field("bbox").type
    assert [(f.name, f.type) for f in bbox_type] == [(k, pyarrow.float64()) for k in ("xmin", "ymin", "xmax", "ymax")]
    geo = json.loads(schema.metadata[b"geo"])["columns"]["geometry"]
    assert geo["covering"] == {"bbox": {k: ["bbox", k] for k in ("xmin", "ymin", "xmax", "ymax")}}

    tiles = pyarrow.parquet.read_table(result.path)
    geometries = shapely.from_wkb(tiles["geometry"].to_pylist())
    bbox = np.array([[b[k] for k in ("xmin", "ymin", "xmax", "ymax")] for b in tiles["bbox"].to_pylist()])
    np.testing.assert_array_equal(bbox, shapely.bounds(geometries))  # a rectangle's bbox is itself
    # Tiles every 48 px, the last column and row shifted inward to end at 256 px: it overlaps its
    # neighbour by 64 - (192 - 144) = 16 px more than the others.
    windows = np.array(tiles["window"].to_pylist())
    assert windows.dtype.kind == "i"
    assert sorted(set(windows[:, 1].tolist())) == [0, 48, 96, 144, 192]
    assert set(windows[:, 2].tolist()) == set(windows[:, 3].tolist()) == {64}
    # geopandas uses the covering to read only the tiles a box touches.
    with rasterio.open(SAMPLE) as src:
        left, top = src.transform.c, src.transform.f
    frame = geopandas.read_parquet(result.path, bbox=(left + 10, top - 100, left + 20, top - 90))
    assert list(zip(frame["row"], frame["col"])) == [(0, 0)]
    vectors = np.stack(frame["embedding"].to_numpy())
    assert vectors.shape == (1, dim) and vectors.dtype == np.float32

    # DuckDB over Arrow sees FLOAT[D] and takes array functions without a cast; its own Parquet
    # reader sees FLOAT[] (Parquet has no fixed-size list), where the list functions work as is.
    # WINDOW is an SQL keyword: the column is named in quotes.
    arrow = duckdb.sql('SELECT embedding, "window" FROM tiles')
    assert [str(t) for t in arrow.types] == [f"FLOAT[{dim}]", "INTEGER[4]"]
    similarity = duckdb.sql("SELECT array_cosine_similarity(embedding, embedding) FROM tiles").fetchall()
    np.testing.assert_allclose([s for (s,) in similarity], 1.0, rtol=1e-5)
    native = duckdb.sql(f"SELECT embedding, \"window\" FROM read_parquet('{result.path}')")
    assert [str(t) for t in native.types] == ["FLOAT[]", "INTEGER[]"]
    [(same, cast)] = duckdb.sql(f"SELECT list_cosine_similarity(embedding, embedding), embedding::FLOAT[{dim}] "
                                f"FROM read_parquet('{result.path}') LIMIT 1").fetchall()
    assert abs(same - 1.0) < 1e-5 and len(cast) == dim


def test_resampled_windows_are_the_input_pixels_each_tile_touches(model, tmp_path):
    with rasterio.open(SAMPLE) as src:
        t = src.transform
    # 12 m pixels: a 64 px tile at 10 m spans 53.33 input pixels.
    scene = copy_sample(tmp_path, "12m.tif", transform=Affine(12.0, 0, t.c, 0, -12.0, t.f))
    with pytest.warns(UserWarning, match="307 x 307 px is not a multiple"):  # 3072 m at 10 m
        result = embed_scene(model, scene, SENSOR, out=tmp_path / "tiles.parquet", tile=64, output="cls",
                             resample=True, progress=False)
    frame = geopandas.read_parquet(result.path)
    windows = np.stack(frame["window"].to_numpy())
    assert windows.dtype == np.int32
    # Each footprint in input pixels, rounded outward.
    minx, miny, maxx, maxy = (frame.geometry.bounds[k].to_numpy() for k in ("minx", "miny", "maxx", "maxy"))
    top, left = np.floor((t.f - maxy) / 12 + 1e-9), np.floor((minx - t.c) / 12 + 1e-9)
    bottom, right = np.ceil((t.f - miny) / 12 - 1e-9), np.ceil((maxx - t.c) / 12 - 1e-9)
    np.testing.assert_array_equal(windows, np.stack([top, left, bottom - top, right - left], axis=1))
    assert {int(h) for h in windows[:, 2]} <= {54, 55} and windows[1, 1] == 53  # the second tile starts at 53.33


def test_map_cog_names_its_bands_and_records_the_model(tmp_path):
    import hashlib

    model = tiny_model()
    folder = model.save_pretrained(tmp_path / "model")
    loaded = type(model).from_pretrained(folder)
    loaded.revision = "0123abcd" * 5
    result = embed_scene(loaded, SAMPLE, SENSOR, out=tmp_path / "map.tif", tile=64, overlap=16, progress=False)
    with rasterio.open(result.path) as src:
        assert src.descriptions == tuple(f"emb_{k:03d}" for k in range(model.embed_dim))
        tags = src.tags()
    assert tags["xstars_model"] == str(folder) and tags["xstars_revision"] == "0123abcd" * 5
    assert tags["xstars_model_sha256"] == hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    assert "xstars_stem_sha256" not in tags  # the primary sensor has no stem file
    assert (tags["xstars_sensor"], tags["xstars_tile_px"], tags["xstars_overlap_px"]) == (SENSOR, "64", "16")

    # Another sensor's run names its stem file too; the GeoParquet metadata records the same.
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 3000, (13, 64, 64), dtype=np.uint16)
    tiles = embed_scene(loaded, pixels, "sentinel2", out=tmp_path / "s2.parquet", output="cls", progress=False,
                        transform=Affine(10, 0, 500000, 0, -10, 4000000), crs="EPSG:32631")
    meta = json.loads(pyarrow.parquet.read_schema(tiles.path).metadata[b"xstars"])
    assert meta["model_sha256"] == tags["xstars_model_sha256"]
    assert meta["stem_sha256"] == hashlib.sha256((folder / "stem-sentinel2.safetensors").read_bytes()).hexdigest()
