"""Feature maps of a collection run (maps=True, xstars_models.archive.maps): each scene's map equals
``embed_scene(output="map")`` with the same options (values to 1e-5 in fp32, NaN where nodata,
georeferencing, band descriptions, tags), across block boundaries with and without overlap, in this
process and on a two-worker Dask LocalCluster; nothing half-written is left or taken for done; a
rerun redoes nothing, a half-finished map is finished from its pieces, a missing piece's block is
embedded again; maps on or off is a setting."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
from factories import tiny_model

import xstars_models.archive.run as run_module
from xstars_models.archive import ArchiveOptions
from xstars_models.archive.manifest import MANIFEST
from xstars_models.archive.maps import MAPS, map_path, maps_folder
from xstars_models.archive.run import embed_collection
from xstars_models.errors import InvalidOptionError
from xstars_models.samples import sample_path
from xstars_models.scenes import SceneOptions, embed_scene

SENSOR = "sentinel2_rgb"  # 10 m, patch 8 px in the tiny model: 64 px tiles
FAST = {"precision": "fp32", "progress": False}
# Tags that embed_scene's maps carry and the collection's maps carry the same.
SHARED_TAGS = ("xstars_sensor", "xstars_model_sha256", "xstars_patch_px", "xstars_tile_px", "xstars_overlap_px",
               "xstars_precision")


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> list[Path]:
    """Two 192 x 256 px scenes cut from the sample; the second with nodata=0 and a zero block over
    its top-left corner (so some tokens and one tile have no data)."""
    root = tmp_path_factory.mktemp("scenes")
    with rasterio.open(sample_path("sentinel2_rgb_inland")) as src:
        pixels, profile = src.read(), src.profile
    paths = []
    for k in range(2):
        data = pixels[:, 32 * k : 32 * k + 192, :256].copy()
        meta = {**profile, "width": 256, "height": 192}
        if k == 1:
            data[:, :56, :88] = 0
            meta["nodata"] = 0
        path = root / f"scene{k}.tif"
        with rasterio.open(path, "w", **meta) as dst:
            dst.write(data)
        paths.append(path)
    return paths


def assert_same_map(got: Path, expected: Path) -> None:
    with rasterio.open(got) as a, rasterio.open(expected) as b:
        assert (a.count, a.height, a.width) == (b.count, b.height, b.width)
        assert a.transform == b.transform and a.crs == b.crs
        assert a.descriptions == b.descriptions and a.dtypes == b.dtypes and np.isnan(a.nodata) and np.isnan(b.nodata)
        assert a.profile["blockxsize"] == b.profile["blockxsize"] and a.overviews(1) == b.overviews(1)
        assert {k: a.tags()[k] for k in SHARED_TAGS} == {k: b.tags()[k] for k in SHARED_TAGS}
        mine, theirs = a.read(), b.read()
    np.testing.assert_allclose(mine, theirs, rtol=0, atol=1e-5, equal_nan=True)


def reference(model, scene: Path, folder: Path, **options) -> Path:
    out = folder / f"{scene.stem}.{options.get('overlap', 0)}.{options.get('overviews', False)}.tif"
    if not out.exists():
        embed_scene(model, scene, SENSOR, out, output="map", **FAST, **options)
    return out


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    folder = tmp_path_factory.mktemp("references")
    return lambda model, scene, **options: reference(model, scene, folder, **options)


def leftovers(dataset: Path) -> list[str]:
    """Files of the maps folder other than finished maps: pieces, VRTs, temporary files."""
    return sorted(str(p.relative_to(dataset)) for p in (dataset / MAPS).rglob("*")
                  if p.is_file() and not (p.suffix == ".tif" and p.parent.name.startswith("sensor-")
                                          and not p.name.startswith(".")))


@pytest.mark.parametrize(("overlap", "strips_per_task", "overviews"), [(0, 2, False), (16, 1, True), (48, 2, False)])
def test_each_map_equals_embed_scene_map_across_blocks(model, scenes, references, tmp_path, overlap, strips_per_task,
                                                       overviews):
    """overlap 16: one strip above each block reaches into its rows; 48 (of 64 px tiles): three."""
    import geopandas

    out = tmp_path / "dataset"
    result = embed_collection(model, scenes, SENSOR, out, maps=True, overlap=overlap, overviews=overviews,
                              strips_per_task=strips_per_task, **FAST)
    assert result.failures == [] and result.maps == 2 and result.written >= 4  # at least 2 blocks a scene
    for scene in scenes:
        assert_same_map(map_path(out, SENSOR, scene.stem), references(model, scene, overlap=overlap, overviews=overviews))
    assert leftovers(out) == []
    manifest = json.loads((out / MANIFEST).read_text())
    for scene in scenes:
        record = manifest["maps"][f"{SENSOR}/{scene.stem}"]
        path = out / record["path"]
        assert record["size"] == path.stat().st_size
        assert record["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    # The maps folder is invisible to the readers of the parts.
    assert len(geopandas.read_parquet(out)) == result.rows


def test_a_rerun_redoes_nothing_and_a_half_finished_map_is_finished(model, scenes, references, tmp_path,
                                                                     monkeypatch):
    out = tmp_path / "dataset"
    options = {"maps": True, "overlap": 16, "strips_per_task": 2, **FAST}

    # The driver stops after the blocks (every merge fails): no map, the pieces kept.
    def no_merge(task):
        raise OSError("merge interrupted")

    monkeypatch.setattr(run_module, "merge_map", no_merge)
    first = embed_collection(model, scenes, SENSOR, out, **options)
    assert sorted(f["key"] for f in first.failures) == [f"{SENSOR}/{s.stem}/map" for s in scenes]
    assert first.maps == 0 and not any(map_path(out, SENSOR, s.stem).exists() for s in scenes)
    pieces = sorted((maps_folder(out, SENSOR) / "scene0.pieces").glob("*.tif"))
    assert len(pieces) == 2
    monkeypatch.undo()

    # A merge killed before its rename left a temporary file; scene1 lost a piece.
    stale = maps_folder(out, SENSOR) / ".scene0.tif.0123456789ab.tmp"
    stale.write_bytes(b"II*\x00 cut short")
    (maps_folder(out, SENSOR) / "scene1.pieces" / "00001.tif").unlink()
    second = embed_collection(model, scenes, SENSOR, out, **options)
    assert second.failures == [] and second.maps == 2
    assert second.written == 1  # only scene1's block whose piece was missing is embedded again
    for scene in scenes:
        assert_same_map(map_path(out, SENSOR, scene.stem), references(model, scene, overlap=16))
    assert leftovers(out) == []

    # A rerun: nothing written, the maps untouched.
    stats = {s.stem: map_path(out, SENSOR, s.stem).stat() for s in scenes}
    third = embed_collection(model, scenes, SENSOR, out, **options)
    assert (third.written, third.maps, third.failures) == (0, 0, [])
    assert {s.stem: map_path(out, SENSOR, s.stem).stat().st_mtime_ns for s in scenes} == {
        k: v.st_mtime_ns for k, v in stats.items()}

    # The driver died after a map's rename, before saving the manifest: the map is adopted by its tag.
    manifest = json.loads((out / MANIFEST).read_text())
    recorded = manifest["maps"].pop(f"{SENSOR}/scene0")
    (out / MANIFEST).write_text(json.dumps(manifest))
    fourth = embed_collection(model, scenes, SENSOR, out, **options)
    assert (fourth.written, fourth.maps) == (0, 0)
    assert json.loads((out / MANIFEST).read_text())["maps"][f"{SENSOR}/scene0"] == recorded

    # A map of other settings at that name (not listed, another tag) is not taken for done.
    other = tmp_path / "other"
    embed_collection(model, scenes[:1], SENSOR, other, maps=True, overlap=0, strips_per_task=2, **FAST)
    map_path(out, SENSOR, "scene0").write_bytes(map_path(other, SENSOR, "scene0").read_bytes())
    manifest = json.loads((out / MANIFEST).read_text())
    del manifest["maps"][f"{SENSOR}/scene0"]
    (out / MANIFEST).write_text(json.dumps(manifest))
    fifth = embed_collection(model, scenes, SENSOR, out, **options)
    assert (fifth.written, fifth.maps) == (2, 1)  # scene0's blocks again (their pieces are gone), its map
    assert_same_map(map_path(out, SENSOR, "scene0"), references(model, scenes[0], overlap=16))


def test_maps_on_or_off_is_a_setting(model, scenes, tmp_path):
    out = tmp_path / "dataset"
    embed_collection(model, scenes[:1], SENSOR, out, strips_per_task=2, **FAST)
    with pytest.raises(InvalidOptionError, match=r"maps: None then, \{'overviews': False\} now") as info:
        embed_collection(model, scenes[:1], SENSOR, out, maps=True, strips_per_task=2, **FAST)
    assert info.value.field == "restart"
    redone = embed_collection(model, scenes[:1], SENSOR, out, maps=True, strips_per_task=2, restart=True, **FAST)
    assert redone.maps == 1 and map_path(out, SENSOR, "scene0").exists()
    with pytest.raises(InvalidOptionError, match=r"maps: \{'overviews': False\} then, \{'overviews': True\} now"):
        embed_collection(model, scenes[:1], SENSOR, out, maps=True, overviews=True, strips_per_task=2, **FAST)
    embed_collection(model, scenes[:1], SENSOR, out, strips_per_task=2, restart=True, **FAST)
    assert not maps_folder(out, SENSOR).exists()
    assert json.loads((out / MANIFEST).read_text())["maps"] == {}


def test_maps_with_whiten_and_non_boolean_maps_are_refused():
    with pytest.raises(InvalidOptionError, match="whiten") as info:
        ArchiveOptions(scene=SceneOptions(output="cls", resume=False, progress=False, whiten=True), maps=True)
    assert info.value.field == "maps"
    with pytest.raises(Exception, match="maps must be True or False") as info:
        ArchiveOptions.from_call(None, {"maps": "yes"})
    assert info.value.field == "maps"


def test_maps_on_a_two_worker_local_cluster(model, scenes, references, tmp_path):
    out = tmp_path / "dataset"
    result = embed_collection(model, scenes, SENSOR, out, maps=True, overlap=16, strips_per_task=1, workers=2, **FAST)
    assert result.failures == [] and result.maps == 2
    for scene in scenes:
        assert_same_map(map_path(out, SENSOR, scene.stem), references(model, scene, overlap=16))
    assert leftovers(out) == []


def test_the_command_line_writes_maps_with_overviews_on_the_auto_device(model, scenes, references, tmp_path, capsys):
    """Sources after the options (the README's order), ``--maps --overviews``, and ``--device auto``
    (this process's GPU if it has one, else its CPU) resolved where the tasks run."""
    from xstars_models.cli import main

    folder = model.save_pretrained(tmp_path / "model")
    out = tmp_path / "dataset"
    argv = ["embed-collection", str(folder), "--sensor", SENSOR, str(scenes[0]), "--out", str(out), str(scenes[1]),
            "--maps", "--overviews", "--device", "auto", "--precision", "fp32", "--strips-per-task", "2",
            "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert f"2 feature maps assembled now, under {out}/_maps/" in printed
    for scene in scenes:
        assert_same_map(map_path(out, SENSOR, scene.stem), references(model, scene, overviews=True))
    # Anything else after the options is still refused, naming it.
    with pytest.raises(SystemExit):
        main([*argv[:4], str(scenes[0]), "--out", str(out), "--bogus"])
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err
