"""Searching a dataset of tile embeddings (xstars_models.search) built by a real collection run of
the tiny model: two Sentinel-2 scenes (the two samples) and an aerial scene (the inland sample
up-sampled to 5 m, so its tiles lie on the Sentinel-2 tiles of that scene). The query's own tile
comes first for an image, a point and a tile; a filter is applied before ranking; a stale index
is updated or rebuilt and a damaged one rebuilt with a warning; the command writes GeoParquet and
GeoJSON; a folder of embed_scene files is a dataset too."""

from __future__ import annotations

import json
import shutil

import geopandas
import numpy as np
import pyarrow.parquet as pq
import pytest
import rasterio
import torch
from affine import Affine
from rasterio.warp import transform as warp
from toy_data import ToyPairs

from xstars_models.archive import embed_collection
from xstars_models.archive.parts import part_path, write_part
from xstars_models.cli import main
from xstars_models.errors import InvalidInputError, InvalidOptionError
from xstars_models.samples import sample_path
from xstars_models.scenes import embed_scene
from xstars_models.search import SearchIndex, parse_where, search
from xstars_models.training import fit_global_whitening

S2, AERIAL = "sentinel2_rgb", "aerial"
FAST = {"precision": "fp32", "progress": False, "workers": 1}


@pytest.fixture(scope="module")
def model():
    """The tiny model with a whitening fit on toy pairs (a search ranks in the whitened space)."""
    from factories import tiny_model

    model = tiny_model(extra_sensors=(AERIAL,))
    model.whitening = fit_global_whitening(model, ToyPairs(8), fit_on="eight toy pairs", progress=False)
    return model


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    """{scene id: (file, sensor, pixels C x H x W, transform)}: the two Sentinel-2 samples (4 x 4
    tiles of 64 px each) and the inland one up-sampled 2x to 5 m (4 x 4 tiles of 128 px)."""
    root = tmp_path_factory.mktemp("scenes")
    found = {}
    for name in ("inland", "coast"):
        with rasterio.open(sample_path(f"sentinel2_rgb_{name}")) as src:
            pixels, profile = src.read(), src.profile
        found[name] = (shutil.copy(sample_path(f"sentinel2_rgb_{name}"), root / f"{name}.tif"), S2, pixels,
                       profile["transform"])
        if name == "inland":
            aerial = pixels.repeat(2, axis=1).repeat(2, axis=2)
            t = profile["transform"]
            fine = Affine(5.0, 0, t.c, 0, -5.0, t.f)
            path = root / "inland_aerial.tif"
            with rasterio.open(path, "w", driver="GTiff", width=512, height=512, count=3, dtype="uint8",
                               crs=profile["crs"], transform=fine) as dst:
                dst.write(aerial)
            found["inland_aerial"] = (path, AERIAL, aerial, fine)
    return found


@pytest.fixture(scope="module")
def dataset(model, scenes, tmp_path_factory):
    out = tmp_path_factory.mktemp("dataset") / "tiles"
    for sensor in (S2, AERIAL):
        embed_collection(model, [f for f, s, _, _ in scenes.values() if s == sensor], sensor, out, **FAST)
    return out


def fresh(dataset, tmp_path):
    """A copy of the dataset without an index, for a test that changes it."""
    copy = tmp_path / "tiles"
    shutil.copytree(dataset, copy, ignore=shutil.ignore_patterns("_index"))
    return copy


def tile_centre(scenes, scene_id: str, row: int, col: int) -> tuple[float, float]:
    """(lon, lat) of the centre of a tile, from the scene's transform (64 px tiles at 10 m:
    640 m on the ground, whichever sensor)."""
    _, _, _, t = scenes[scene_id]
    x, y = t.c + 640 * (col + 0.5), t.f - 640 * (row + 0.5)
    lon, lat = warp("EPSG:32618", "EPSG:4326", [x], [y])
    return lon[0], lat[0]


