"""Every network wait is bounded (xstars_models.io.network): a COG URL, a STAC item URL, a STAC
asset URL and a Hub endpoint that stall end the run after the limits with one line naming the URL
and the limit, instead of hanging. The scene cases run the real CLI in a subprocess, with a
generous wall-clock guard so that a regression fails the test rather than hanging the suite."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import rasterio
from factories import tiny_model
from fault_fixtures import faults  # noqa: F401 (fixture)
from hub_server import Fault
from stall_server import StallServer

from xstars_models import XStars
from xstars_models.errors import HubServerError, InvalidOptionError
from xstars_models.io.network import RETRIES_ENV, RETRY_DELAY_ENV, TIMEOUT_ENV, gdal_http_options, network_limits
from xstars_models.samples import sample_path

SENSOR = "sentinel2_rgb"
FAST = {TIMEOUT_ENV: "1", RETRIES_ENV: "0", RETRY_DELAY_ENV: "0"}
GUARD_S = 120  # far above what the limits allow (about 1 s per request here); only a hang reaches it


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A model folder, and a server with a 1024 x 1024 px COG (the sample tiled 4 x 4) and STAC items
    whose one asset points at it through each way of stalling."""
    root = tmp_path_factory.mktemp("stalls")
    www = root / "www"
    www.mkdir()
    with rasterio.open(sample_path("sentinel2_rgb_inland")) as src:
        tile, profile = src.read(), src.profile
    import numpy as np

    pixels = np.tile(tile, (1, 4, 4))
    profile.update(driver="COG", width=1024, height=1024, compress="DEFLATE", blocksize=256)
    for key in ("blockxsize", "blockysize", "tiled", "interleave"):
        profile.pop(key, None)
    with rasterio.open(www / "scene.tif", "w", **profile) as dst:
        dst.write(pixels)
    server = StallServer(www)
    base = server.start()
    bands = [{"name": name, "common_name": name} for name in ("red", "green", "blue")]
    for mode in ("ok", "before-headers", "after-headers"):
        item = {
            "type": "Feature", "stac_version": "1.0.0", "id": f"item-{mode}", "geometry": None, "bbox": None,
            "properties": {"datetime": "2024-06-01T00:00:00Z"}, "links": [],
            "assets": {"visual": {"href": f"{base}/{mode}/scene.tif", "type": "image/tiff; application=geotiff; "
                                  "profile=cloud-optimized", "roles": ["data"], "eo:bands": bands}},
        }
        (www / f"item-{mode}.json").write_text(json.dumps(item))
    folder = tiny_model().save_pretrained(root / "model")
    yield folder, base, root
    server.stop()


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, **FAST, "XSTARS_PRECISION": "fp32"}
    return subprocess.run([sys.executable, "-m", "xstars_models.cli", *args], capture_output=True, text=True,
                          timeout=GUARD_S, env=env)


def assert_one_line_naming(result: subprocess.CompletedProcess, *words: str) -> None:
    err = result.stderr.strip()
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in err and err.count("\n") == 0, err
    for word in words:
        assert word in err, (word, err)


def assert_no_unresumable_leftovers(out: Path) -> None:
    partial, record = out.with_name(out.name + ".partial"), out.with_name(out.name + ".partial.json")
    assert not out.exists()
    assert partial.exists() == record.exists(), sorted(p.name for p in out.parent.iterdir())


@pytest.mark.parametrize("mode", ["before-headers", "after-headers"])
def test_a_stalled_cog_url_ends_with_one_line_naming_it_and_the_limit(site, tmp_path, mode):
    folder, base, _ = site
    url = f"{base}/{mode}/scene.tif"
    out = tmp_path / "map.tif"
    result = run_cli("embed-scene", str(folder), url, "--sensor", SENSOR, "--out", str(out), "--no-progress")
    assert_one_line_naming(result, url, TIMEOUT_ENV)
    assert not list(tmp_path.iterdir())  # failed while opening: nothing written


