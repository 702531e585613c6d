"""Part files of a collection's GeoParquet dataset (xstars_models.archive.parts): parts of two
sensors and three scenes read back as one table by geopandas, pyarrow (file, dataset, with and
without Hive partitioning) and DuckDB; GeoParquet 1.1 metadata with the bbox covering; the same
part gives the same bytes; a failed write leaves nothing; names safe for any scene id; bad tile
tables, datetimes and metadata refused by field.

The tile tables are a stand-in with the attributes of scenes.tiles.TileTable, so these tests do not
depend on the embedding code."""

from __future__ import annotations

import errno
import hashlib
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import duckdb
import geopandas
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import shapely

from xstars_models.archive.parts import part_path, read_part_metadata, safe_id, sensor_folder, write_part
from xstars_models.errors import InvalidInputError, InvalidOptionError
from xstars_models.scenes.tiles import TileTable

DIM = 8
COLUMNS = ["scene_id", "row", "col", "geometry", "bbox", "crs", "native_bounds", "datetime", "sensor", "embedding"]


def tiles(rows: range, cols: int, lon0: float, lat0: float, seed: int) -> TileTable:
    """Tiles ``rows`` x ``cols`` of a grid of 0.01 degree tiles whose corner is (lon0, lat0) at
    row 0 (rows go south), each with a 640 m square in a UTM-like native CRS."""
    grid = [(r, c) for r in rows for c in range(cols)]
    row = np.array([r for r, _ in grid], np.int32)
    col = np.array([c for _, c in grid], np.int32)
    west, north = lon0 + 0.01 * col, lat0 - 0.01 * row
    east, south = west + 0.01, north - 0.01
    rings = np.stack([np.stack([west, south], -1), np.stack([east, south], -1), np.stack([east, north], -1),
                      np.stack([west, north], -1), np.stack([west, south], -1)], axis=1)  # counter-clockwise
    native = np.stack([500_000 + 640.0 * col, 4_000_000 - 640.0 * (row + 1), 500_640 + 640.0 * col,
                       4_000_000 - 640.0 * row], -1)
    embedding = np.random.default_rng(seed).standard_normal((len(grid), DIM)).astype(np.float32)
    return TileTable(row, col, embedding, native, rings, np.stack([west, south, east, north], -1), "EPSG:32631", 0)


# (sensor, scene id, block, strips, lon, lat, datetime): two sensors, three scenes, one in two blocks.
PARTS = [
    ("sentinel2_rgb", "S2A_31TCJ_20240601", 0, range(0, 2), 2.0, 44.0, "2024-06-01T10:30:00Z"),
    ("sentinel2_rgb", "S2A_31TCJ_20240601", 1, range(2, 3), 2.0, 44.0, "2024-06-01T10:30:00Z"),
    ("sentinel2_rgb", "scène/été 2024", 0, range(0, 1), 3.0, 45.0, None),
    ("landsat8", "LC08 197/030", 0, range(0, 2), 2.5, 44.5, "2024-06-03T10:40:00.123456789+02:00"),
]


def metadata_for(sensor: str, scene_id: str, block: int) -> dict:
    return {"model": "xstars-tiny", "revision": "abc", "precision": "fp32", "tile": 64, "overlap": 0,
            "task": f"{sensor}/{scene_id}/{block}"}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, dict[tuple[str, str, int], TileTable]]:
    """The dataset folder and each part's tiles, by (sensor, scene id, block)."""
    folder = tmp_path_factory.mktemp("archive") / "dataset"
    written = {}
    for k, (sensor, scene_id, block, strips, lon, lat, when) in enumerate(PARTS):
        table = tiles(strips, 3, lon, lat, seed=k)
        write_part(part_path(folder, sensor, scene_id, block), table, scene_id=scene_id, sensor=sensor,
                   datetime=when, metadata=metadata_for(sensor, scene_id, block))
        written[(sensor, scene_id, block)] = table
    # What a run keeps beside the parts, and what a worker killed mid-write leaves: no reader may take them.
    (folder / "_manifest.json").write_text("{}")
    (folder / "sensor-landsat8" / ".part-LC08-00001.parquet.0123456789ab.tmp").write_bytes(b"PAR1 cut short")
    return folder, written


