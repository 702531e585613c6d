"""Per-tile vectors as GeoParquet (https://geoparquet.org, version 1.1.0), what
``embed_scene(output="cls")`` writes: one row per tile, one row group per strip of tiles, so
memory does not grow with the scene. The geometry is encoded by shapely (ISO WKB, little-endian).

Columns
    ``tile`` int64 (row-major index in the tiling); ``row``, ``col`` int32 (the tile's place in
    the tiling); ``valid`` bool (False: not embedded for nodata, ``embedding`` all NaN);
    ``nodata_fraction`` float32 (0-1 of the tile's pixels); ``window`` fixed_size_list<int32>[4]:
    row, col, height, width of the input pixels the tile covers, in the whole input (area of
    interest included) -- exact when the input is read at its own pixel size; when it is resampled
    (``resample_scale`` in the metadata), the input pixels the tile touches, rounded outward (the
    tile's exact extent is its ``geometry``); ``embedding`` fixed_size_list<float32>[D];
    ``geometry`` WKB polygon, the tile's footprint in the scene's CRS (its units), counter-clockwise
    on a north-up map; ``bbox`` struct<xmin, ymin, xmax, ymax> float64, the footprint's bounding
    box in the same CRS: the GeoParquet 1.1 ``covering`` of ``geometry``, whose row-group
    statistics let readers skip row groups by area. Every column is non-null.

    Edge tiles are shifted inward: along each axis tiles start every ``tile - overlap`` pixels and
    the last one ends at the scene's edge, so it may overlap its neighbour by more than ``overlap``
    (by up to the tile less one patch), and every tile is full size (unless the scene is smaller
    than a tile); ``window`` and ``geometry`` say where each one is.

    pyarrow and geopandas read ``embedding`` as a fixed-size list (geopandas: one float32 array of
    D values per row), and so does DuckDB over Arrow (``duckdb.sql("SELECT ... FROM table")`` on a
    ``pyarrow.parquet.read_table`` result): ``FLOAT[D]``, which ``array_cosine_similarity`` and
    ``array_inner_product`` take as is. Parquet itself has no fixed-size list type and DuckDB's
    own ``read_parquet`` (2.0 at least) ignores the Arrow schema stored in the file: there the
    column is ``FLOAT[]`` (``window``: ``INTEGER[]``); ``list_cosine_similarity`` takes it as is,
    the ``array_*`` functions after ``embedding::FLOAT[D]``.

Metadata (the file footer)
    ``geo``: GeoParquet 1.1.0, ``primary_column`` ``geometry`` with ``encoding`` WKB,
    ``geometry_types`` ["Polygon"], ``crs`` the scene's CRS as PROJJSON (null for a scene without
    georeferencing, whose footprints are in input pixels), ``bbox`` of the whole tiling,
    ``orientation`` counterclockwise and ``covering`` naming the ``bbox`` column. ``xstars``: the
    writer's ``metadata`` as JSON (model id, revision and weights sha256, sensor, tiling in pixels
    at the sensor's GSD...; see :func:`xstars_models.scenes.embed_scene`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any, BinaryIO

import numpy as np

from ..errors import MissingExtraError

__all__ = [
    "GEOPARQUET_VERSION", "TileStrip", "import_pyarrow", "polygon_wkb", "polygons_wkb", "write_geoparquet",
]

GEOPARQUET_VERSION = "1.1.0"
BBOX_FIELDS = ("xmin", "ymin", "xmax", "ymax")
# geo_metadata's crs for geometry in longitude and latitude (GeoParquet's default CRS).
LONLAT = "OGC:CRS84"

# One strip of tiles: index, tile row, tile column, valid, nodata fraction, input-pixel window
# (row, col, height, width; n x 4 integers), CLS vectors (n x D), footprint rings (n x 5 x 2).
TileStrip = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def import_pyarrow() -> tuple[Any, Any]:
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise MissingExtraError(
            "Per-tile vectors are written as GeoParquet with pyarrow, which is not installed: "
            "pip install 'xstars-models[geo]'."
        ) from None
    return pyarrow, pyarrow.parquet


def _import_shapely() -> Any:
    try:
        import shapely
    except ImportError:
        raise MissingExtraError(
            "GeoParquet footprints are encoded with shapely, which is not installed: pip install 'xstars-models[geo]'."
        ) from None
    return shapely


def polygons_wkb(rings: np.ndarray) -> np.ndarray:
    """One-ring polygons (closed rings, n x k x 2) as little-endian ISO WKB: an object array of n
    ``bytes``, which ``pyarrow.array(..., pyarrow.binary())`` takes as is."""
    shapely = _import_shapely()
    rings = np.asarray(rings, np.float64)
    if len(rings) == 0:
        return np.empty(0, object)
    return shapely.to_wkb(shapely.polygons(rings), byte_order=1, flavor="iso", output_dimension=2)


def polygon_wkb(ring: np.ndarray) -> bytes:
    """A one-ring polygon (closed ring, k x 2) as little-endian ISO WKB (see :func:`polygons_wkb`)."""
    return bytes(polygons_wkb(np.asarray(ring)[None])[0])


def bbox_struct() -> Any:
    """The type of the GeoParquet 1.1 ``bbox`` covering column: a struct of float64 ``xmin``,
    ``ymin``, ``xmax``, ``ymax``."""
    pa, _ = import_pyarrow()
    return pa.struct([pa.field(k, pa.float64(), nullable=False) for k in BBOX_FIELDS])


def union_bbox(boxes: np.ndarray) -> list[float] | None:
    """The (xmin, ymin, xmax, ymax) covering every row of ``boxes`` (n x 4, the same order);
    ``None`` for no rows."""
    if not len(boxes):
        return None
    return [float(boxes[:, 0].min()), float(boxes[:, 1].min()), float(boxes[:, 2].max()), float(boxes[:, 3].max())]


def geo_metadata(bbox: list[float] | None, crs: Any = LONLAT) -> dict[str, Any]:
    """The GeoParquet 1.1 ``geo`` metadata of a ``geometry`` column of WKB polygons
    (counterclockwise) with a ``bbox`` covering column. ``bbox``: the column's (xmin, ymin, xmax,
    ymax), ``None`` (left out) for no rows. ``crs``: a rasterio CRS (written as PROJJSON),
    ``None`` (null: a scene without georeferencing, footprints in input pixels), or
    :data:`LONLAT` (left out: GeoParquet's default, OGC:CRS84, longitude and latitude in degrees
    on WGS 84)."""
    column: dict[str, Any] = {"encoding": "WKB", "geometry_types": ["Polygon"]}
    if not (isinstance(crs, str) and crs == LONLAT):
        column["crs"] = crs.to_dict(projjson=True) if crs is not None else None
    if bbox is not None:
        column["bbox"] = bbox
    # Rings are counter-clockwise on a north-up map (RFC 7946's exterior orientation).
    column["orientation"] = "counterclockwise"
    column["covering"] = {"bbox": {k: ["bbox", k] for k in BBOX_FIELDS}}
    return {"version": GEOPARQUET_VERSION, "primary_column": "geometry", "columns": {"geometry": column}}


def write_geoparquet(
    handle: BinaryIO, strips: Iterator[TileStrip], dim: int, crs: Any, bbox: list[float], metadata: dict[str, Any]
) -> None:
    """Stream ``strips`` into a GeoParquet file on ``handle`` (layout: the module documentation);
    ``bbox`` is the whole tiling's (minx, miny, maxx, maxy) in ``crs`` units; ``metadata`` goes
    under the ``xstars`` key of the file's key-value metadata."""
    pa, pq = import_pyarrow()
    _import_shapely()  # before the file is begun
    schema = pa.schema(
        [
            pa.field("tile", pa.int64(), nullable=False),
            pa.field("row", pa.int32(), nullable=False),
            pa.field("col", pa.int32(), nullable=False),
            pa.field("valid", pa.bool_(), nullable=False),
            pa.field("nodata_fraction", pa.float32(), nullable=False),
            pa.field("window", pa.list_(pa.int32(), 4), nullable=False),
            pa.field("embedding", pa.list_(pa.float32(), dim), nullable=False),
            pa.field("geometry", pa.binary(), nullable=False),
            pa.field("bbox", bbox_struct(), nullable=False),
        ],
        metadata={
            b"geo": json.dumps(geo_metadata(bbox, crs)).encode(),
            b"xstars": json.dumps(metadata).encode(),
        },
    )
    with pq.ParquetWriter(handle, schema, compression="zstd") as writer:
        for tile, row, col, valid, nodata_fraction, window, vectors, rings in strips:
            rings = np.asarray(rings, np.float64)
            low, high = rings.min(axis=1), rings.max(axis=1)  # n x 2 each
            corners = (low[:, 0], low[:, 1], high[:, 0], high[:, 1])
            table = pa.Table.from_arrays(
                [
                    pa.array(tile, pa.int64()),
                    pa.array(row, pa.int32()),
                    pa.array(col, pa.int32()),
                    pa.array(valid, pa.bool_()),
                    pa.array(nodata_fraction, pa.float32()),
                    pa.FixedSizeListArray.from_arrays(pa.array(np.asarray(window, np.int32).reshape(-1)), 4),
                    pa.FixedSizeListArray.from_arrays(
                        pa.array(np.ascontiguousarray(vectors, np.float32).reshape(-1)), dim
                    ),
                    pa.array(polygons_wkb(rings), pa.binary()),
                    pa.StructArray.from_arrays([pa.array(v) for v in corners], fields=list(schema.field("bbox").type)),
                ],
                schema=schema,
            )
            writer.write_table(table)