def first(result) -> tuple:
    hit = result.hits.to_pylist()[0]
    return hit["sensor"], hit["scene_id"], hit["row"], hit["col"]


def test_an_image_chip_finds_its_own_tile_first(model, scenes, dataset, tmp_path):
    _, _, pixels, _ = scenes["coast"]
    chip = pixels[:, 64:128, 128:192]  # tile (1, 2) of 64 px
    result = search(dataset, image=chip, sensor=S2, k=5)
    assert first(result) == (S2, "coast", 1, 2)
    assert result.hits["score"][0].as_py() > 0.999 and result.hits.num_rows == 5
    assert result.index.action == "built" and result.query == {"kind": "image", "sensor": S2}
    # An aerial chip as a GeoTIFF file: tile (2, 3) of 128 px.
    _, _, aerial, t = scenes["inland_aerial"]
    path = tmp_path / "chip.tif"
    with rasterio.open(path, "w", driver="GTiff", width=128, height=128, count=3, dtype="uint8", crs="EPSG:32618",
                       transform=t @ Affine.translation(384, 256)) as dst:
        dst.write(aerial[:, 256:384, 384:512])
    result = search(dataset, image=path, sensor=AERIAL, k=3)
    assert first(result) == (AERIAL, "inland_aerial", 2, 3) and result.index.action == "loaded"
    with pytest.warns(UserWarning, match="64 x 64 px and the dataset's aerial tiles are 128 x 128 px"):
        search(dataset, image=aerial[:, :64, :64], sensor=AERIAL)


def test_a_point_takes_the_tile_under_it_and_a_tile_finds_itself_first(scenes, dataset):
    lon, lat = tile_centre(scenes, "inland", 3, 1)
    result = search(dataset, near=(lon, lat), sensor=AERIAL, k=4)
    assert result.query["scene_id"] == "inland_aerial" and (result.query["row"], result.query["col"]) == (3, 1)
    assert first(result) == (AERIAL, "inland_aerial", 3, 1) and result.hits["score"][0].as_py() > 0.999
    # Only Sentinel-2 covers the coast: no sensor needed.
    lon, lat = tile_centre(scenes, "coast", 0, 2)
    assert first(search(dataset, near=(lon, lat))) == (S2, "coast", 0, 2)
    for like in ("coast:2:0", ("inland", 0, 3)):
        result = search(dataset, like=like, k=3)
        expected = tuple(like.split(":")) if isinstance(like, str) else like
        assert first(result)[1:] == (expected[0], int(expected[1]), int(expected[2]))
    with pytest.raises(InvalidInputError, match="no tile of .* holds the point") as info:
        search(dataset, near=(0.0, 0.0))
    assert info.value.field == "near"
    with pytest.raises(InvalidInputError, match="has no tile coast:9:9") as info:
        search(dataset, like="coast:9:9")
    assert info.value.field == "like"
    with pytest.raises(InvalidOptionError, match="exactly one query") as info:
        search(dataset, near=(lon, lat), like="coast:0:0")
    assert info.value.field == "query"
    with pytest.raises(InvalidOptionError) as info:
        search(dataset, image=np.zeros((64, 64, 3), np.uint8))
    assert info.value.field == "sensor"


def whitened_unit_rows(model, dataset) -> dict[tuple, np.ndarray]:
    """Every row of the dataset, whitened and scaled to unit length here, by key."""
    rows = {}
    for path in sorted(dataset.glob("sensor-*/part-*.parquet")):
        table = pq.read_table(path).to_pydict()
        vectors = np.asarray(table["embedding"], np.float32)
        sensor = table["sensor"][0]
        white = model.whitening.apply(torch.from_numpy(vectors), "cls", sensor).double().numpy()
        white /= np.linalg.norm(white, axis=1, keepdims=True)
        for key, vector in zip(zip(table["sensor"], table["scene_id"], table["row"], table["col"]), white):
            rows[key] = vector
    return rows