def all_rows(written) -> int:
    return sum(len(t.row) for t in written.values())


def test_parts_lie_one_folder_per_sensor_with_names_from_the_scene_ids(dataset):
    folder, _ = dataset
    names = sorted(str(p.relative_to(folder)) for p in folder.rglob("*.parquet"))
    assert names == sorted([
        "sensor-landsat8/" + f"part-LC08_197_030-{hashlib.sha256(b'LC08 197/030').hexdigest()[:12]}-00000.parquet",
        "sensor-sentinel2_rgb/part-S2A_31TCJ_20240601-00000.parquet",
        "sensor-sentinel2_rgb/part-S2A_31TCJ_20240601-00001.parquet",
        "sensor-sentinel2_rgb/" + f"part-sc_ne__t__2024-{hashlib.sha256('scène/été 2024'.encode()).hexdigest()[:12]}"
        "-00000.parquet",
    ])
    assert sensor_folder(folder, "landsat8") == folder / "sensor-landsat8"


def test_geopandas_reads_the_dataset_as_one_table_in_lon_lat(dataset):
    folder, written = dataset
    frame = geopandas.read_parquet(folder)
    assert len(frame) == all_rows(written)
    assert frame.crs.equals("EPSG:4326", ignore_axis_order=True) and frame.crs == "OGC:CRS84"
    assert list(frame.columns) == [c for c in COLUMNS if c != "bbox"]  # the covering is left out
    assert not isinstance(frame["sensor"].dtype, pd.CategoricalDtype)
    assert frame.groupby("sensor").size().to_dict() == {"landsat8": 6, "sentinel2_rgb": 12}
    # Geometry in lon/lat, row by row equal to the tiles' footprints.
    for (sensor, scene_id, _), table in written.items():
        part = frame[(frame["sensor"] == sensor) & (frame["scene_id"] == scene_id)]
        for row, col, ring in zip(table.row, table.col, table.rings_4326):
            got = part[(part["row"] == row) & (part["col"] == col)].geometry
            assert len(got) == 1 and got.iloc[0].equals(shapely.Polygon(ring))
            assert got.iloc[0].exterior.is_ccw
    first = frame[frame["scene_id"] == "S2A_31TCJ_20240601"].sort_values(["row", "col"])
    np.testing.assert_array_equal(np.stack(first["embedding"].to_numpy()),
                                  np.concatenate([written[("sentinel2_rgb", "S2A_31TCJ_20240601", b)].embedding
                                                  for b in (0, 1)]))
    # The bbox covering filters by area: only the tiles of the scene at 3E, 45N.
    inside = geopandas.read_parquet(folder, bbox=(2.995, 44.985, 3.035, 45.005))
    assert set(inside["scene_id"]) == {"scène/été 2024"} and len(inside) == 3


def test_pyarrow_reads_one_sensor_column_with_and_without_hive_partitioning(dataset):
    folder, written = dataset
    tables = [ds.dataset(folder, format="parquet").to_table(),
              ds.dataset(folder, format="parquet", partitioning="hive").to_table(),
              pq.read_table(folder)]
    for table in tables:
        assert table.num_rows == all_rows(written)
        assert table.schema.names == COLUMNS
        assert table.schema.field("sensor").type == pa.string()
        assert table.schema.field("embedding").type == pa.list_(pa.float32(), DIM)
        assert table.schema.field("datetime").type == pa.timestamp("us", tz="UTC")
        assert table.schema.field("native_bounds").type == pa.list_(pa.float64(), 4)
        assert set(table["sensor"].to_pylist()) == {"sentinel2_rgb", "landsat8"}
    rows = tables[0].to_pylist()
    when = {r["scene_id"]: r["datetime"] for r in rows}
    assert when["scène/été 2024"] is None
    assert when["S2A_31TCJ_20240601"].isoformat() == "2024-06-01T10:30:00+00:00"
    assert when["LC08 197/030"].isoformat() == "2024-06-03T08:40:00.123456+00:00"  # in UTC, to the microsecond
    landsat = [r for r in rows if r["sensor"] == "landsat8"]
    assert {r["crs"] for r in landsat} == {"EPSG:32631"}
    table = written[("landsat8", "LC08 197/030", 0)]
    assert sorted(tuple(r["native_bounds"]) for r in landsat) == sorted(map(tuple, table.native_bounds.tolist()))


