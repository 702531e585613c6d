"""A STAC API search as the source of a collection run (xstars_models.archive.sources.StacSearch):
the real pystac-client against a loopback STAC API (tests/stac_api_server.py) whose items point at
the COGs the archive tests serve (tests/test_archive_run.py's ``site``). The search selects exactly
the items its collections, bbox and datetime name, over several pages, by POST or GET; the run
writes exactly those scenes' rows, equal key for key to single-scene ``embed_scene`` runs; the
command line does the same; a stalled or failing API ends with a typed error naming the request;
missing or bad arguments are refused by name."""

from __future__ import annotations

import datetime as dt
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow.parquet as pq
import pystac
import pytest
import rasterio
import test_archive_run
from rasterio.warp import transform_bounds
from stac_api_server import StacApiServer
from stall_server import StallServer
from test_archive_run import FAST, SENSOR, assert_same_rows, dataset_rows

from xstars_models.archive import expand_sources
from xstars_models.archive.run import embed_collection
from xstars_models.archive.sources import StacSearch
from xstars_models.cli import main
from xstars_models.errors import InvalidInputError, InvalidOptionError, MissingExtraError, NetworkTimeoutError
from xstars_models.io.network import RETRIES_ENV, RETRY_DELAY_ENV, TIMEOUT_ENV

# The archive run tests' six scenes (four served COGs) and their single-scene embed_scene rows.
site = test_archive_run.site
expected = test_archive_run.expected

INTERVAL = "2024-06-01/2024-06-30"
SELECTED = ["scene2", "scene3", "scene4"]  # in "s2", inside the box, in June 2024
GUARD_S = 60  # far above what the limits in these tests allow; only a hang reaches it


def served(site) -> tuple[str, list[float]]:
    """The base URL of the served COGs, and their common footprint (west, south, east, north) in degrees."""
    _, catalogue, www, _ = site
    with rasterio.open(www / "scene2.tif") as src:
        footprint = list(transform_bounds(src.crs, "EPSG:4326", *src.bounds))
    return catalogue.removesuffix("/stac/catalog.json"), footprint


def api_item(api: str, cogs: str, item_id: str, collection: str, when: str, box: list[float], cog: str) -> dict[str, Any]:
    west, south, east, north = box
    ring = [[west, south], [east, south], [east, north], [west, north], [west, south]]
    item = pystac.Item(item_id, geometry={"type": "Polygon", "coordinates": [ring]}, bbox=box,
                       datetime=dt.datetime.fromisoformat(when), properties={}, collection=collection)
    item.add_asset("visual", pystac.Asset(f"{cogs}/{cog}.tif", media_type=pystac.MediaType.COG, roles=["data"],
                                          extra_fields={"eo:bands": [{"name": n, "common_name": n}
                                                                     for n in ("red", "green", "blue")]}))
    item.set_self_href(f"{api}/collections/{collection}/items/{item_id}")
    return item.to_dict()


def api_items(api: str, site) -> list[dict[str, Any]]:
    """Three items to find (scene2-4 at 10:00 UTC on 2-4 June) and three that each miss one
    criterion; the misses point at a real COG (scene5), so one wrongly selected would add rows."""
    cogs, box = served(site)
    far = [box[0] + 20, box[1], box[2] + 20, box[3]]
    return [
        *(api_item(api, cogs, f"scene{k}", "s2", f"2024-06-0{k}T10:00:00+00:00", box, f"scene{k}") for k in (2, 3, 4)),
        api_item(api, cogs, "scene5", "s2", "2024-08-05T10:00:00+00:00", box, "scene5"),  # another month
        api_item(api, cogs, "far", "s2", "2024-06-10T10:00:00+00:00", far, "scene5"),  # elsewhere
        api_item(api, cogs, "other", "l8", "2024-06-10T10:00:00+00:00", box, "scene5"),  # another collection
    ]


def collection(collection_id: str) -> dict[str, Any]:
    extent = pystac.Extent(pystac.SpatialExtent([[-180, -90, 180, 90]]), pystac.TemporalExtent([[None, None]]))
    return pystac.Collection(collection_id, f"test collection {collection_id}", extent).to_dict(include_self_link=False)


def start_api(site, **options: Any) -> tuple[StacApiServer, str]:
    server = StacApiServer([collection("s2"), collection("l8")], [], **options)
    url = server.start()
    server.items = api_items(url, site)
    return server, url