def test_a_filter_applies_before_ranking_and_k_hits_of_the_filtered_set_come_back(model, dataset):
    rows = whitened_unit_rows(model, dataset)
    query = rows[(S2, "coast", 1, 1)]
    aerial = sorted((k for k in rows if k[0] == AERIAL), key=lambda k: -float(rows[k] @ query))
    result = search(dataset, like="coast:1:1", k=6, where="sensor = 'aerial'")
    got = [(h["sensor"], h["scene_id"], h["row"], h["col"]) for h in result.hits.to_pylist()]
    assert got == aerial[:6]  # the 6 best aerial tiles, though Sentinel-2 tiles rank above them unfiltered
    np.testing.assert_allclose(result.hits["score"].to_numpy(), [rows[k] @ query for k in aerial[:6]], atol=1e-5)
    unfiltered = search(dataset, like="coast:1:1", k=6)
    assert sum(h["sensor"] == AERIAL for h in unfiltered.hits.to_pylist()) < 6
    narrow = search(dataset, like="coast:1:1", k=10, where="scene_id = 'inland' AND row IN (0, 3) AND NOT col = 0")
    assert sorted((h["row"], h["col"]) for h in narrow.hits.to_pylist()) == [(r, c) for r in (0, 3) for c in (1, 2, 3)]
    assert {h["scene_id"] for h in narrow.hits.to_pylist()} == {"inland"}


def test_rows_and_their_vectors_come_in_the_order_of_the_ids_across_parts(model, dataset):
    index = SearchIndex(dataset)
    assert len(index.parts) > 1
    ids = np.array([int(index.offsets[-1]) - 1, 0, int(index.offsets[1]) - 1])  # last part, first part, first part
    table = index.rows(ids).to_pylist()
    keys = [(r["sensor"], r["scene_id"], r["row"], r["col"]) for r in table]
    assert keys[1] != keys[0] and keys[1] != keys[2]
    expected = whitened_unit_rows(model, dataset)
    np.testing.assert_allclose(index.row_vectors(ids), np.stack([expected[k] for k in keys]), atol=1e-5)


def test_where_parses_a_small_sql_subset_and_names_what_is_wrong():
    import pyarrow as pa

    table = pa.table({"sensor": ["aerial", "s2", "s2"], "row": pa.array([0, 1, 2], pa.int32()),
                      "datetime": pa.array([0, 1_717_200_000_000_000, None], pa.timestamp("us", tz="UTC")),
                      "bbox": [{"xmin": 0.0, "ymin": 0.0, "xmax": 1.0, "ymax": 1.0}, {"xmin": 5.0, "ymin": 5.0,
                               "xmax": 6.0, "ymax": 6.0}, {"xmin": 2.0, "ymin": 2.0, "xmax": 3.0, "ymax": 3.0}]})

    def kept(text):
        return table.filter(parse_where(text))["row"].to_pylist()

    assert kept("sensor = 's2'") == [1, 2]
    assert kept("datetime >= '2024-05-01' OR row BETWEEN 0 AND 0") == [0, 1]  # 1 717 200 000 s: 2024-06-01
    assert kept("datetime IS NULL") == [2]
    assert kept("bbox(0.5, 0.5, 2.5, 2.5)") == [0, 2]
    assert kept("NOT (sensor <> 'aerial') or row > 1") == [0, 2]
    for bad, where in (("sensor = aerial", "found 'aerial'"), ("colour = 'red'", "unknown column 'colour'"),
                       ("row = '1'", "whole number"), ("datetime > 'June'", "not an ISO 8601 date"),
                       ("sensor = 'a' AND", "expected word"), ("sensor = 'a'; DROP", "unexpected '; DROP' at character 13")):
        with pytest.raises(InvalidOptionError, match=where) as info:
            parse_where(bad)
        assert info.value.field == "where"