def test_duckdb_reads_the_dataset_and_queries_embeddings_and_bboxes(dataset):
    folder, written = dataset
    parts = f"read_parquet('{folder}/**/*.parquet')"
    described = duckdb.sql(f"DESCRIBE SELECT * FROM {parts}").fetchall()
    assert [c[0] for c in described] == COLUMNS  # one sensor column: no Hive field from the folder names
    types = dict((c[0], c[1]) for c in described)
    assert types["sensor"] == "VARCHAR" and types["datetime"] == "TIMESTAMP WITH TIME ZONE"
    # Parquet has no fixed-size list type and DuckDB's reader ignores the Arrow schema in the file:
    # a list there, taken as is by the list_* functions, by array_* after a cast (module notes).
    assert types["embedding"] == "FLOAT[]"
    query = np.random.default_rng(7).standard_normal(DIM).astype(np.float32)
    literal = "[" + ", ".join(repr(float(v)) for v in query) + "]::FLOAT[]"
    got = duckdb.sql(f"SELECT scene_id, row, col, list_cosine_similarity(embedding, {literal}) AS s FROM {parts} "
                     f"WHERE sensor = 'sentinel2_rgb' ORDER BY s DESC").fetchall()
    assert len(got) == 12
    expected = {}
    for (sensor, scene_id, _), table in written.items():
        if sensor == "sentinel2_rgb":
            cosine = table.embedding @ query / np.linalg.norm(table.embedding, axis=1) / np.linalg.norm(query)
            expected.update({(scene_id, int(r), int(c)): float(s) for r, c, s in zip(table.row, table.col, cosine)})
    assert [g[:3] for g in got] == sorted(expected, key=expected.get, reverse=True)
    np.testing.assert_allclose([g[3] for g in got], sorted(expected.values(), reverse=True), rtol=1e-5)
    cast = duckdb.sql(f"SELECT max(array_cosine_similarity(embedding::FLOAT[{DIM}], {literal}::FLOAT[{DIM}])) "
                      f"FROM {parts} WHERE sensor = 'sentinel2_rgb'").fetchall()
    assert cast[0][0] == pytest.approx(max(expected.values()), rel=1e-5)
    # The bbox columns filter by area.
    boxed = duckdb.sql(f"SELECT DISTINCT scene_id FROM {parts} WHERE bbox.xmin >= 2.5 AND bbox.ymax <= 44.5 "
                       "AND bbox.xmax <= 2.531").fetchall()
    assert boxed == [("LC08 197/030",)]
    # DuckDB over the Arrow dataset sees the fixed size: FLOAT[D], array_* functions without a cast.
    arrow = ds.dataset(folder, format="parquet")  # noqa: F841 (read by name by the queries below)
    assert duckdb.sql("SELECT DISTINCT typeof(embedding) FROM arrow").fetchall() == [(f"FLOAT[{DIM}]",)]
    inner = duckdb.sql(f"SELECT array_inner_product(embedding, {literal}::FLOAT[{DIM}]) FROM arrow "
                       "WHERE scene_id = 'scène/été 2024' ORDER BY col").fetchall()
    table = written[("sentinel2_rgb", "scène/été 2024", 0)]
    np.testing.assert_allclose([v for (v,) in inner], table.embedding @ query, rtol=1e-5)