@pytest.fixture(scope="module")
def api(site):
    server, url = start_api(site)
    yield server, url
    server.stop()


def search(url: str, site, **kwargs: Any) -> StacSearch:
    _, box = served(site)
    return StacSearch(url, "s2", (box[0] - 0.01, box[1] - 0.01, box[2] + 0.01, box[3] + 0.01), INTERVAL, **kwargs)


def searches(server: StacApiServer) -> list[tuple[str, str, Any]]:
    return [request for request in server.requests if request[1].startswith("/search")]


@pytest.mark.parametrize("post", [True, False], ids=["POST", "GET"])
def test_a_search_selects_the_items_of_its_collections_box_and_interval_over_pages(site, post):
    server, url = start_api(site, post=post)
    try:
        for limit, pages in ((1, 3), (2, 2), (None, 1)):
            server.requests.clear()
            scenes = expand_sources([search(url, site, limit=limit)])
            assert [s.scene_id for s in scenes] == SELECTED
            made = searches(server)
            assert len(made) == pages and {method for method, _, _ in made} == {"POST" if post else "GET"}
        assert [s.datetime for s in scenes] == [f"2024-06-0{k}T10:00:00Z" for k in (2, 3, 4)]
        assert [s.origin for s in scenes] == [f"{url}/collections/s2/items/{i}" for i in SELECTED]
        assert all(isinstance(s.source, pystac.Item) for s in scenes)
        server.requests.clear()
        assert [s.scene_id for s in expand_sources([search(url, site, limit=2, max_items=2)])] == SELECTED[:2]
        assert len(searches(server)) == 1  # max_items reached on the first page: no second request
    finally:
        server.stop()


def test_a_collection_run_over_a_search_writes_exactly_the_found_scenes_rows(model, site, expected, api, tmp_path):
    _, url = api
    out = tmp_path / "dataset"
    result = embed_collection(model, [search(url, site, limit=2)], SENSOR, out, **FAST)
    wanted = {key: vector for key, vector in expected.items() if key[0] in SELECTED}
    assert result.failures == [] and result.rows == len(wanted) > 0
    assert_same_rows(dataset_rows(out), wanted)
    table = pq.read_table(out, columns=["scene_id", "datetime"]).to_pydict()
    stamps = {scene: when for scene, when in zip(table["scene_id"], table["datetime"])}
    assert stamps == {f"scene{k}": dt.datetime(2024, 6, k, 10, tzinfo=dt.timezone.utc) for k in (2, 3, 4)}


def test_the_command_line_embeds_files_and_a_search_together(site, expected, api, folder, tmp_path, capsys):
    files, _, _, _ = site
    _, url = api
    _, box = served(site)
    out = tmp_path / "dataset"
    # Two collections, one of which holds none of the items: each --collection adds one.
    argv = ["embed-collection", str(folder), str(files[0]), "--stac-api", url, "--collection", "s2", "--collection", "l9",
            "--bbox", *map(str, box), "--datetime", INTERVAL, "--sensor", SENSOR, "--out", str(out),
            "--precision", "fp32", "--no-progress", "--strips-per-task", "2"]
    assert main(argv) == 0, capsys.readouterr().err
    wanted = {key: vector for key, vector in expected.items() if key[0] in ("scene0", *SELECTED)}
    assert_same_rows(dataset_rows(out), wanted)
    assert f"{len(wanted)} rows of {SENSOR}" in capsys.readouterr().out


def guarded(call, *args: Any) -> Any:
    """``call(*args)``, failing the test if it has not ended after GUARD_S (a hang)."""
    pool = ThreadPoolExecutor(1)
    try:
        return pool.submit(call, *args).result(timeout=GUARD_S)
    finally:
        pool.shutdown(wait=False)  # a hung call ends when the test stops its server


@pytest.fixture()
def fast_limits(monkeypatch):
    for name, value in ((TIMEOUT_ENV, "0.5"), (RETRIES_ENV, "1"), (RETRY_DELAY_ENV, "0")):
        monkeypatch.setenv(name, value)


@pytest.mark.parametrize("mode", ["before-headers", "after-headers"])
def test_a_stalled_landing_page_ends_with_a_timeout_naming_it(tmp_path, fast_limits, mode):
    (tmp_path / "landing.json").write_text("{}")
    server = StallServer(tmp_path)
    url = f"{server.start()}/{mode}/landing.json"
    try:
        with pytest.raises(NetworkTimeoutError, match="did not answer in time") as info:
            guarded(expand_sources, [StacSearch(url, "s2")])
    finally:
        server.stop()
    assert info.value.field == "url"
    assert f"GET {url}" in str(info.value) and "2 attempts" in str(info.value) and TIMEOUT_ENV in str(info.value)


