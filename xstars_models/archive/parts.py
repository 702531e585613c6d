"""One part file of a collection's GeoParquet dataset: the rows of one task (a scene, or a block of
a scene's tile strips), written atomically and read back by every reader users have.

Layout
    ``DATASET/sensor-<sensor>/part-<scene id>-<block>.parquet``: one folder per sensor, and a
    ``sensor`` column in every part. The folder is deliberately *not* named ``sensor=<sensor>``
    (Hive style): readers then infer a second ``sensor`` field from the path, and no column type
    suits them all (measured with pyarrow 26, geopandas 1.2, DuckDB 2.0):
    ``pyarrow.parquet.read_table(dir)`` and ``geopandas.read_parquet(dir)`` infer
    ``dictionary<string>`` and refuse a ``string`` column ("Unable to merge: Field sensor has
    incompatible types"), while ``pyarrow.dataset.dataset(dir, partitioning="hive")`` infers
    ``string`` and refuses a dictionary column; a part without the column lacks ``sensor`` under
    ``pyarrow.dataset.dataset(dir)``. With a folder name no reader parses, all of them (and DuckDB's
    ``read_parquet('dir/**/*.parquet')``, Hive detection on or off) read the dataset as one table
    with one plain string ``sensor`` column. Files whose names start with ``.`` or ``_``
    (temporary files, ``_manifest.json``) are skipped by pyarrow and geopandas, and match no
    ``*.parquet`` glob.

Columns (one row per embedded tile)
    ``scene_id`` string; ``row``, ``col`` int32 (the tile's index in the scene's tile grid);
    ``geometry`` WKB polygon, lon/lat degrees (GeoParquet's default CRS, OGC:CRS84: EPSG:4326 with
    longitude first); ``bbox`` struct<xmin, ymin, xmax, ymax> float64 degrees, the GeoParquet 1.1
    ``covering`` of ``geometry`` (row-group statistics on it let readers skip by area); ``crs``
    string (the scene's CRS) and ``native_bounds`` fixed_size_list<float64>[4] (minx, miny, maxx,
    maxy in that CRS, its units), from which the pixel-exact footprint is recoverable;
    ``datetime`` timestamp[us, UTC], null when the scene has none; ``sensor`` string;
    ``embedding`` fixed_size_list<float32>[D]. Every column but ``datetime`` is non-null.

    pyarrow, geopandas and DuckDB over Arrow (``duckdb.sql("... FROM arrow_dataset")``) read
    ``embedding`` as a fixed-size list (DuckDB: ``FLOAT[D]``, so ``array_cosine_similarity`` and
    ``array_inner_product`` take it as is). Parquet itself has no fixed-size list type, and
    DuckDB's own ``read_parquet`` (up to 2.0 at least) ignores the Arrow schema stored in the file:
    there the column is ``FLOAT[]``; ``list_cosine_similarity``/``list_inner_product`` take it as
    is, the ``array_*`` functions after ``embedding::FLOAT[D]``.

Metadata (the file footer)
    ``geo``: GeoParquet 1.1.0 (``crs`` left out: OGC:CRS84; ``geometry_types`` ["Polygon"];
    ``bbox`` of this part's rows; ``orientation`` counterclockwise; ``covering``). ``xstars``: the
    caller's ``metadata`` as JSON (model, revision, weights sha256, settings with the precision
    asked for, ``precision``: what ran, e.g. ``"bf16"`` for ``"auto"``, task...), readable
    without the rows through :func:`read_part_metadata`. Nothing in a part depends on when or
    where it was written: the same rows give the same bytes, so a task that runs twice writes
    the same file.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np

from ..config import FileRecord
from ..errors import InvalidInputError, InvalidOptionError, InvalidTypeError
from ..scenes.failures import write_error
from ..scenes.geoparquet import bbox_struct, geo_metadata, import_pyarrow, polygon_wkb, union_bbox
from ..serialization import atomic_open

if TYPE_CHECKING:
    from ..scenes.tiles import TileTable

__all__ = ["part_path", "read_part_metadata", "safe_id", "sensor_folder", "write_part"]

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
# What safe_id appends; an id that already ends like this is hashed too, so no kept id can equal
# another id's hashed form.
_HASH_SUFFIX = re.compile(r"-[0-9a-f]{12}$")
_MAX_KEPT = 96  # characters of the id kept in a file name (names stay far below 255 bytes)
_RFC3339 = re.compile(r"(\d{4}-\d{2}-\d{2})[Tt ](\d{2}:\d{2}:\d{2})(?:\.(\d+))?([Zz]|[+-]\d{2}:\d{2})?")
_DICTIONARY_COLUMNS = ["scene_id", "crs", "sensor"]  # few distinct values; floats would only waste the try


def safe_id(scene_id: str) -> str:
    """``scene_id`` as part of a file name: ASCII letters, digits, ``-``, ``_`` and ``.`` kept,
    anything else (``/``, spaces, other scripts) replaced by ``_``; when anything was replaced,
    or the id was longer than 96 characters, the first 12 hex digits of its sha256 are appended
    (``-<hash>``), so two ids never give one name.

    Raises:
        InvalidOptionError: (``field="scene_id"``) an empty id.
    """
    kept = _UNSAFE.sub("_", _checked_scene_id(scene_id))
    if kept == scene_id and len(kept) <= _MAX_KEPT and not _HASH_SUFFIX.search(kept):
        return kept
    # surrogatepass: ids made from undecodable file names (os.fsdecode) still hash.
    digest = hashlib.sha256(scene_id.encode("utf-8", "surrogatepass")).hexdigest()[:12]
    return f"{kept[:_MAX_KEPT]}-{digest}"


def sensor_folder(dataset: Path, sensor: str) -> Path:
    """The folder of ``sensor``'s parts in ``dataset`` (``sensor-<sensor>``; see the module's
    notes on why not ``sensor=<sensor>``).

    Raises:
        InvalidOptionError: (``field="sensor"``) a name other than letters, digits, ``_``, ``-``.
    """
    return Path(dataset) / f"sensor-{_checked_sensor(sensor)}"


def part_path(dataset: Path, sensor: str, scene_id: str, block: int) -> Path:
    """Where block ``block`` (0, 1, ...) of scene ``scene_id``'s rows for ``sensor`` lives:
    ``dataset/sensor-<sensor>/part-<safe_id(scene_id)>-<block:05d>.parquet``. The same arguments
    always give the same path, and different ones different paths.

    Raises:
        InvalidOptionError: an empty ``scene_id``, a negative ``block``, a ``sensor`` name other
            than letters, digits, ``_`` and ``-`` (``field``: the argument).
    """
    if isinstance(block, bool) or not isinstance(block, (int, np.integer)):
        raise InvalidTypeError(f"block must be an integer, got {block!r}.", field="block")
    if block < 0:
        raise InvalidOptionError(f"block must be 0 or more, got {block}.", field="block")
    return sensor_folder(dataset, sensor) / f"part-{safe_id(scene_id)}-{int(block):05d}.parquet"


def write_part(
    path: Path, table: TileTable, *, scene_id: str, sensor: str, datetime: str | None, metadata: dict[str, Any]
) -> FileRecord:
    """Write ``table``'s rows to the part file ``path`` in one step (a temporary file beside it,
    renamed when complete): readers see no file or the whole part, never a partial one, and a
    failure leaves nothing behind. See the module's notes for the columns.

    Args:
        path: the part file (:func:`part_path`); its folder is created.
        table: the embedded tiles (:class:`~xstars_models.scenes.tiles.TileTable`), possibly none.
        scene_id: the ``scene_id`` of every row.
        sensor: the ``sensor`` of every row.
        datetime: the scene's acquisition time, ISO 8601 / RFC 3339 (``2024-06-01T10:30:00Z``);
            one without a UTC offset is taken as UTC; stored in UTC to the microsecond. ``None``:
            null.
        metadata: JSON-serialisable, stored under the footer's ``xstars`` key (keys sorted).

    Returns:
        The sha256 and size in bytes of the file written.

    Raises:
        InvalidInputError: ``table`` with inconsistent shapes, non-finite values or open
            footprint rings (``field="table"``); ``datetime`` not ISO 8601 (``"datetime"``);
            ``metadata`` not JSON-serialisable (``"metadata"``).
        InvalidOptionError: an empty ``scene_id`` or a bad ``sensor`` name.
        OutputWriteError: the write failed (a full disk, a quota...; ``field="out"``), naming
            the cause and ``path``; nothing is left at ``path``.
    """
    pa, pq = import_pyarrow()
    path = Path(path)
    scene_id, sensor = _checked_scene_id(scene_id), _checked_sensor(sensor)
    when = _utc_datetime(datetime)
    footer = _metadata_json(metadata)
    columns = _columns(table)
    n, dim = columns["embedding"].shape
    bbox = columns["bbox"]

    schema = pa.schema(
        [
            pa.field("scene_id", pa.string(), nullable=False),
            pa.field("row", pa.int32(), nullable=False),
            pa.field("col", pa.int32(), nullable=False),
            pa.field("geometry", pa.binary(), nullable=False),
            pa.field("bbox", bbox_struct(), nullable=False),
            pa.field("crs", pa.string(), nullable=False),
            pa.field("native_bounds", pa.list_(pa.float64(), 4), nullable=False),
            pa.field("datetime", pa.timestamp("us", tz="UTC")),
            pa.field("sensor", pa.string(), nullable=False),
            pa.field("embedding", pa.list_(pa.float32(), dim), nullable=False),
        ],
        metadata={b"geo": json.dumps(geo_metadata(union_bbox(bbox))).encode(), b"xstars": footer},
    )
    arrays = [
        pa.array([scene_id] * n, pa.string()),
        pa.array(columns["row"], pa.int32()),
        pa.array(columns["col"], pa.int32()),
        pa.array([polygon_wkb(ring) for ring in columns["rings"]], pa.binary()),
        pa.StructArray.from_arrays([pa.array(bbox[:, k]) for k in range(4)], fields=list(schema.field("bbox").type)),
        pa.array([columns["crs"]] * n, pa.string()),
        pa.FixedSizeListArray.from_arrays(pa.array(columns["native_bounds"].reshape(-1)), 4),
        pa.array([when] * n, pa.timestamp("us", tz="UTC")),
        pa.array([sensor] * n, pa.string()),
        pa.FixedSizeListArray.from_arrays(pa.array(columns["embedding"].reshape(-1)), dim),
    ]
    rows = pa.Table.from_arrays(arrays, schema=schema)
    try:
        with atomic_open(path) as handle:
            sink = _HashingFile(handle)
            with pq.ParquetWriter(sink, schema, compression="zstd", use_dictionary=_DICTIONARY_COLUMNS) as writer:
                writer.write_table(rows)
    except OSError as err:
        raise write_error(err, path, needed=rows.nbytes) from err
    return FileRecord(sink.sha256.hexdigest(), sink.size)


def read_part_metadata(path: Path) -> dict[str, Any]:
    """The ``xstars`` metadata of the part file ``path`` (what :func:`write_part` was given), from
    its footer only: the rows are not read.

    Raises:
        InvalidInputError: (``field="dataset"``) ``path`` is no Parquet file, or one without
            GeoParquet and ``xstars`` metadata; the message names it.
        FileNotFoundError: there is no file at ``path``.
    """
    pa, pq = import_pyarrow()
    path = Path(path)
    try:
        schema = pq.read_schema(path)
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        raise
    except (pa.ArrowException, OSError) as err:  # not Parquet, truncated, damaged footer
        raise InvalidInputError(f"{path} is not a part of a dataset: not a readable Parquet file ({err}).",
                                field="dataset") from None
    found = schema.metadata or {}
    if b"geo" not in found or b"xstars" not in found:
        raise InvalidInputError(
            f"{path} is not a part of a dataset: its Parquet footer has no "
            f"{' and no '.join(repr(k.decode()) for k in (b'geo', b'xstars') if k not in found)} metadata.",
            field="dataset",
        )
    try:
        metadata = json.loads(found[b"xstars"])
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InvalidInputError(f"{path} is not a part of a dataset: its 'xstars' metadata is not JSON ({err}).",
                                field="dataset") from None
    if not isinstance(metadata, dict):
        raise InvalidInputError(
            f"{path} is not a part of a dataset: its 'xstars' metadata is a {type(metadata).__name__}, not an object.",
            field="dataset",
        )
    return metadata


class _HashingFile:
    """A write-only file handle that hashes and counts what passes through it, so the part's
    sha256 and size come from the very bytes written, without reading the file back."""

    def __init__(self, handle: BinaryIO) -> None:
        self._handle = handle
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data: Any) -> int:
        view = memoryview(data)
        self.sha256.update(view)
        self.size += view.nbytes
        return self._handle.write(view)

    @property
    def closed(self) -> bool:  # pyarrow checks it before writing
        return self._handle.closed


def _checked_scene_id(scene_id: str) -> str:
    if not isinstance(scene_id, str):
        raise InvalidTypeError(f"scene_id must be a string, got {type(scene_id).__name__}.", field="scene_id")
    if not scene_id:
        raise InvalidOptionError("scene_id is empty: a part needs the id of the scene its rows come from.",
                                 field="scene_id")
    return scene_id


def _checked_sensor(sensor: str) -> str:
    # The rule of SensorSpec names; it also keeps the folder name one plain path segment.
    if not isinstance(sensor, str):
        raise InvalidTypeError(f"sensor must be a sensor name (a string), got {type(sensor).__name__}.", field="sensor")
    if not sensor or not sensor.replace("_", "").replace("-", "").isalnum():
        raise InvalidOptionError(f"sensor {sensor!r} must be non-empty and use letters, digits, '_' or '-'.",
                                 field="sensor")
    return sensor


def _utc_datetime(text: str | None) -> _dt.datetime | None:
    if text is None:
        return None
    match = _RFC3339.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        raise InvalidInputError(
            f"datetime {text!r} is not an ISO 8601 date and time such as '2024-06-01T10:30:00Z'.", field="datetime"
        )
    day, clock, fraction, zone = match.groups()
    # Python 3.10's fromisoformat takes neither 'Z' nor other than 3 or 6 fractional digits.
    micros = ((fraction or "") + "000000")[:6]
    offset = "+00:00" if zone is None or zone in "Zz" else zone
    try:
        parsed = _dt.datetime.fromisoformat(f"{day}T{clock}.{micros}{offset}")
    except ValueError as err:  # a 13th month, a 25th hour
        raise InvalidInputError(f"datetime {text!r} is not a valid date and time ({err}).", field="datetime") from None
    return parsed.astimezone(_dt.timezone.utc)


def _metadata_json(metadata: dict[str, Any]) -> bytes:
    if not isinstance(metadata, dict):
        raise InvalidTypeError(f"metadata must be a dict, got {type(metadata).__name__}.", field="metadata")
    try:
        return json.dumps(metadata, sort_keys=True, allow_nan=False).encode()
    except (TypeError, ValueError) as err:
        raise InvalidInputError(f"metadata cannot be stored as JSON: {err}.", field="metadata") from None


def _columns(table: TileTable) -> dict[str, Any]:
    """``table``'s arrays checked and converted to the columns' types; ``bbox`` is widened to
    contain the ring it covers where it did not (the covering must contain the geometry)."""

    def refuse(what: str) -> InvalidInputError:
        return InvalidInputError(f"the tile table cannot be written: {what}.", field="table")

    row, col = np.asarray(table.row), np.asarray(table.col)
    n = len(row) if row.ndim == 1 else -1
    if n < 0 or col.shape != (n,):
        raise refuse(f"row and col must be two arrays of one length, got shapes {row.shape} and {col.shape}")
    for name, values in (("row", row), ("col", col)):
        if n and (values.dtype.kind not in "iu" or values.min() < 0 or values.max() > np.iinfo(np.int32).max):
            raise refuse(f"{name} must hold tile indices (integers from 0 to 2**31 - 1), got {values.dtype}")
    embedding = np.asarray(table.embedding, np.float32)
    if embedding.ndim != 2 or embedding.shape[0] != n or embedding.shape[1] < 1:
        raise refuse(f"embedding must be {n} x D (D >= 1), got shape {embedding.shape}")
    shapes = {"native_bounds": (n, 4), "bbox_4326": (n, 4)}
    arrays = {name: np.asarray(getattr(table, name), np.float64) for name in (*shapes, "rings_4326")}
    for name, shape in shapes.items():
        if arrays[name].shape != shape:
            raise refuse(f"{name} must be {shape[0]} x {shape[1]}, got shape {arrays[name].shape}")
    rings = arrays["rings_4326"]
    if rings.ndim != 3 or rings.shape[0] != n or rings.shape[1] < 4 or rings.shape[2] != 2:
        raise refuse(f"rings_4326 must be {n} x k x 2 (k >= 4 corners, closed), got shape {rings.shape}")
    checked: list[tuple[str, np.ndarray]] = [("embedding", embedding), *arrays.items()]
    for name, values in checked:
        bad = int((~np.isfinite(values.reshape(n, -1))).any(axis=1).sum()) if n else 0
        if bad:
            raise refuse(f"{name} has NaN or infinite values in {bad} of {n} rows (tiles left out for nodata are "
                         "no rows)")
    if n and not np.array_equal(rings[:, 0], rings[:, -1]):
        raise refuse("footprint rings must be closed (last corner = first)")
    if not isinstance(table.crs, str) or not table.crs:
        raise refuse(f"crs must be the scene's CRS as a non-empty string, got {table.crs!r}")
    # Shoelace: GeoParquet's "counterclockwise" must hold for every ring; reverse those that are not.
    x, y = rings[..., 0], rings[..., 1]
    clockwise = (x[:, :-1] * y[:, 1:] - x[:, 1:] * y[:, :-1]).sum(axis=1) < 0
    rings = np.where(clockwise[:, None, None], rings[:, ::-1], rings)
    bbox = arrays["bbox_4326"]
    bbox = np.concatenate([np.minimum(bbox[:, :2], rings.min(axis=1)), np.maximum(bbox[:, 2:], rings.max(axis=1))],
                          axis=1) if n else bbox
    return {"row": row.astype(np.int32), "col": col.astype(np.int32), "embedding": np.ascontiguousarray(embedding),
            "native_bounds": arrays["native_bounds"], "rings": rings, "bbox": bbox, "crs": table.crs}
