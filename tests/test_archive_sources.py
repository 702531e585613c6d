"""The scenes a collection run's sources name (xstars_models.archive.sources): files and URLs by
file name, STAC Items, ItemCollections and static Catalogs walked, local or over HTTP from a
loopback server; duplicate ids and documents that are no STAC refused by name."""

from __future__ import annotations

import json
from pathlib import Path

import pystac
import pytest
from range_server import RangeServer

from xstars_models.archive import expand_sources
from xstars_models.errors import InvalidInputError


def item(item_id: str, day: int) -> pystac.Item:
    made = pystac.Item(item_id, geometry=None, bbox=None, datetime=__import__("datetime").datetime(2024, 6, day), properties={})
    made.add_asset("visual", pystac.Asset(f"https://example.com/{item_id}.tif", media_type=pystac.MediaType.COG))
    return made


@pytest.fixture()
def catalogue(tmp_path) -> Path:
    """A static catalogue: a root catalog, a collection of 2 items under it, and 1 item at the root."""
    root = pystac.Catalog("root", "test catalogue")
    collection = pystac.Collection("s2", "two scenes", pystac.Extent(pystac.SpatialExtent([[0, 0, 1, 1]]),
                                                                    pystac.TemporalExtent([[None, None]])))
    collection.add_items([item("S2A_1", 1), item("S2A_2", 2)])
    root.add_child(collection)
    root.add_item(item("S2B_3", 3))
    root.normalize_hrefs(str(tmp_path / "stac"))
    root.save(pystac.CatalogType.SELF_CONTAINED)
    return tmp_path / "stac" / "catalog.json"


def test_files_and_urls_are_one_scene_each_named_by_their_file(tmp_path):
    scenes = expand_sources([tmp_path / "a.tif", "https://example.com/data/b.tif?sig=x"])
    assert [(s.scene_id, s.datetime) for s in scenes] == [("a", None), ("b", None)]
    assert scenes[1].source == "https://example.com/data/b.tif?sig=x"


def test_items_collections_and_catalogues_give_their_items_with_dates(catalogue, tmp_path):
    walked = expand_sources([catalogue])
    assert sorted((s.scene_id, s.datetime) for s in walked) == [
        ("S2A_1", "2024-06-01T00:00:00Z"), ("S2A_2", "2024-06-02T00:00:00Z"), ("S2B_3", "2024-06-03T00:00:00Z")]
    assert all(isinstance(s.source, pystac.Item) and s.origin == str(catalogue) for s in walked)
    features = tmp_path / "items.json"
    features.write_text(json.dumps({"type": "FeatureCollection", "features": [item("X", 4).to_dict(), item("Y", 5).to_dict()]}))
    single = tmp_path / "single.json"
    single.write_text(json.dumps(item("Z", 6).to_dict()))
    assert [s.scene_id for s in expand_sources([features, single])] == ["X", "Y", "Z"]


def test_a_catalogue_is_walked_over_http(catalogue):
    server = RangeServer(catalogue.parent)
    base = server.start()
    try:
        scenes = expand_sources([f"{base}/catalog.json"])
    finally:
        server.stop()
    assert sorted(s.scene_id for s in scenes) == ["S2A_1", "S2A_2", "S2B_3"]
    assert {p for _, p, _ in server.requests} >= {"/catalog.json", "/s2/collection.json"}


def test_duplicate_ids_and_non_stac_documents_are_refused_by_name(tmp_path):
    with pytest.raises(InvalidInputError, match=r"scene id 'a' comes from both .*x/a.tif and .*y/a.tif") as info:
        expand_sources([tmp_path / "x" / "a.tif", tmp_path / "y" / "a.tif"])
    assert info.value.field == "sources"
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"type": "Topology"}))
    with pytest.raises(InvalidInputError, match="type 'Topology', not a STAC Item"):
        expand_sources([other])
    with pytest.raises(InvalidInputError, match="no scene to embed"):
        expand_sources([])
