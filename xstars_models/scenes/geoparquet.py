"""Per-tile vectors as GeoParquet (https://geoparquet.org, version 1.1.0): one row per tile with
its footprint polygon (WKB, in the scene's CRS) and its ``embedding`` as a list column (the
layout of TorchGeo's and TerraTorch's GeoParquet embedding datasets; the tests read it with
geopandas and pyarrow only). Written one row group per strip of tiles, so memory does not grow
with the scene."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from typing import Any, BinaryIO

import numpy as np

from ..errors import MissingExtraError

__all__ = ["GEOPARQUET_VERSION", "TileStrip", "import_pyarrow", "polygon_wkb", "write_geoparquet"]

GEOPARQUET_VERSION = "1.1.0"
_WKB_POLYGON = 3

# One strip of tiles: index, tile row, tile column, valid, nodata fraction, input-pixel window
# (row, col, height, width; n x 4), CLS vectors (n x D), footprint rings (n x 5 x 2).
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


def polygon_wkb(ring: np.ndarray) -> bytes:
    """A one-ring polygon (closed ring, k x 2) as little-endian ISO WKB."""
    ring = np.ascontiguousarray(ring, dtype="<f8")
    return struct.pack("<BIII", 1, _WKB_POLYGON, 1, len(ring)) + ring.tobytes()


def _geo_metadata(crs: Any, bbox: list[float]) -> dict[str, Any]:
    # A missing "crs" means OGC:CRS84 in GeoParquet; scenes without georeferencing say null.
    projjson = crs.to_dict(projjson=True) if crs is not None else None
    return {
        "version": GEOPARQUET_VERSION,
        "primary_column": "geometry",
        "columns": {
            "geometry": {
                "encoding": "WKB",
                "geometry_types": ["Polygon"],
                "crs": projjson,
                "bbox": bbox,
                # Rings are counter-clockwise on a north-up map (RFC 7946's exterior orientation).
                "orientation": "counterclockwise",
            }
        },
    }


def write_geoparquet(
    handle: BinaryIO, strips: Iterator[TileStrip], dim: int, crs: Any, bbox: list[float], metadata: dict[str, Any]
) -> None:
    """Stream ``strips`` into a GeoParquet file on ``handle``; ``metadata`` goes under the
    ``xstars`` key of the file's key-value metadata (model, revision, sensor, tiling...)."""
    pa, pq = import_pyarrow()
    schema = pa.schema(
        [
            ("tile", pa.int64()),
            ("row", pa.int32()),
            ("col", pa.int32()),
            ("valid", pa.bool_()),
            ("nodata_fraction", pa.float32()),
            ("window", pa.list_(pa.float64(), 4)),
            ("embedding", pa.list_(pa.float32())),
            ("geometry", pa.binary()),
        ],
        metadata={
            b"geo": json.dumps(_geo_metadata(crs, bbox)).encode(),
            b"xstars": json.dumps(metadata).encode(),
        },
    )
    with pq.ParquetWriter(handle, schema, compression="zstd") as writer:
        for tile, row, col, valid, nodata_fraction, window, vectors, rings in strips:
            n = len(tile)
            offsets = pa.array(np.arange(0, (n + 1) * dim, dim, dtype=np.int32))
            embedding = pa.ListArray.from_arrays(offsets, pa.array(np.ascontiguousarray(vectors, np.float32).reshape(-1)))
            windows = pa.FixedSizeListArray.from_arrays(pa.array(np.asarray(window, np.float64).reshape(-1)), 4)
            table = pa.Table.from_arrays(
                [
                    pa.array(tile, pa.int64()),
                    pa.array(row, pa.int32()),
                    pa.array(col, pa.int32()),
                    pa.array(valid, pa.bool_()),
                    pa.array(nodata_fraction, pa.float32()),
                    windows,
                    embedding,
                    pa.array([polygon_wkb(r) for r in rings], pa.binary()),
                ],
                schema=schema,
            )
            writer.write_table(table)
