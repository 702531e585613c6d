"""A collection run end to end (xstars_models.archive): six scenes (local GeoTIFFs, and COGs behind
a loopback HTTP server reached through a static STAC catalogue) embedded into one GeoParquet
dataset, in this process and on a two-worker Dask LocalCluster; the rows equal, key for key, those
of single-scene ``embed_scene(output="cls")`` runs; a rerun is a no-op; a failing scene is recorded
while the rest are written; other settings are refused by name; two sensors read back as one table;
parts and manifest record the precision that ran; a retry after a cut HTTP body reads afresh."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pystac
import pytest
import rasterio
import rasterio.shutil
from factories import tiny_model
from range_server import RangeServer
from stall_server import StallServer

import xstars_models.archive.run as run_module
from xstars_models.archive import expand_sources
from xstars_models.archive.manifest import MANIFEST
from xstars_models.archive.parts import read_part_metadata, sensor_folder
from xstars_models.archive.run import embed_collection
from xstars_models.errors import InvalidOptionError
from xstars_models.io.network import RETRIES_ENV, RETRY_DELAY_ENV, TIMEOUT_ENV
from xstars_models.precision import PRECISION_ENV
from xstars_models.samples import sample_path
from xstars_models.scenes import SceneOptions, embed_scene
from xstars_models.scenes.tiling import run_setup

SENSOR = "sentinel2_rgb"  # 10 m, patch 8 px in the tiny model: 64 px tiles
FAST = {"precision": "fp32", "progress": False, "strips_per_task": 2}


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """Six 192 x 256 px scenes cut from the sample (each shifted in value, so no two are the same):
    two local GeoTIFFs and four COGs served over HTTP through a static STAC catalogue; returns
    (local files, catalogue URL, served folder, server)."""
    root = tmp_path_factory.mktemp("collection")
    with rasterio.open(sample_path("sentinel2_rgb_inland")) as src:
        pixels, profile = src.read(), src.profile
    www = root / "www"
    www.mkdir()
    catalogue = pystac.Catalog("scenes", "four served scenes")
    server = RangeServer(www)
    base = server.start()
    files = []
    for k in range(6):
        data = ((pixels[:, :192, :256].astype(np.int32) + 11 * k) % 256).astype(np.uint8)
        meta = {**profile, "driver": "COG", "width": 256, "height": 192, "compress": "DEFLATE", "blocksize": 128}
        for key in ("blockxsize", "blockysize", "tiled", "interleave"):
            meta.pop(key, None)
        path = (root if k < 2 else www) / f"scene{k}.tif"
        with rasterio.open(path, "w", **meta) as dst:
            dst.write(data)
        if k < 2:
            files.append(path)
            continue
        item = pystac.Item(f"scene{k}", geometry=None, bbox=None,
                           datetime=__import__("datetime").datetime(2024, 6, k), properties={})
        item.add_asset("visual", pystac.Asset(f"{base}/scene{k}.tif", media_type=pystac.MediaType.COG, roles=["data"],
                                              extra_fields={"eo:bands": [{"name": n, "common_name": n}
                                                                         for n in ("red", "green", "blue")]}))
        catalogue.add_item(item)
    catalogue.normalize_hrefs(str(www / "stac"))
    catalogue.save(pystac.CatalogType.SELF_CONTAINED)
    yield files, f"{base}/stac/catalog.json", www, server
    server.stop()


def sources(site) -> list:
    files, catalogue, _, _ = site
    return [*files, catalogue]


def dataset_rows(folder: Path, sensor: str = SENSOR) -> dict[tuple[str, int, int], np.ndarray]:
    rows = {}
    for part in sorted(sensor_folder(folder, sensor).glob("*.parquet")):
        table = pq.read_table(part).to_pydict()
        for scene_id, row, col, vector in zip(table["scene_id"], table["row"], table["col"], table["embedding"]):
            key = (scene_id, row, col)
            assert key not in rows, f"row {key} written twice"
            rows[key] = np.asarray(vector, np.float32)
    return rows


def single_scene_rows(model, site, tmp_path) -> dict[tuple[str, int, int], np.ndarray]:
    rows = {}
    for scene in expand_sources(sources(site)):
        out = tmp_path / f"{scene.scene_id}.parquet"
        embed_scene(model, scene.source, SENSOR, out, output="cls", precision="fp32", progress=False)
        table = pq.read_table(out).to_pydict()
        for row, col, valid, vector in zip(table["row"], table["col"], table["valid"], table["embedding"]):
            if valid:
                rows[(scene.scene_id, row, col)] = np.asarray(vector, np.float32)
    return rows


def assert_same_rows(got, expected) -> None:
    assert sorted(got) == sorted(expected)
    for key, vector in expected.items():
        np.testing.assert_allclose(got[key], vector, atol=1e-5, rtol=0, err_msg=str(key))


@pytest.fixture(scope="module")
def expected(model, site, tmp_path_factory):
    return single_scene_rows(model, site, tmp_path_factory.mktemp("single"))


def test_in_process_rows_equal_single_scene_runs_and_a_rerun_is_a_no_op(model, site, expected, tmp_path):
    out = tmp_path / "dataset"
    result = embed_collection(model, sources(site), SENSOR, out, **FAST)
    assert result.failures == [] and result.reused == 0 and result.written > 6  # 3 strips a scene: 2 parts each
    assert_same_rows(dataset_rows(out), expected)
    assert result.rows == len(expected)
    parts = {p: p.read_bytes() for p in out.rglob("*.parquet")}
    again = embed_collection(model, sources(site), SENSOR, out, **FAST)
    assert (again.written, again.reused, again.rows) == (0, result.written, result.rows)
    assert {p: p.read_bytes() for p in out.rglob("*.parquet")} == parts
    manifest = json.loads((out / MANIFEST).read_text())
    assert len(manifest["parts"]) == result.written and manifest["model"]["sha256"]


def test_a_two_worker_local_cluster_gives_the_same_rows(model, site, expected, tmp_path):
    out = tmp_path / "dataset"
    result = embed_collection(model, sources(site), SENSOR, out, workers=2, **FAST)
    assert result.failures == []
    assert_same_rows(dataset_rows(out), expected)


def test_a_failing_scene_is_recorded_and_the_others_are_written(model, site, expected, tmp_path):
    files, catalogue, www, _ = site
    missing = catalogue.replace("stac/catalog.json", "gone.tif")
    out = tmp_path / "dataset"
    result = embed_collection(model, [*files, missing, catalogue], SENSOR, out, retries=1, **FAST)
    assert [f["scene_id"] for f in result.failures] == ["gone"]
    assert missing in result.failures[0]["source"]
    failures = json.loads((out / "_failures.json").read_text())["failures"]
    assert failures == result.failures
    assert_same_rows(dataset_rows(out), expected)


def test_other_settings_are_refused_by_name_and_restart_starts_over(model, site, tmp_path):
    files, _, _, _ = site
    out = tmp_path / "dataset"
    embed_collection(model, files, SENSOR, out, **FAST)
    with pytest.raises(InvalidOptionError, match=r"overlap_px: 0 then, 16 now") as info:
        embed_collection(model, files, SENSOR, out, overlap=16, **FAST)
    assert info.value.field == "restart"
    redone = embed_collection(model, files, SENSOR, out, overlap=16, restart=True, **FAST)
    assert redone.reused == 0 and redone.written > 0


def test_two_sensors_in_one_dataset_read_back_as_one_table(model, site, tmp_path):
    import geopandas

    files, _, _, _ = site
    out = tmp_path / "dataset"
    first = embed_collection(model, files, SENSOR, out, **FAST)
    # The model's 5 m aerial stem on the same scenes, resampled to its GSD: a second sensor.
    second = embed_collection(model, files, "aerial", out, resample=True, **FAST)
    table = geopandas.read_parquet(out)
    assert set(table["sensor"]) == {SENSOR, "aerial"}
    assert len(table) == first.rows + second.rows
    assert str(table.crs) == "OGC:CRS84" or table.crs.to_epsg() == 4326


def expected_keys(expected) -> list:
    return sorted(expected)


def test_a_worker_killed_mid_task_is_replaced_and_nothing_is_lost_or_doubled(model, site, expected, tmp_path):
    import distributed

    class KillFirstBlock(distributed.WorkerPlugin):
        """SIGKILLs the worker process that starts the run's first block task (once: a marker file)."""

        def __init__(self, marker: str) -> None:
            self.marker = marker

        def transition(self, key, start, finish, **kwargs) -> None:
            import os
            import signal

            if finish == "executing" and "embed_block" in str(key) and not os.path.exists(self.marker):
                open(self.marker, "w").close()
                os.kill(os.getpid(), signal.SIGKILL)

    marker = tmp_path / "killed"
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        client.register_plugin(KillFirstBlock(str(marker)))
        out = tmp_path / "dataset"
        result = embed_collection(model, sources(site), SENSOR, out, client=client, **FAST)
    assert marker.exists(), "no worker was killed: the test did not test anything"
    assert result.failures == []
    assert_same_rows(dataset_rows(out), expected)
    assert not list(out.rglob("*.tmp"))