def test_an_index_covering_fewer_parts_is_updated_and_a_changed_part_rebuilds_it(model, scenes, dataset, tmp_path):
    copy = tmp_path / "tiles"
    shutil.copytree(dataset, copy, ignore=shutil.ignore_patterns("_index", "sensor-aerial"))
    before = search(copy, like="inland:0:0", k=40)
    assert before.index.action == "built" and before.index.rows == 32
    assert AERIAL not in before.hits["sensor"].to_pylist()
    embed_collection(model, [scenes["inland_aerial"][0]], AERIAL, copy, **FAST)
    after = search(copy, like="inland:0:0", k=40)
    assert after.index.action == "updated" and after.index.rows == 48 and after.index.reason == "1 new parts"
    assert AERIAL in after.hits["sensor"].to_pylist()
    record = json.loads((copy / "_index" / "index.json").read_text())
    assert {p["path"] for p in record["parts"]} == {p.relative_to(copy).as_posix() for p in copy.glob("sensor-*/*.parquet")}
    # The same ranking as an index built from scratch.
    scratch = search(fresh(copy, tmp_path / "scratch"), like="inland:0:0", k=40)
    assert after.hits.drop_columns(["score"]).equals(scratch.hits.drop_columns(["score"]))
    # A part rewritten with other rows (as a rerun with --restart would): rebuilt, not trusted.
    part = next(copy.glob("sensor-aerial/*.parquet"))
    table = pq.read_table(part)
    pq.write_table(table.slice(0, 10), part)
    rebuilt = search(copy, like="inland:0:0", k=40)
    assert rebuilt.index.action == "rebuilt" and "was changed" in rebuilt.index.reason and rebuilt.index.rows == 42


def test_a_damaged_index_is_rebuilt_with_a_warning(dataset, tmp_path):
    copy = fresh(dataset, tmp_path)
    expected = search(copy, like="coast:3:3", k=5).hits
    index = copy / "_index" / "index.faiss"
    data = bytearray(index.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte: FAISS would read it without complaint
    index.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="index.faiss is damaged: its size or sha256 differs"):
        result = search(copy, like="coast:3:3", k=5)
    assert result.index.action == "rebuilt" and result.hits.equals(expected)
    (copy / "_index" / "index.json").write_text("{not json")
    with pytest.warns(UserWarning, match="index.json is unreadable"):
        assert search(copy, like="coast:3:3", k=5).hits.equals(expected)
    assert search(copy, like="coast:3:3", k=5).index.action == "loaded"