def test_a_search_that_stalls_on_its_second_page_ends_with_a_timeout_in_one_cli_line(site, folder, tmp_path,
                                                                                       fast_limits, capsys):
    server, url = start_api(site, stall=True, page_size=2)
    try:
        with pytest.raises(NetworkTimeoutError, match=f"POST {url}/search did not answer in time"):
            guarded(expand_sources, [search(url, site, limit=2)])
        argv = ["embed-collection", str(folder), "--stac-api", url, "--collection", "s2", "--sensor", SENSOR,
                "--out", str(tmp_path / "d"), "--no-progress"]
        code = guarded(main, [*argv, "--datetime", INTERVAL])
    finally:
        server.stop()
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and f"{url}/search" in err and TIMEOUT_ENV in err, err
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize(("status", "attempts"), [(503, 2), (400, 1)])
def test_an_api_error_is_retried_when_it_is_the_servers_and_named(site, fast_limits, status, attempts):
    server, url = start_api(site, fail=status)
    try:
        with pytest.raises(InvalidInputError, match=f"POST {url}/search answered HTTP {status}") as info:
            expand_sources([search(url, site)])
    finally:
        server.stop()
    assert info.value.field == "url" and "failed on purpose" in str(info.value)
    assert len(searches(server)) == attempts


def test_a_search_that_finds_nothing_is_refused_naming_its_criteria(site, api):
    _, url = api
    with pytest.raises(InvalidInputError, match=rf"{url} found no item for collections=s2 .*datetime=2020-01-01/2020-12-31"):
        expand_sources([StacSearch(url, "s2", None, "2020-01-01/2020-12-31")])


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"url": "earth-search.example/v1"}, "url"),
    ({"bbox": (10, 50, 11)}, "bbox"),
    ({"bbox": (10, 51, 11, 50)}, "bbox"),
    ({"bbox": (10, 50, 11, 91)}, "bbox"),
    ({"datetime": "2024"}, "datetime"),
    ({"datetime": "2024-12-31/2024-01-01"}, "datetime"),
    ({"datetime": "../.."}, "datetime"),
    ({"datetime": "2024-02-30"}, "datetime"),
    ({"max_items": 0}, "max_items"),
    ({"limit": 20_000}, "limit"),
])
def test_bad_search_arguments_are_refused_by_name(kwargs, field):
    with pytest.raises(InvalidOptionError) as info:
        StacSearch(**{"url": "https://stac.example/v1", **kwargs})
    assert info.value.field == field


def test_search_arguments_in_their_accepted_forms():
    made = StacSearch("https://stac.example/v1", "s2", [1, 2, 3, 4], "2024-06-01T00:00:00.5+02:00/..")
    assert made.collections == ("s2",) and made.bbox == (1.0, 2.0, 3.0, 4.0)
    assert StacSearch("https://stac.example/v1", iter(["a", "b"])).collections == ("a", "b")


def test_a_search_without_pystac_client_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "pystac_client", None)
    with pytest.raises(MissingExtraError, match=r"pip install 'xstars-models\[archive\]'"):
        expand_sources([StacSearch("https://stac.example/v1", "s2")])


def test_the_command_line_refuses_no_sources_and_search_flags_without_an_api(folder, tmp_path, capsys):
    common = ["--sensor", SENSOR, "--out", str(tmp_path / "d")]
    assert main(["embed-collection", str(folder), *common]) == 2
    err = capsys.readouterr().err.strip()
    assert "nothing to embed" in err and "--stac-api" in err and err.count("\n") == 0
    assert main(["embed-collection", str(folder), "x.tif", "--bbox", "1", "2", "3", "4", *common]) == 2
    err = capsys.readouterr().err.strip()
    assert "--bbox select the items of a STAC API search" in err and "--stac-api" in err
    assert main(["embed-collection", str(folder), "--stac-api", "https://stac.example/v1", "--datetime", "June",
                 *common]) == 2
    assert capsys.readouterr().err.startswith("xstars embed-collection: error: argument --datetime: datetime='June'")
    assert not (tmp_path / "d").exists()
