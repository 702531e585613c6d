"""What a search reads: a dataset of tile embeddings, as one table of the collection layout.

Two kinds of folder are datasets:

* a collection (``embed_collection``'s output: ``_manifest.json``, ``_model/``,
  ``sensor-<s>/part-*.parquet``; see :mod:`xstars_models.archive.parts`): every part, its rows as
  written; the model is the dataset's own copy (``_model``), whose weight files must be those the
  manifest and every part's footer record;
* a folder of ``embed_scene(output="cls")`` GeoParquet files: each file is one scene, its
  ``scene_id`` the file's stem; rows are its valid tiles (tiles left out for nodata have no
  vector), with the footprint moved from the scene's CRS to longitude/latitude, ``native_bounds``
  the footprint's bounds in the scene's CRS, ``datetime`` null; the model is the one the files'
  ``xstars`` metadata names (every file must name the same).

Either way each part (a part file or a scene file) gives rows in a fixed order, so a row is
identified by its part and its index in it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..archive.manifest import MANIFEST
from ..archive.parts import read_part_metadata
from ..archive.run import MODEL_FOLDER
from ..config import CONFIG_NAME
from ..errors import InvalidInputError, ModelNotFoundError
from ..io import import_rasterio, read_json
from ..scenes.geoparquet import bbox_struct, import_pyarrow, polygon_wkb

if TYPE_CHECKING:
    from ..model import XStarsBase

__all__ = ["ROW_COLUMNS", "EmbeddingDataset", "Part"]

# The columns of a row besides its vector, in the collection layout's order.
ROW_COLUMNS = ["scene_id", "row", "col", "geometry", "bbox", "crs", "native_bounds", "datetime", "sensor"]
COLLECTION, SCENES = "collection", "scenes"


@dataclass(frozen=True)
class Part:
    """One file of rows.

    Attributes:
        name: its path relative to the dataset folder (``/``-separated).
        path: its path.
        sensor: the sensor of its rows.
        whitened: its vectors were written whitened (``whiten=True``).
        tile_px: the tile side its rows were embedded with (pixels at the sensor's GSD).
        precision: the precision they were embedded with (``"auto"`` when the run left it so).
    """

    name: str
    path: Path
    sensor: str
    whitened: bool
    tile_px: int | None
    precision: str


class EmbeddingDataset:
    """The dataset folder ``root``: its parts, its model, and its rows as tables.

    Raises:
        FileNotFoundError: no such folder.
        InvalidInputError: (``field="dataset"``) a folder that is neither kind, a file that is
            not a part, or parts embedded by different models.
    """

    def __init__(self, root: str | Path) -> None:
        import_pyarrow()
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"{self.root}: no such dataset folder.")
        if (self.root / MANIFEST).exists() or any(self.root.glob("sensor-*/part-*.parquet")):
            self.kind = COLLECTION
            self.parts, self.model_id = self._collection()
        else:
            self.kind = SCENES
            self.parts, self.model_id = self._scene_files()

    def _collection(self) -> tuple[list[Part], str]:
        manifest = read_json(self.root / MANIFEST, error=InvalidInputError, field="dataset") \
            if (self.root / MANIFEST).exists() else {}
        files = (manifest.get("model") or {}).get("files")
        if files is None and (self.root / MODEL_FOLDER / CONFIG_NAME).exists():
            config = read_json(self.root / MODEL_FOLDER / CONFIG_NAME, error=InvalidInputError, field="dataset")
            files = {name: record["sha256"] for name, record in sorted(config.get("files", {}).items())}
        parts = []
        for path in sorted(self.root.glob("sensor-*/part-*.parquet")):
            meta = read_part_metadata(path)
            if files is not None and meta.get("model_files") not in (None, files):
                raise InvalidInputError(
                    f"{path} was embedded by another model than the rest of {self.root} (its weights' sha256 differ): "
                    "one dataset holds one model's vectors. Remove the part or embed it again.",
                    field="dataset",
                )
            settings = meta.get("settings") or {}
            tile = settings.get("tile_px")
            parts.append(Part(path.relative_to(self.root).as_posix(), path, str(meta.get("sensor") or path.parent.name[7:]),
                              bool(settings.get("whiten", False)), None if tile is None else int(tile),
                              str(settings.get("precision", "auto"))))
        identity = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest() if files else "unknown"
        return parts, f"collection weights {identity}"

    def _scene_files(self) -> tuple[list[Part], str]:
        paths = sorted(p for p in self.root.glob("*.parquet") if not p.name.startswith((".", "_")))
        if not paths:
            raise InvalidInputError(
                f"{self.root} is not a dataset: it has neither a collection's {MANIFEST} and sensor-*/part-*.parquet "
                "files (embed_collection) nor embed_scene(output='cls') .parquet files.",
                field="dataset",
            )
        parts, models = [], {}
        for path in paths:
            meta = _scene_metadata(path)
            # The trunk's sha256 where the file records it: a model id alone may name other weights.
            models[path.name] = (meta.get("model"), meta.get("revision"), meta.get("model_sha256"))
            tile = meta.get("tile_px")
            parts.append(Part(path.name, path, str(meta["sensor"]), bool(meta.get("whitened", False)),
                              None if tile in (None, "None") else int(tile), str(meta.get("precision", "auto"))))
        if len(set(models.values())) > 1:
            shown = ", ".join(f"{name}: {model[0]}" for name, model in sorted(models.items()))
            raise InvalidInputError(
                f"{self.root}: the files were embedded by different models ({shown}); one dataset holds one model's "
                "vectors. Move the others to their own folder.",
                field="dataset",
            )
        model, revision, sha256 = next(iter(models.values()))
        self.scene_model = (str(model), revision)
        return parts, f"{model}@{revision} ({sha256})"

    def sensor_settings(self, sensor: str) -> Part | None:
        """A part of ``sensor`` (its tile size and precision are the sensor's), or ``None``."""
        return next((p for p in self.parts if p.sensor == sensor), None)

    def load_model(self, local_files_only: bool = False) -> XStarsBase:
        """The model the vectors were embedded with: the collection's ``_model`` copy, or the
        model the scene files name.

        Raises:
            InvalidInputError: (``field="model"``) a collection without its ``_model`` folder, or
                scene files naming a model that cannot be found (pass the model instead).
        """
        from ..model import XStarsBase

        if self.kind == COLLECTION:
            folder = self.root / MODEL_FOLDER
            if not (folder / CONFIG_NAME).exists():
                raise InvalidInputError(f"{self.root} has no {MODEL_FOLDER} folder with the model its vectors were "
                                        "embedded with; pass the model (model=..., --model).", field="model")
            return XStarsBase.from_pretrained(folder, local_files_only=True)
        name, revision = self.scene_model
        try:
            return XStarsBase.from_pretrained(name, revision=revision, local_files_only=local_files_only)
        except ModelNotFoundError:
            raise InvalidInputError(
                f"{self.root}: the files were embedded by model {name!r}, which cannot be loaded by that name (a model "
                "that was never saved?); pass the model (model=..., --model).",
                field="model",
            ) from None

    def rows(self, part: Part) -> int:
        """Rows of ``part`` (from its footer; a scene file's valid tiles)."""
        _, pq = import_pyarrow()
        if self.kind == COLLECTION:
            return int(pq.ParquetFile(part.path).metadata.num_rows)
        valid = pq.read_table(part.path, columns=["valid"])["valid"].to_numpy(zero_copy_only=False)
        return int(valid.sum())

    def table(self, part: Part, columns: list[str] | None = None) -> Any:
        """``part``'s rows as a ``pyarrow.Table`` of ``columns`` (default :data:`ROW_COLUMNS`)."""
        _, pq = import_pyarrow()
        columns = list(ROW_COLUMNS if columns is None else columns)
        if self.kind == COLLECTION:
            return pq.read_table(part.path, columns=columns)
        return _scene_rows(part, columns)

    def vectors(self, part: Part) -> np.ndarray:
        """``part``'s stored vectors, n x D float32, in row order."""
        _, pq = import_pyarrow()
        if self.kind == COLLECTION:
            column = pq.read_table(part.path, columns=["embedding"])["embedding"].combine_chunks()
        else:
            raw = pq.read_table(part.path, columns=["valid", "embedding"])
            column = raw.filter(raw["valid"])["embedding"].combine_chunks()
        values = column.flatten().to_numpy(zero_copy_only=False)
        n = len(column)
        return np.ascontiguousarray(values.reshape(n, -1) if n else values.reshape(0, 0), np.float32)


def _scene_metadata(path: Path) -> dict[str, Any]:
    _, pq = import_pyarrow()
    try:
        found = pq.read_schema(path).metadata or {}
        meta = json.loads(found.get(b"xstars", b"null"))
    except Exception as err:  # not Parquet, damaged, not JSON: the file is named either way
        raise InvalidInputError(f"{path} is not an embed_scene(output='cls') file ({type(err).__name__}: {err}).",
                                field="dataset") from None
    if not isinstance(meta, dict) or "sensor" not in meta or b"geo" not in found:
        raise InvalidInputError(
            f"{path} is not an embed_scene(output='cls') file: its footer has no 'geo' and 'xstars' metadata naming the "
            "sensor. A dataset folder holds only such files (or is an embed_collection dataset).",
            field="dataset",
        )
    if not meta.get("crs"):
        raise InvalidInputError(f"{path}: the scene had no CRS, so its tiles cannot be placed on the globe.",
                                field="dataset")
    return meta


def _scene_rows(part: Part, columns: list[str]) -> Any:
    """A scene file's valid rows in the collection layout (see the module's notes)."""
    pa, pq = import_pyarrow()
    rasterio = import_rasterio("Reading embed_scene files")
    from rasterio.warp import transform

    meta = _scene_metadata(part.path)
    raw = pq.read_table(part.path, columns=["row", "col", "valid", "geometry"])
    raw = raw.filter(raw["valid"])
    n = raw.num_rows
    crs = rasterio.crs.CRS.from_user_input(meta["crs"])
    code = crs.to_epsg()
    native = _rings(raw["geometry"].to_pylist())  # n x 5 x 2 in the scene's CRS
    xs, ys = transform(crs, "EPSG:4326", native[..., 0].ravel(), native[..., 1].ravel()) if n else ([], [])
    rings = np.stack([np.asarray(xs, np.float64), np.asarray(ys, np.float64)], -1).reshape(native.shape)
    x, y = rings[..., 0], rings[..., 1]
    clockwise = (x[:, :-1] * y[:, 1:] - x[:, 1:] * y[:, :-1]).sum(axis=1) < 0  # GeoParquet's counterclockwise
    rings = np.where(clockwise[:, None, None], rings[:, ::-1], rings)
    low, high = rings.min(axis=1), rings.max(axis=1)
    built = {
        "scene_id": pa.array([part.path.stem] * n, pa.string()),
        "row": raw["row"].cast(pa.int32()),
        "col": raw["col"].cast(pa.int32()),
        "geometry": pa.array([polygon_wkb(r) for r in rings], pa.binary()),
        "bbox": pa.StructArray.from_arrays([pa.array(low[:, 0]), pa.array(low[:, 1]), pa.array(high[:, 0]),
                                            pa.array(high[:, 1])], fields=list(bbox_struct())),
        "crs": pa.array([f"EPSG:{code}" if code is not None else crs.to_wkt()] * n, pa.string()),
        "native_bounds": pa.FixedSizeListArray.from_arrays(
            pa.array(np.concatenate([native.min(axis=1), native.max(axis=1)], axis=1).reshape(-1)), 4),
        "datetime": pa.nulls(n, pa.timestamp("us", tz="UTC")),
        "sensor": pa.array([part.sensor] * n, pa.string()),
    }
    return pa.table({name: built[name] for name in columns})


def _rings(wkb: list[bytes]) -> np.ndarray:
    """Closed one-ring polygons (ISO WKB, little-endian, as ``embed_scene`` writes them) as
    n x k x 2 coordinates."""
    if not wkb:
        return np.zeros((0, 5, 2))
    import shapely

    geometries = shapely.from_wkb(wkb)
    coords = shapely.get_coordinates(shapely.get_exterior_ring(geometries))
    return coords.reshape(len(wkb), -1, 2)