def test_each_part_carries_geoparquet_1_1_metadata_with_the_bbox_covering(dataset):
    folder, written = dataset
    table = written[("landsat8", "LC08 197/030", 0)]
    schema = pq.read_schema(part_path(folder, "landsat8", "LC08 197/030", 0))
    geo = json.loads(schema.metadata[b"geo"])
    assert geo["version"] == "1.1.0" and geo["primary_column"] == "geometry"
    column = geo["columns"]["geometry"]
    assert column["encoding"] == "WKB" and column["geometry_types"] == ["Polygon"]
    assert "crs" not in column  # GeoParquet's default: OGC:CRS84, lon/lat
    assert column["orientation"] == "counterclockwise"
    assert column["covering"] == {"bbox": {k: ["bbox", k] for k in ("xmin", "ymin", "xmax", "ymax")}}
    rings = table.rings_4326
    assert column["bbox"] == [rings[..., 0].min(), rings[..., 1].min(), rings[..., 0].max(), rings[..., 1].max()]
    assert schema.field("bbox").type == pa.struct([pa.field(k, pa.float64(), nullable=False)
                                                   for k in ("xmin", "ymin", "xmax", "ymax")])


def test_read_part_metadata_returns_the_metadata_and_refuses_other_files(dataset, tmp_path):
    folder, _ = dataset
    path = part_path(folder, "sentinel2_rgb", "S2A_31TCJ_20240601", 1)
    assert read_part_metadata(path) == metadata_for("sentinel2_rgb", "S2A_31TCJ_20240601", 1)
    text = tmp_path / "notes.parquet"
    text.write_text("not parquet at all")
    plain = tmp_path / "plain.parquet"
    pq.write_table(pa.table({"a": [1, 2]}), plain)
    empty = tmp_path / "empty.parquet"
    empty.write_bytes(b"")
    truncated = tmp_path / "truncated.parquet"
    truncated.write_bytes(path.read_bytes()[:-100])
    for bad in (text, plain, empty, truncated):
        with pytest.raises(InvalidInputError, match="is not a part of a dataset") as info:
            read_part_metadata(bad)
        assert info.value.field == "dataset" and str(bad) in str(info.value)
    with pytest.raises(InvalidInputError, match="no 'geo' and no 'xstars' metadata"):
        read_part_metadata(plain)
    with pytest.raises(FileNotFoundError):
        read_part_metadata(tmp_path / "missing.parquet")


def test_the_same_part_written_twice_has_the_same_bytes_and_record(tmp_path):
    table = tiles(range(0, 2), 3, 2.0, 44.0, seed=1)
    records, contents = [], []
    for k, metadata in enumerate([{"a": 1, "b": [1, 2]}, {"b": [1, 2], "a": 1}]):  # key order does not matter
        path = tmp_path / f"try{k}" / "part.parquet"
        records.append(write_part(path, table, scene_id="s", sensor="landsat8", datetime="2024-06-01T00:00:00Z",
                                  metadata=metadata))
        contents.append(path.read_bytes())
    assert contents[0] == contents[1]
    assert records[0] == records[1]
    assert records[0].sha256 == hashlib.sha256(contents[0]).hexdigest() and records[0].size == len(contents[0])


def test_a_write_failing_mid_way_leaves_no_file_and_keeps_a_previous_part(tmp_path, monkeypatch):
    table = tiles(range(0, 200), 3, 2.0, 44.0, seed=1)  # more than a file buffer: bytes reach the disk
    path = part_path(tmp_path / "dataset", "landsat8", "s", 0)
    write_it = pq.ParquetWriter.write_table
    wrote = []

    def fail_after_the_rows(self, rows, *args, **kwargs):
        write_it(self, rows, *args, **kwargs)  # the rows are in the temporary file, the footer not yet
        wrote.append(sum(p.stat().st_size for p in path.parent.iterdir()))
        raise RuntimeError("worker lost")

    monkeypatch.setattr(pq.ParquetWriter, "write_table", fail_after_the_rows)
    with pytest.raises(RuntimeError, match="worker lost"):
        write_part(path, table, scene_id="s", sensor="landsat8", datetime=None, metadata={})
    assert wrote and wrote[0] > 0  # it failed with bytes on disk
    assert list(path.parent.iterdir()) == []
    monkeypatch.undo()
    record = write_part(path, table, scene_id="s", sensor="landsat8", datetime=None, metadata={})
    monkeypatch.setattr(pq.ParquetWriter, "write_table", fail_after_the_rows)
    with pytest.raises(RuntimeError, match="worker lost"):
        write_part(path, replace(table, embedding=table.embedding + 1), scene_id="s", sensor="landsat8",
                   datetime=None, metadata={})
    assert list(path.parent.iterdir()) == [path]
    assert hashlib.sha256(path.read_bytes()).hexdigest() == record.sha256