def test_a_cog_that_stalls_after_opening_ends_with_the_url_named(site, tmp_path):
    folder, base, _ = site
    url = f"{base}/after-open/scene.tif"
    out = tmp_path / "map.tif"
    result = run_cli("embed-scene", str(folder), url, "--sensor", SENSOR, "--out", str(out), "--no-progress")
    assert_one_line_naming(result, url, TIMEOUT_ENV)
    assert_no_unresumable_leftovers(out)


def test_a_stalled_stac_item_url_ends_with_one_line(site, tmp_path):
    folder, base, _ = site
    url = f"{base}/before-headers/item-ok.json"
    result = run_cli("embed-scene", str(folder), url, "--sensor", SENSOR, "--out", str(tmp_path / "x.tif"), "--no-progress")
    assert_one_line_naming(result, url, TIMEOUT_ENV, "did not answer in time")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("mode", ["before-headers", "after-headers"])
def test_a_stalled_stac_asset_ends_with_one_line_naming_the_asset(site, tmp_path, mode):
    folder, base, _ = site
    item = f"{base}/ok/item-{mode}.json"
    result = run_cli("embed-scene", str(folder), item, "--sensor", SENSOR, "--out", str(tmp_path / "x.tif"), "--no-progress")
    assert_one_line_naming(result, f"{base}/{mode}/scene.tif", TIMEOUT_ENV)
    assert not list(tmp_path.iterdir())


def test_the_same_item_and_cog_are_read_when_the_server_answers(site, tmp_path):
    folder, base, _ = site
    for source in (f"{base}/ok/scene.tif", f"{base}/ok/item-ok.json"):
        out = tmp_path / (Path(source).stem + ".tif")
        result = run_cli("embed-scene", str(folder), source, "--sensor", SENSOR, "--out", str(out), "--no-progress")
        assert result.returncode == 0, result.stderr
        assert out.is_file()


def test_a_stalled_hub_ends_after_the_limits_with_the_url_named(published, hf_cache, faults, monkeypatch):  # noqa: F811
    _, _, repo_id, _ = published
    monkeypatch.setenv(TIMEOUT_ENV, "0.5")
    monkeypatch.setenv(RETRIES_ENV, "1")
    monkeypatch.setenv(RETRY_DELAY_ENV, "0")
    faults.inject(Fault("/*/resolve/*", stall_s=5))
    with pytest.raises(HubServerError) as info:
        XStars.from_pretrained(repo_id)
    message = str(info.value)
    assert f"/{repo_id}/resolve/main/config.json did not answer in time (2 attempts; 0.5 s per request" in message
    assert TIMEOUT_ENV in message
    # Only the two bounded metadata requests: the Hub client (and its 60 s retries) never ran.
    assert [method for method, _ in faults.requests] == ["HEAD", "HEAD"]


@pytest.mark.parametrize(("name", "value"), [(TIMEOUT_ENV, "0"), (TIMEOUT_ENV, "soon"), (RETRIES_ENV, "1.5"), (RETRY_DELAY_ENV, "-1")])
def test_a_bad_limit_is_named(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(InvalidOptionError) as info:
        network_limits()
    assert info.value.field == name and repr(value) in str(info.value)


def test_the_limits_reach_gdal_unless_gdal_is_told_otherwise(monkeypatch):
    monkeypatch.setenv(TIMEOUT_ENV, "7")
    monkeypatch.setenv(RETRIES_ENV, "4")
    options = gdal_http_options()
    assert options["GDAL_HTTP_TIMEOUT"] == options["GDAL_HTTP_LOW_SPEED_TIME"] == "7"
    assert options["GDAL_HTTP_MAX_RETRY"] == "4"
    monkeypatch.setenv("GDAL_HTTP_TIMEOUT", "99")  # the user's own GDAL setting wins: GDAL reads it
    assert "GDAL_HTTP_TIMEOUT" not in gdal_http_options()
