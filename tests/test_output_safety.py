"""Outputs never destroy inputs or earlier results (issue 27, points 1 and 4): an output that is a
file a STAC Item reads (by absolute, relative or file:// href, or the item's JSON itself), or the
file a COG URL is served from, is refused before any work; an existing output is replaced only
with overwrite=True / --overwrite (embed-scene, embed, export), and a partial run still resumes."""

from __future__ import annotations

import datetime
import json
import shutil
from pathlib import Path

import numpy as np
import pystac
import pytest
import rasterio
from range_server import RangeServer

from xstars_models.cli import main
from xstars_models.errors import InvalidOptionError
from xstars_models.samples import sample_path
from xstars_models.scenes import SceneOptions, embed_scene

SENSOR = "sentinel2_rgb"  # 10 m, patch 8 px in the tiny model
SAMPLE = sample_path("sentinel2_rgb_inland")  # 256 x 256 px, 3 x uint8, EPSG:32618, 10 m
SMALL = dict(window=(0, 0, 64, 64), tile=64, progress=False, precision="fp32")  # one tile
RGB = [{"name": n, "common_name": n} for n in ("red", "green", "blue")]


def write_item(path: Path, assets: dict[str, str]) -> Path:
    """A STAC Item JSON at ``path`` whose assets (key: href) each hold the sensor's three bands."""
    item = pystac.Item("victim", geometry=None, bbox=None, datetime=datetime.datetime(2024, 6, 1), properties={})
    for key, href in assets.items():
        bands = RGB if key == "visual" else []
        item.add_asset(key, pystac.Asset(href, media_type=pystac.MediaType.COG, extra_fields={"eo:bands": bands}))
    path.parent.mkdir(parents=True, exist_ok=True)
    item.save_object(include_self_link=False, dest_href=str(path))
    return path


def read_map(path: Path) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read()


def cli(argv: list[str], capsys) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def embed_scene_argv(folder: Path, source, out: Path, *extra: str) -> list:
    return ["embed-scene", folder, source, "--sensor", SENSOR, "--out", out, "--window", 0, 0, 64, 64, "--tile", 64,
            "--precision", "fp32", "--no-progress", "--offline", *extra]


def href_of(style: str, scene: Path) -> str:
    """The href of ``scene`` (in ``data/``) as an item in ``items/`` may write it."""
    return {"absolute": str(scene), "relative": "../data/scene.tif", "file-url": scene.as_uri()}[style]