def test_a_file_size_limit_mid_write_names_the_part_and_leaves_nothing(tmp_path):
    # A real failing write: past RLIMIT_FSIZE the OS refuses with EFBIG, as a full disk does with ENOSPC.
    path = part_path(tmp_path / "dataset", "landsat8", "big scene", 0)
    script = f"""
import resource, sys
from types import SimpleNamespace
import numpy as np
from xstars_models.archive.parts import write_part
from xstars_models.errors import OutputWriteError
n = 64
ring = np.array([[0, 0], [1, 0], [1, 1], [0, 1], [0, 0]], float)
table = SimpleNamespace(row=np.arange(n), col=np.zeros(n, int), embedding=np.random.default_rng(0).random((n, 256)),
                        native_bounds=np.zeros((n, 4)), rings_4326=np.repeat(ring[None], n, 0),
                        bbox_4326=np.repeat([[0.0, 0.0, 1.0, 1.0]], n, 0), crs="EPSG:32631", skipped=0)
resource.setrlimit(resource.RLIMIT_FSIZE, (16384, 16384))  # the part is about 64 KiB
try:
    write_part({str(path)!r}, table, scene_id="big scene", sensor="landsat8", datetime=None, metadata={{}})
except OutputWriteError as err:
    print(err.errno, err.field, err)
    sys.exit(3)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    code, field, message = proc.stdout.strip().split(" ", 2)
    assert (int(code), field) == (errno.EFBIG, "out")
    assert message.startswith("File too large (EFBIG) while writing") and str(path) in message
    assert list(path.parent.iterdir()) == []


def test_part_paths_are_deterministic_and_safe_for_any_scene_id(tmp_path):
    ids = ["S2B_MSIL2A_20240601T103629_N0510_R008_T31TCJ", "a/b", "../../etc/passwd", "a b", "a_b", "日本語",
           "x" * 300, "a_b-" + hashlib.sha256(b"a b").hexdigest()[:12], "a\udcff"]
    names = [part_path(tmp_path, "sentinel2", i, 3).name for i in ids]
    assert names == [part_path(tmp_path, "sentinel2", i, 3).name for i in ids]  # deterministic
    assert len(set(names)) == len(ids)  # never one name for two ids
    for scene_id, name in zip(ids, names):
        path = part_path(tmp_path, "sentinel2", scene_id, 3)
        assert path.parent == tmp_path / "sensor-sentinel2" and name.endswith("-00003.parquet")
        assert name.isascii() and len(name) < 150 and all(c.isalnum() or c in "._-" for c in name)
    assert names[0] == "part-S2B_MSIL2A_20240601T103629_N0510_R008_T31TCJ-00003.parquet"  # kept as is
    assert names[3] == f"part-a_b-{hashlib.sha256(b'a b').hexdigest()[:12]}-00003.parquet"
    assert names[4] == "part-a_b-00003.parquet"
    assert safe_id("scene.v2-final_1") == "scene.v2-final_1"
    assert part_path(tmp_path, "landsat8", "a", 123456).name == "part-a-123456.parquet"


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"sensor": "../up"}, "sensor"), ({"sensor": ""}, "sensor"), ({"sensor": "a/b"}, "sensor"),
    ({"scene_id": ""}, "scene_id"), ({"block": -1}, "block"),
])
def test_part_path_refuses_bad_names_by_field(tmp_path, kwargs, field):
    with pytest.raises(InvalidOptionError) as info:
        part_path(**{"dataset": tmp_path, "sensor": "landsat8", "scene_id": "s", "block": 0, **kwargs})
    assert info.value.field == field


def _nan_embedding(t: TileTable) -> TileTable:
    embedding = t.embedding.copy()
    embedding[1, 2] = np.nan
    return replace(t, embedding=embedding)


def _open_ring(t: TileTable) -> TileTable:
    rings = t.rings_4326.copy()
    rings[:, -1] += 0.001
    return replace(t, rings_4326=rings)


@pytest.mark.parametrize(("broken", "match"), [
    (_nan_embedding, r"embedding has NaN or infinite values in 1 of 6 rows"),
    (_open_ring, r"rings must be closed"),
    (lambda t: replace(t, embedding=t.embedding[:4]), r"embedding must be 6 x D"),
    (lambda t: replace(t, col=t.col[:2]), r"row and col must be two arrays of one length"),
    (lambda t: replace(t, native_bounds=t.native_bounds[:, :3]), r"native_bounds must be 6 x 4"),
    (lambda t: replace(t, row=t.row - 5), r"row must hold tile indices"),
    (lambda t: replace(t, crs=""), r"crs must be the scene's CRS"),
])
def test_tile_tables_that_cannot_be_written_are_refused_before_any_file(tmp_path, broken, match):
    path = tmp_path / "dataset" / "part.parquet"
    with pytest.raises(InvalidInputError, match=match) as info:
        write_part(path, broken(tiles(range(2), 3, 2.0, 44.0, seed=0)), scene_id="s", sensor="landsat8",
                   datetime=None, metadata={})
    assert info.value.field == "table"
    assert not path.parent.exists()


def test_datetimes_are_stored_in_utc_and_bad_ones_and_metadata_refused_by_field(tmp_path):
    table = tiles(range(1), 1, 2.0, 44.0, seed=0)
    path = tmp_path / "part.parquet"
    for given, stored in [("2024-06-01T12:00:00+02:00", "2024-06-01T10:00:00+00:00"),
                          ("2024-06-01T12:00:00", "2024-06-01T12:00:00+00:00"),  # no offset: UTC
                          ("2024-06-01 12:00:00.5z", "2024-06-01T12:00:00.500000+00:00")]:
        write_part(path, table, scene_id="s", sensor="landsat8", datetime=given, metadata={})
        assert pq.read_table(path)["datetime"][0].as_py().isoformat() == stored
    for bad in ("June 1st", "2024-13-01T00:00:00Z", "2024-06-01"):
        with pytest.raises(InvalidInputError, match="datetime") as info:
            write_part(path, table, scene_id="s", sensor="landsat8", datetime=bad, metadata={})
        assert info.value.field == "datetime"
    for bad_metadata in ({"x": object()}, {"x": float("nan")}):
        with pytest.raises(InvalidInputError, match="metadata cannot be stored as JSON") as info:
            write_part(path, table, scene_id="s", sensor="landsat8", datetime=None, metadata=bad_metadata)
        assert info.value.field == "metadata"


def test_a_part_without_rows_is_written_and_read(tmp_path):
    empty = tiles(range(0), 3, 2.0, 44.0, seed=0)
    path = part_path(tmp_path, "landsat8", "all nodata", 0)
    write_part(path, empty, scene_id="all nodata", sensor="landsat8", datetime=None, metadata={"rows": 0})
    assert read_part_metadata(path) == {"rows": 0}
    frame = geopandas.read_parquet(tmp_path)
    assert len(frame) == 0 and frame.crs == "OGC:CRS84"
    assert "bbox" not in json.loads(pq.read_schema(path).metadata[b"geo"])["columns"]["geometry"]


def test_clockwise_rings_are_written_counter_clockwise(tmp_path):
    table = tiles(range(1), 2, 2.0, 44.0, seed=0)
    clockwise = replace(table, rings_4326=table.rings_4326[:, ::-1].copy())
    path = tmp_path / "part.parquet"
    write_part(path, clockwise, scene_id="s", sensor="landsat8", datetime=None, metadata={})
    frame = geopandas.read_parquet(path)
    assert all(g.exterior.is_ccw for g in frame.geometry)
    assert [g.equals(shapely.Polygon(r)) for g, r in zip(frame.geometry, table.rings_4326)] == [True, True]
