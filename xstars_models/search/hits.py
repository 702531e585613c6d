"""The hits of a search as files (GeoParquet, GeoJSON) and as an aligned text table."""

from __future__ import annotations

import datetime as _dt
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InvalidOptionError
from ..io.outputs import refuse_existing_output
from ..scenes.geoparquet import BBOX_FIELDS, geo_metadata, import_pyarrow, union_bbox
from ..serialization import atomic_open, atomic_write_bytes

__all__ = ["hit_lines", "write_hits"]

_PARQUET, _GEOJSON = (".parquet", ".geoparquet"), (".geojson", ".json")


def write_hits(hits: Any, out: str | os.PathLike[str], overwrite: bool = False) -> Path:
    """Write ``hits`` (a search's table: geometry as WKB in longitude/latitude) to ``out`` in one
    step (a temporary file renamed): GeoParquet 1.1 (``.parquet``, ``.geoparquet``; OGC:CRS84,
    ``bbox`` covering) or a GeoJSON FeatureCollection (``.geojson``, ``.json``; each row's
    columns but ``geometry`` as properties, ``datetime`` as ISO 8601, in rank order).

    Raises:
        InvalidOptionError: (``field="out"``) another suffix, or an existing file without
            ``overwrite``.
    """
    out = Path(out)
    suffix = out.suffix.lower()
    if suffix not in _PARQUET + _GEOJSON:
        raise InvalidOptionError(f"{out}: hits are written as GeoParquet ({', '.join(_PARQUET)}) or GeoJSON "
                                 f"({', '.join(_GEOJSON)}).", field="out")
    refuse_existing_output(out, overwrite)
    if suffix in _GEOJSON:
        atomic_write_bytes(out, (json.dumps(_geojson(hits), indent=1) + "\n").encode())
        return out
    _, pq = import_pyarrow()
    boxes = hits["bbox"].combine_chunks()
    bounds = np.stack([boxes.field(k).to_numpy() for k in BBOX_FIELDS], axis=1) if hits.num_rows else np.zeros((0, 4))
    table = hits.replace_schema_metadata({b"geo": json.dumps(geo_metadata(union_bbox(bounds))).encode()})
    with atomic_open(out) as handle:
        pq.write_table(table, handle, compression="zstd")
    return out


def hit_lines(hits: Any) -> list[str]:
    """One header line, a rule and one line per hit: rank, score, sensor, scene_id, row, col,
    datetime and the tile's centre (longitude, latitude in degrees); numbers right-aligned."""
    rows = hits.to_pylist()
    header = ["rank", "score", "sensor", "scene_id", "row", "col", "datetime", "lon", "lat"]
    cells = [[str(rank), f"{row['score']:.4f}", row["sensor"], row["scene_id"], str(row["row"]), str(row["col"]),
              _iso(row["datetime"]) or "-", f"{(row['bbox']['xmin'] + row['bbox']['xmax']) / 2:.5f}",
              f"{(row['bbox']['ymin'] + row['bbox']['ymax']) / 2:.5f}"] for rank, row in enumerate(rows, 1)]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]
    right = {"rank", "score", "row", "col", "lon", "lat"}

    def line(values: list[str]) -> str:
        return "  ".join(v.rjust(w) if h in right else v.ljust(w) for v, w, h in zip(values, widths, header)).rstrip()

    return [line(header), line(["-" * w for w in widths]), *(line(c) for c in cells)]


def _iso(value: _dt.datetime | None) -> str | None:
    return None if value is None else value.astimezone(_dt.timezone.utc).isoformat().replace("+00:00", "Z")


def _geojson(hits: Any) -> dict[str, Any]:
    import shapely

    features = []
    shapes = shapely.from_wkb(hits["geometry"].to_pylist())
    for row, shape in zip(hits.drop_columns(["geometry"]).to_pylist(), shapes):
        row["datetime"] = _iso(row["datetime"])
        features.append({"type": "Feature", "geometry": json.loads(shapely.to_geojson(shape)), "properties": row})
    return {"type": "FeatureCollection", "features": features}