DRIVER = r"""
import sys
from xstars_models import XStars
model = XStars.from_pretrained(sys.argv[1], local_files_only=True)
model.embed_collection(sys.argv[3:], "sentinel2_rgb", sys.argv[2], precision="fp32", progress=False, strips_per_task=1)
"""


def test_a_rerun_after_the_driver_was_killed_ends_with_exactly_the_expected_rows(model, site, expected, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    folder = model.save_pretrained(tmp_path / "model")
    out = tmp_path / "dataset"
    args = [sys.executable, "-c", DRIVER, str(folder), str(out), *map(str, sources(site))]
    driver = subprocess.Popen(args)
    deadline = time.monotonic() + 300
    while not list(out.rglob("part-*.parquet")) and driver.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    driver.send_signal(signal.SIGKILL)
    driver.wait(timeout=60)
    assert driver.returncode == -signal.SIGKILL, "the driver finished before it was killed: nothing was tested"
    written_before = len(list(out.rglob("part-*.parquet")))
    assert written_before >= 1
    result = embed_collection(model, sources(site), SENSOR, out, precision="fp32", progress=False, strips_per_task=1)
    assert result.failures == [] and result.reused >= 1
    assert_same_rows(dataset_rows(out), expected)


def test_the_command_line_reports_each_failure_in_one_line_and_exits_non_zero(model, site, tmp_path, capsys):
    from xstars_models.cli import main

    files, catalogue, _, _ = site
    folder = model.save_pretrained(tmp_path / "model")
    missing = catalogue.replace("stac/catalog.json", "gone.tif")
    argv = ["embed-collection", str(folder), *map(str, files), missing, "--sensor", SENSOR, "--out", str(tmp_path / "d"),
            "--precision", "fp32", "--no-progress", "--retries", "0"]
    assert main(argv) == 1
    out = capsys.readouterr().out.strip().splitlines()
    failed = [line for line in out if line.startswith("failed: ")]
    assert len(failed) == 1 and "gone" in failed[0] and missing in failed[0]
    assert main(["embed-collection", str(folder), str(files[0]), "--sensor", SENSOR, "--out", str(tmp_path / "e"),
                 "--workers", "0"]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0


def test_an_existing_scheduler_with_two_dask_worker_processes_through_the_command_line(model, site, expected, tmp_path):
    """A real ``dask scheduler`` and two ``dask worker`` processes on 127.0.0.1, reached through
    ``--scheduler`` as a user's cluster would be."""
    import subprocess
    import sys
    import time

    from xstars_models.cli import main

    dask = Path(sys.executable).with_name("dask")
    address_file = tmp_path / "scheduler.json"
    processes = [subprocess.Popen([str(dask), "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                                   "--scheduler-file", str(address_file)], stderr=subprocess.DEVNULL)]
    try:
        deadline = time.monotonic() + 120
        while not address_file.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        address = json.loads(address_file.read_text())["address"]
        for _ in range(2):
            processes.append(subprocess.Popen([str(dask), "worker", address, "--nworkers", "1", "--nthreads", "1",
                                               "--no-dashboard", "--host", "127.0.0.1"], stderr=subprocess.DEVNULL))
        from distributed import Client

        with Client(address) as client:
            client.wait_for_workers(2, timeout=120)
        folder = model.save_pretrained(tmp_path / "model")
        out = tmp_path / "dataset"
        argv = ["embed-collection", str(folder), *map(str, sources(site)), "--sensor", SENSOR, "--out", str(out),
                "--scheduler", address, "--precision", "fp32", "--no-progress", "--strips-per-task", "2"]
        assert main(argv) == 0
    finally:
        for process in processes[::-1]:
            process.terminate()
            process.wait(timeout=60)
    assert_same_rows(dataset_rows(out), expected)


def test_bounds_in_degrees_limit_every_scene_as_embed_scene_does(model, site, tmp_path):
    files, _, _, _ = site
    with rasterio.open(files[0]) as src:
        from rasterio.warp import transform_bounds

        west, south, east, north = transform_bounds(src.crs, "EPSG:4326", *src.bounds)
    box = (west, south, west + (east - west) / 3, south + (north - south) / 2)  # the south-west sixth
    out = tmp_path / "dataset"
    result = embed_collection(model, files, SENSOR, out, bounds=box, bounds_crs="EPSG:4326", **FAST)
    expected = {}
    for path in files:
        single = tmp_path / f"{path.stem}.parquet"
        embed_scene(model, path, SENSOR, single, output="cls", precision="fp32", progress=False, bounds=box,
                    bounds_crs="EPSG:4326")
        table = pq.read_table(single).to_pydict()
        for row, col, valid, vector in zip(table["row"], table["col"], table["valid"], table["embedding"]):
            if valid:
                expected[(path.stem, row, col)] = np.asarray(vector, np.float32)
    assert 0 < result.rows == len(expected) < 2 * 3 * 4  # fewer than the scenes' 3 x 4 tiles each
    assert_same_rows(dataset_rows(out), expected)


def assert_precision(dataset: Path, requested: str, ran: str) -> None:
    """Every part's footer, and the manifest, say what ran; the settings what was asked."""
    parts = sorted(sensor_folder(dataset, SENSOR).glob("*.parquet"))
    assert parts
    for part in parts:
        metadata = read_part_metadata(part)
        assert (metadata["precision"], metadata["settings"]["precision"]) == (ran, requested), part.name
    manifest = json.loads((dataset / MANIFEST).read_text())
    assert {p["precision"] for p in manifest["parts"].values()} == {ran}
    assert manifest["sensors"][SENSOR]["precision"] == [ran]
    assert manifest["sensors"][SENSOR]["settings"]["precision"] == requested


def test_each_part_and_the_manifest_record_the_precision_that_ran(model, site, tmp_path, monkeypatch):
    files, _, _, _ = site
    embed_collection(model, files, SENSOR, tmp_path / "fp32", **FAST)
    assert_precision(tmp_path / "fp32", "fp32", "fp32")
    # "auto" as users get it: timed on this machine (conftest forces fp32 for the rest of the suite).
    monkeypatch.delenv(PRECISION_ENV)
    embed_collection(model, files, SENSOR, tmp_path / "auto", precision="auto", progress=False, strips_per_task=2)
    _, _, resolved = run_setup(model, SENSOR, SceneOptions(precision="auto"))
    assert_precision(tmp_path / "auto", "auto", resolved.name)


def test_a_retry_in_the_same_process_reads_a_cut_body_afresh(model, tmp_path, monkeypatch):
    """The first read of the scene's pixels gets a truncated HTTP body; the retry, in the same
    process, succeeds only if GDAL does not serve it the short body it cached."""
    for name, value in {TIMEOUT_ENV: "5", RETRIES_ENV: "0", RETRY_DELAY_ENV: "0"}.items():
        monkeypatch.setenv(name, value)
    www = tmp_path / "www"
    www.mkdir()
    name = f"{tmp_path.name}.tif"  # a URL of its own: GDAL's cache lives as long as the process
    rasterio.shutil.copy(sample_path("sentinel2_rgb_inland"), www / name, driver="COG", BLOCKSIZE=128,
                         COMPRESS="NONE")
    with rasterio.open(www / name) as src:  # the pixels of block row 1 (rows 128-255): strips 2 and 3
        (www / "CUT").write_text(str(int(src.get_tag_item("BLOCK_OFFSET_0_1", "TIFF", bidx=1)) + 100))
    real = run_module.embed_block

    def cut_once(task):
        try:
            return real(task)
        except Exception:
            (www / "CUT").unlink(missing_ok=True)  # the server answers in full from now on
            raise

    monkeypatch.setattr(run_module, "embed_block", cut_once)
    server = StallServer(www)  # its "cut" mode truncates bodies while www/CUT exists
    try:
        url = f"{server.start()}/cut/{name}"
        result = embed_collection(model, [url], SENSOR, tmp_path / "dataset", retries=1, precision="fp32",
                                  progress=False, strips_per_task=8)
    finally:
        server.stop()
    assert not (www / "CUT").exists(), "the first attempt was not cut: nothing was tested"
    assert result.failures == [] and result.written == 1
    single = tmp_path / "single.parquet"
    embed_scene(model, www / name, SENSOR, single, output="cls", precision="fp32", progress=False)
    table = pq.read_table(single).to_pydict()
    expected = {(Path(name).stem, r, c): np.asarray(v, np.float32)
                for r, c, ok, v in zip(table["row"], table["col"], table["valid"], table["embedding"]) if ok}
    assert_same_rows(dataset_rows(tmp_path / "dataset"), expected)