@pytest.mark.parametrize("style", ["absolute", "relative", "file-url"])
def test_a_stac_asset_that_is_the_output_is_refused_before_any_work(model, folder, tmp_path, style, capsys, monkeypatch):
    scene = tmp_path / "data" / "scene.tif"
    scene.parent.mkdir()
    shutil.copy(SAMPLE, scene)
    item_json = write_item(tmp_path / "items" / "item.json", {"visual": href_of(style, scene)})
    assert json.loads(item_json.read_text())["assets"]["visual"]["href"] == href_of(style, scene)
    before = scene.read_bytes()
    # The item is readable through that href: it embeds to another output, as the file itself does.
    via_item = embed_scene(model, item_json, SENSOR, out=tmp_path / "other.tif", **SMALL)
    np.testing.assert_array_equal(read_map(via_item.path),
                                  read_map(embed_scene(model, scene, SENSOR, out=tmp_path / "ref.tif", **SMALL).path))

    # Refused even with overwrite=True, before the model runs.
    def no_model(*args, **kwargs):
        raise AssertionError("the model ran")

    monkeypatch.setattr(model, "forward_tokens", no_model)
    with pytest.raises(InvalidOptionError, match=r"is the input .*scene\.tif.*Nothing was done") as info:
        embed_scene(model, item_json, SENSOR, out=scene, overwrite=True, **SMALL)
    assert info.value.field == "out"
    assert scene.read_bytes() == before
    assert sorted(p.name for p in scene.parent.iterdir()) == ["scene.tif"], "something was written beside it"

    code, err = cli(embed_scene_argv(folder, item_json, scene, "--overwrite"), capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "is the input" in err and "--out" in err
    assert scene.read_bytes() == before
    assert sorted(p.name for p in scene.parent.iterdir()) == ["scene.tif"]


def test_the_item_json_itself_and_only_picked_assets_count(model, tmp_path):
    scene = tmp_path / "scene.tif"
    shutil.copy(SAMPLE, scene)
    # An asset that is not read (no bands of the sensor) may be the output...
    unread = tmp_path / "thumbnail.tif"
    item_json = write_item(tmp_path / "item.json", {"visual": str(scene), "thumbnail": str(unread)})
    embed_scene(model, item_json, SENSOR, out=unread, **SMALL)
    assert unread.is_file()
    # ... the item's JSON may not, not even through a symbolic link.
    link = tmp_path / "link.tif"
    link.symlink_to(item_json)
    before = item_json.read_bytes()
    with pytest.raises(InvalidOptionError, match="is the input") as info:
        embed_scene(model, item_json, SENSOR, out=link, overwrite=True, **SMALL)
    assert info.value.field == "out"
    assert item_json.read_bytes() == before


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The sample COG in a folder served over HTTP on 127.0.0.1; (folder, base URL)."""
    root = tmp_path_factory.mktemp("www")
    shutil.copy(SAMPLE, root / "scene.tif")
    server = RangeServer(root)
    base = server.start()
    yield root, base
    server.stop()


def test_a_url_served_from_the_output_is_refused(model, served, tmp_path, capsys, folder):
    root, base = served
    served_file = root / "scene.tif"
    before = served_file.read_bytes()
    item_json = write_item(tmp_path / "item.json", {"visual": f"{base}/scene.tif"})
    for source in (f"{base}/scene.tif", item_json):
        with pytest.raises(InvalidOptionError, match=r"name and the size .* probably the file served there") as info:
            embed_scene(model, source, SENSOR, out=served_file, overwrite=True, **SMALL)
        assert info.value.field == "out"
        # Without overwrite it is an existing output: refused too.
        with pytest.raises(InvalidOptionError):
            embed_scene(model, source, SENSOR, out=served_file, **SMALL)
    code, err = cli(embed_scene_argv(folder, f"{base}/scene.tif", served_file, "--overwrite"), capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "probably the file served there" in err
    assert served_file.read_bytes() == before

    # The same name with another size is another file: replaced as asked.
    elsewhere = tmp_path / "scene.tif"
    elsewhere.write_bytes(b"an earlier result")
    result = embed_scene(model, f"{base}/scene.tif", SENSOR, out=elsewhere, overwrite=True, **SMALL)
    assert read_map(result.path).shape == (model.embed_dim, 8, 8)
    assert served_file.read_bytes() == before


def test_an_existing_scene_output_needs_overwrite(model, folder, tmp_path, capsys):
    out = tmp_path / "map.tif"
    first = read_map(embed_scene(model, SAMPLE, SENSOR, out=out, **SMALL).path)
    stat = out.stat()
    with pytest.raises(InvalidOptionError, match=r"map\.tif exists; pass overwrite=True to replace it") as info:
        embed_scene(model, SAMPLE, SENSOR, out=out, **{**SMALL, "window": (0, 0, 128, 128)})
    assert info.value.field == "out"
    assert out.stat().st_mtime_ns == stat.st_mtime_ns and out.stat().st_ino == stat.st_ino

    code, err = cli(embed_scene_argv(folder, SAMPLE, out), capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and str(out) in err and "--overwrite" in err and "overwrite=" not in err
    assert out.stat().st_ino == stat.st_ino

    # Replaced when asked: by the API with another window, by the command line with the first again.
    bigger = embed_scene(model, SAMPLE, SENSOR, out=out, overwrite=True, **{**SMALL, "window": (0, 0, 128, 128)})
    assert read_map(bigger.path).shape == (model.embed_dim, 16, 16)
    code, _ = cli(embed_scene_argv(folder, SAMPLE, out, "--overwrite"), capsys)
    assert code == 0
    np.testing.assert_array_equal(read_map(out), first)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["map.tif"]


def interrupt_after_first_strip(model, monkeypatch) -> None:
    forward = model.forward_tokens
    calls: list[int] = []

    def failing(x, *args, **kwargs):
        if calls:
            raise KeyboardInterrupt
        calls.append(len(x))
        return forward(x, *args, **kwargs)

    monkeypatch.setattr(model, "forward_tokens", failing)


def test_a_partial_run_still_resumes_with_or_without_overwrite(model, tmp_path, monkeypatch):
    options = dict(tile=64, batch_size=4, progress=False, precision="fp32")  # 4 strips of 4 tiles
    reference = read_map(embed_scene(model, SAMPLE, SENSOR, out=tmp_path / "ref.tif", **options).path)
    assert "overwrite" not in SceneOptions(overwrite=True).settings()
    assert SceneOptions(overwrite=True).settings() == SceneOptions().settings()
    for overwrite in (False, True):
        out = tmp_path / f"map-{overwrite}.tif"
        interrupt_after_first_strip(model, monkeypatch)
        with pytest.raises(KeyboardInterrupt):
            embed_scene(model, SAMPLE, SENSOR, out=out, **options)
        monkeypatch.undo()
        assert not out.exists() and out.with_name(out.name + ".partial.json").is_file()
        # The partial run is not an existing output; overwrite is not one of the settings it records.
        result = embed_scene(model, SAMPLE, SENSOR, out=out, overwrite=overwrite, **options)
        assert (result.resumed, result.embedded) == (4, 12)
        np.testing.assert_array_equal(read_map(out), reference)

    # A finished output beside a partial run is still an existing output.
    out = tmp_path / "map-False.tif"
    interrupt_after_first_strip(model, monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        embed_scene(model, SAMPLE, SENSOR, out=out, overwrite=True, **options)
    monkeypatch.undo()
    with pytest.raises(InvalidOptionError, match="exists; pass overwrite=True") as info:
        embed_scene(model, SAMPLE, SENSOR, out=out, **options)
    assert info.value.field == "out"
    result = embed_scene(model, SAMPLE, SENSOR, out=out, overwrite=True, **options)
    assert result.resumed == 4
    np.testing.assert_array_equal(read_map(out), reference)


def test_embed_refuses_an_existing_file_without_overwrite(folder, tmp_path, capsys):
    image = tmp_path / "image.npy"
    np.save(image, np.random.default_rng(0).integers(0, 256, (3, 64, 64), dtype=np.uint8))
    out = tmp_path / "emb.npz"
    argv = ["embed", folder, image, "--sensor", SENSOR, "--out", out, "--precision", "fp32", "--offline"]
    assert cli(argv, capsys)[0] == 0
    first = out.read_bytes()
    code, err = cli([*argv, "--output", "map"], capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and str(out) in err and "--overwrite" in err
    assert out.read_bytes() == first
    assert cli([*argv, "--output", "map", "--overwrite"], capsys)[0] == 0
    with np.load(out) as replaced:
        assert replaced["image"].ndim == 3  # the map (D x h x w), not the cls vector
    assert sorted(p.name for p in tmp_path.iterdir()) == ["emb.npz", "image.npy"]


def test_export_refuses_an_existing_file_without_overwrite(model, folder, tmp_path, capsys):
    pytest.importorskip("onnx")
    path = tmp_path / "m.onnx"
    model.export_onnx(path, sensor=SENSOR, output="cls")
    first = path.read_bytes()
    with pytest.raises(InvalidOptionError, match=r"m\.onnx exists; pass overwrite=True") as info:
        model.export_onnx(path, sensor=SENSOR, output="mean")
    assert info.value.field == "path"
    assert path.read_bytes() == first
    argv = ["export", folder, path, "--sensor", SENSOR, "--output", "mean", "--offline"]
    code, err = cli(argv, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--overwrite" in err and str(path) in err
    assert path.read_bytes() == first
    assert cli([*argv, "--overwrite"], capsys)[0] == 0
    assert path.read_bytes() != first
    model.export_onnx(path, sensor=SENSOR, output="cls", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