def test_the_command_writes_geoparquet_and_geojson_and_prints_a_table(dataset, tmp_path, capsys):
    out = tmp_path / "hits.parquet"
    assert main(["search", str(dataset), "--like", "inland:1:1", "--sensor", S2, "-k", "4", "--out", str(out)]) == 0
    assert pq.read_schema(out).names == ["scene_id", "row", "col", "geometry", "bbox", "crs", "native_bounds", "datetime",
                                         "sensor", "score"]
    frame = geopandas.read_parquet(out)  # geopandas leaves out the bbox covering
    assert len(frame) == 4 and frame.crs.to_string() == "OGC:CRS84"
    assert tuple(frame.iloc[0][["sensor", "scene_id", "row", "col"]]) == (S2, "inland", 1, 1)
    assert list(frame["score"]) == sorted(frame["score"], reverse=True)
    lon, lat = frame.geometry.iloc[0].centroid.coords[0]
    assert np.allclose((lon, lat), tile_centre_of(dataset, "inland", 1, 1), atol=1e-6)
    geojson = tmp_path / "hits.geojson"
    where = ["--where", "sensor = 'aerial'"]
    assert main(["search", str(dataset), "--like", "inland:1:1", "--sensor", S2, "-k", "3", *where, "--out", str(geojson)]) == 0
    features = json.loads(geojson.read_text())["features"]
    assert [f["properties"]["sensor"] for f in features] == [AERIAL] * 3
    assert all(f["geometry"]["type"] == "Polygon" and len(f["geometry"]["coordinates"][0]) == 5 for f in features)
    assert set(features[0]["properties"]) == {"scene_id", "row", "col", "bbox", "crs", "native_bounds", "datetime",
                                              "sensor", "score"}
    scores = [f["properties"]["score"] for f in features]
    assert scores == sorted(scores, reverse=True)
    capsys.readouterr()
    assert main(["search", str(dataset), "--like", "coast:0:0", "-k", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["rank", "score", "sensor", "scene_id", "row", "col", "datetime", "lon", "lat"]
    assert lines[2].split()[:6] == ["1", "1.0000", S2, "coast", "0", "0"] and len(lines) == 4
    assert main(["search", str(dataset), "--like", "coast:0:0", "--where", "colour = 'red'"]) == 2
    assert "argument --where: where \"colour = 'red'\": unknown column 'colour'" in capsys.readouterr().err
    assert main(["search", str(dataset), "--like", "coast:0:0", "--out", str(out)]) == 2
    assert "exists; pass --overwrite to replace it" in capsys.readouterr().err


def tile_centre_of(dataset, scene_id, row, col) -> tuple[float, float]:
    table = pq.read_table(next(dataset.glob(f"sensor-{S2}/part-{scene_id}-*.parquet"))).to_pylist()
    tile = next(t for t in table if (t["row"], t["col"]) == (row, col))
    box = tile["bbox"]
    return (box["xmin"] + box["xmax"]) / 2, (box["ymin"] + box["ymax"]) / 2


def test_a_folder_of_embed_scene_files_is_a_dataset(model, folder, scenes, dataset, tmp_path):
    from xstars_models import XStars

    saved = XStars.from_pretrained(folder)  # its files name the model by this folder
    files = tmp_path / "files"
    for scene_id in ("inland", "coast", "inland_aerial"):
        source, sensor, _, _ = scenes[scene_id]
        embed_scene(saved, source, sensor, files / f"{scene_id}.parquet", output="cls", precision="fp32", progress=False)
    result = search(files, like="coast:2:1", k=48)
    assert first(result) == (S2, "coast", 2, 1) and result.index.rows == 48
    # The same rows, footprints and ranking as the collection of the same scenes.
    collection = search(dataset, like="coast:2:1", k=48).hits
    for column in ("scene_id", "row", "col", "sensor", "crs"):
        assert result.hits[column].to_pylist() == collection[column].to_pylist()
    np.testing.assert_allclose(np.asarray(result.hits["native_bounds"].to_pylist()),
                               np.asarray(collection["native_bounds"].to_pylist()), atol=1e-6)
    for got, want in zip(result.hits["bbox"].to_pylist(), collection["bbox"].to_pylist()):
        assert np.allclose(list(got.values()), list(want.values()), atol=1e-9)
    chip = scenes["inland"][2][:, 128:192, 0:64]
    assert first(saved.search(files, image=chip, sensor=S2)) == (S2, "inland", 2, 0)  # XStars.search: this model
    other = tmp_path / "other.parquet"
    embed_scene(model, scenes["coast"][0], S2, other, output="cls", precision="fp32", progress=False)
    shutil.copy(other, files / "stray.parquet")  # the tiny model unsaved: its files name its architecture
    with pytest.raises(InvalidInputError, match="embedded by different models") as info:
        search(files, like="coast:2:1")
    assert info.value.field == "dataset"


def synthetic_parts(root, rows_per_part: int, parts: int, dim: int = 32, seed: int = 0) -> np.ndarray:
    """Parts of unit vectors (stored whitened: no model needed), scenes a day apart;
    returns the vectors in dataset order."""
    from xstars_models.scenes.tiles import TileTable

    rng = np.random.default_rng(seed)
    mixing = rng.standard_normal((4, dim))  # vectors near a 4-d subspace, as embeddings have few strong axes
    everything = []
    for p in range(parts):
        vectors = rng.standard_normal((rows_per_part, 4)) @ mixing + 0.05 * rng.standard_normal((rows_per_part, dim))
        vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)
        n = rows_per_part
        row, col = np.divmod(np.arange(n), 100)
        west, south = 10 + 0.01 * col, 40 + 0.01 * row + p
        rings = np.stack([np.stack([west, south], -1), np.stack([west + 0.01, south], -1),
                          np.stack([west + 0.01, south + 0.01], -1), np.stack([west, south + 0.01], -1),
                          np.stack([west, south], -1)], axis=1)
        table = TileTable(row.astype(np.int32), col.astype(np.int32), vectors, np.zeros((n, 4)), rings,
                          np.stack([west, south, west + 0.01, south + 0.01], -1), "EPSG:4326", 0)
        scene = f"day{p}"
        write_part(part_path(root, "sentinel2", scene, 0), table, scene_id=scene, sensor="sentinel2",
                   datetime=f"2024-06-{p + 1:02d}T10:00:00Z",
                   metadata={"settings": {"whiten": True, "tile_px": 64, "precision": "fp32"}})
        everything.append(vectors)
    return np.concatenate(everything)


def test_a_large_dataset_gets_an_ivf_pq_index_with_its_recall_measured(tmp_path):
    vectors = synthetic_parts(tmp_path / "big", 3500, 3)
    with pytest.raises(InvalidOptionError, match="stored whitened and cannot be compared unwhitened") as info:
        SearchIndex(tmp_path / "big", whiten=False)
    assert info.value.field == "whiten"
    index = SearchIndex(tmp_path / "big", exact_max_rows=5000, recall_queries=100)
    report = index.report
    assert report.built.kind == "ivfpq" and report.rows == 10500 and report.built.params == {"nlist": 102, "m": 16,
                                                                                             "nbits": 8}
    assert "recall@10 against exact search" in report.describe()
    # Recall measured here, against numpy's exact neighbours of other rows, agrees with the report's.
    queries = np.arange(0, 10500, 105)
    _, ids = index.nearest(vectors[queries], k=11)
    exact = np.argsort(-(vectors[queries] @ vectors.T), axis=1)[:, :11]
    shares = [len(set(i[i != q][:10]) & set(e[e != q][:10])) / 10 for q, i, e in zip(queries, ids, exact)]
    assert report.built.recall_at_10 > 0.6 and abs(np.mean(shares) - report.built.recall_at_10) < 0.1, shares
    # A narrow filter still gives k hits, all of it: every cluster is scanned when nprobe's are not enough.
    result = index.search(like="day1:5:7", k=10, where="datetime >= '2024-06-03' AND row = 0 AND col < 12")
    assert result.hits.num_rows == 10 and set(result.hits["scene_id"].to_pylist()) == {"day2"}
    assert max(result.hits["col"].to_pylist()) < 12


def test_a_model_whose_whitening_cannot_place_every_sensor_is_refused_before_any_work(dataset, tmp_path):
    from factories import tiny_model

    from xstars_models.whitening import fit_whitening

    copy = fresh(dataset, tmp_path)
    plain = tiny_model(extra_sensors=(AERIAL,))  # no fitted whitening
    with pytest.raises(InvalidOptionError, match="this model has none; search with whiten=False") as info:
        SearchIndex(copy, model=plain)
    assert info.value.field == "whiten" and not (copy / "_index").exists()
    partial = tiny_model(extra_sensors=(AERIAL,))
    partial.whitening = fit_whitening({"cls": {S2: torch.randn(16, 32)}})  # Sentinel-2 only
    with pytest.raises(InvalidOptionError, match="not 'aerial'") as info:
        SearchIndex(copy, model=partial)
    assert info.value.field == "sensor" and not (copy / "_index").exists()
    # Unwhitened, the stored vectors are ranked as they are.
    result = search(copy, model=plain, whiten=False, like="coast:1:1", k=3)
    assert first(result) == (S2, "coast", 1, 1) and result.index.action == "built"
