"""Searching a dataset: :class:`SearchIndex` (a dataset with its index open, for many queries) and
:func:`search` (one query). A query is one of

* an image of a sensor, embedded with the dataset's model at the precision its tiles were
  embedded with (a chip the size of the dataset's tiles of that sensor compares best);
* a point (longitude, latitude): the dataset's tile under it;
* a tile of the dataset (scene id, row, column).

Every row of every sensor is a candidate unless ``where`` narrows them; the filter is applied
before ranking, so ``k`` hits of the filtered rows come back."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..archive.parts import safe_id
from ..errors import InputReadError, InvalidInputError, InvalidOptionError, user_stacklevel
from ..inputs import to_batch
from ..io import read_raster
from ..scenes.tiling import default_tile
from .dataset import COLLECTION, ROW_COLUMNS, EmbeddingDataset
from .faiss_index import nearest
from .hits import hit_lines, write_hits
from .options import SearchOptions
from .space import Space
from .store import IndexReport, open_index
from .where import as_expression

if TYPE_CHECKING:
    from ..model import XStarsBase

__all__ = ["SearchIndex", "SearchResult", "search"]

_FILTER_COLUMNS = ["scene_id", "row", "col", "crs", "datetime", "sensor", "bbox"]


@dataclass(frozen=True)
class SearchResult:
    """The hits of one query.

    Attributes:
        hits: a ``pyarrow.Table`` of the hit rows, best first: the dataset's columns but
            ``embedding`` (``scene_id``, ``row``, ``col``, ``geometry`` as WKB in longitude and
            latitude, ``bbox``, ``crs``, ``native_bounds``, ``datetime``, ``sensor``) and
            ``score``, the cosine similarity with the query in the search's space (IVF-PQ:
            approximated from the codes).
        query: what was searched for (``kind``: ``image``, ``near`` or ``like``; the tile taken
            for ``near`` and ``like``).
        index: what the search did with the dataset's index.
        dataset: the dataset folder.
    """

    hits: Any
    query: dict[str, Any]
    index: IndexReport
    dataset: Path

    def write(self, out: str | os.PathLike[str], overwrite: bool = False) -> Path:
        """Write the hits to ``out``: GeoParquet (``.parquet``, ``.geoparquet``) or GeoJSON
        (``.geojson``, ``.json``), in one step; see :func:`~xstars_models.search.hits.write_hits`.

        Raises:
            InvalidOptionError: (``field="out"``) a file inside the dataset folder (it would
                become a part of it), another suffix, or an existing file without ``overwrite``.
        """
        if Path(os.path.abspath(self.dataset)) in Path(os.path.abspath(out)).parents:
            raise InvalidOptionError(f"{out} is inside the dataset {self.dataset}, where it would be read as a part; "
                                     "write the hits elsewhere.", field="out")
        return write_hits(self.hits, out, overwrite=overwrite)

    def lines(self) -> list[str]:
        """The hits as an aligned text table, one line a hit after a header."""
        return hit_lines(self.hits)


class SearchIndex:
    """A dataset of tile embeddings with its index open (built, updated or checked: see
    :mod:`~xstars_models.search.store`), to run queries on.

    Args:
        dataset: an ``embed_collection`` dataset folder, or a folder of ``embed_scene(output="cls")``
            files (see :mod:`~xstars_models.search.dataset`).
        options: a :class:`SearchOptions`; keywords (its fields) replace its values.
        model: the model the vectors were embedded with, when the dataset's own cannot be loaded
            (default: the collection's ``_model`` copy, or the model the scene files name).
        local_files_only: load the scene files' model from the local cache only.

    Raises:
        InvalidInputError: (``field="dataset"``) a folder that is no dataset, or has no rows.
        InvalidOptionError: a bad option; ``whiten`` for a model without a fitted whitening
            covering the dataset's sensors (``field="whiten"`` or ``"sensor"``).
        MissingExtraError: FAISS or pyarrow is missing.
    """

    def __init__(self, dataset: str | os.PathLike[str], options: SearchOptions | None = None, *,
                 model: XStarsBase | None = None, local_files_only: bool = False, **kwargs: Any) -> None:
        self.options = SearchOptions.from_call(options, kwargs)
        self.dataset = EmbeddingDataset(Path(dataset))
        self._model, self._local_files_only = model, local_files_only
        whiten = self.options.whiten
        whitens_parts = whiten and any(not p.whitened for p in self.dataset.parts)
        self.space = Space(whiten, self.model.whitening if whitens_parts else None, self.dataset.model_id, whitens_parts)
        for part in self.dataset.parts:  # what cannot be indexed is refused before anything is read
            self.space.check(part.sensor, part.whitened)
        opened = open_index(self.dataset, self.space, self.options)
        self.index, self.parts, self.offsets, self.report = opened.index, opened.parts, opened.offsets, opened.report

    @property
    def model(self) -> XStarsBase:
        """The model the dataset's vectors were embedded with (loaded on first use)."""
        if self._model is None:
            self._model = self.dataset.load_model(self._local_files_only)
        return self._model

    # ---- queries -------------------------------------------------------------------------

    def embed_query(self, image: Any, sensor: str) -> np.ndarray:
        """``image`` (one image or a batch of one sensor's digital numbers, as ``embed`` takes
        them, or an image file: GeoTIFF, PNG, JPEG, ``.npy``) as unit query vectors (B x D) in
        the search's space, embedded at the precision of the dataset's tiles of ``sensor``.
        Warns when its size is not the tile size of those tiles.

        Raises:
            InvalidOptionError: a sensor the model lacks, or its whitening does not cover
                (``field="sensor"``).
            InvalidInputError: an image that does not fit the sensor (``field="image"``).
        """
        model = self.model
        stem = model.check_sensor(sensor)
        if isinstance(image, (str, os.PathLike)):
            image = _read_image(Path(image))
        try:
            batch = to_batch(image, stem.spec, stem.patch_size)
        except InvalidInputError as err:
            raise InvalidInputError(str(err), field="image") from None
        part = self.dataset.sensor_settings(sensor)
        tile = part.tile_px if part is not None and part.tile_px else default_tile(model, sensor)
        if batch.shape[-2:] != (tile, tile):
            warnings.warn(
                f"the query image is {batch.shape[-2]} x {batch.shape[-1]} px and the dataset's {sensor} tiles are "
                f"{tile} x {tile} px: a chip of the tiles' size (at the sensor's GSD) compares best.",
                UserWarning, stacklevel=user_stacklevel(),
            )
        vectors = model.embed(batch, sensor, output="cls", progress=False, device=self.options.device,
                              precision=part.precision if part is not None else "auto")
        if self.space.whiten and self.space.whitening is None:
            self.space.whitening = model.whitening
        return self.space.index_vectors(vectors.numpy(), sensor, whitened=False)

    def find_tile(self, scene_id: str, row: int, col: int, sensor: str | None = None) -> int:
        """The id of the dataset's tile (``scene_id``, ``row``, ``col``) of ``sensor`` (needed
        only when several sensors have such a tile).

        Raises:
            InvalidInputError: no such tile (``field="like"``).
            InvalidOptionError: such tiles of several sensors and no ``sensor`` (``field="sensor"``).
        """
        found = []
        for number, part in enumerate(self.parts):
            if (sensor is not None and part.sensor != sensor) or not _may_hold(part.name, scene_id, self.dataset.kind):
                continue
            table = self.dataset.table(part, ["scene_id", "row", "col"])
            match = np.flatnonzero((table["scene_id"].to_numpy(zero_copy_only=False) == scene_id)
                                   & (table["row"].to_numpy() == row) & (table["col"].to_numpy() == col))
            found += [(part.sensor, int(self.offsets[number] + i)) for i in match]
        if not found:
            raise InvalidInputError(f"{self.dataset.root} has no tile {scene_id}:{row}:{col}"
                                    f"{f' of {sensor}' if sensor else ''}.", field="like")
        sensors = sorted({s for s, _ in found})
        if len(sensors) > 1:
            raise InvalidOptionError(f"tile {scene_id}:{row}:{col} exists for sensors {sensors}; choose one with {{sensor}}.",
                                     field="sensor", settings={"sensor": sensors[0]})
        return found[0][1]

    def tile_under(self, lon: float, lat: float, sensor: str | None = None) -> int:
        """The id of the dataset's tile (of ``sensor``, if given) whose footprint holds the
        point (``lon``, ``lat`` in degrees); where several do, the one whose centre is nearest.

        Raises:
            InvalidOptionError: a point that is not a longitude and latitude (``field="near"``).
            InvalidInputError: no tile there (``field="near"``).
        """
        import shapely

        if not (-180 <= lon <= 180 and -90 <= lat <= 90):
            raise InvalidOptionError(f"near ({lon}, {lat}) is not a longitude (-180..180) and latitude (-90..90) in "
                                     "degrees.", field="near")
        best: tuple[float, int] | None = None
        for number, part in enumerate(self.parts):
            if sensor is not None and part.sensor != sensor:
                continue
            table = self.dataset.table(part, ["bbox", "geometry"])
            box = {k: table["bbox"].combine_chunks().field(k).to_numpy() for k in ("xmin", "ymin", "xmax", "ymax")}
            near = np.flatnonzero((box["xmin"] <= lon) & (lon <= box["xmax"]) & (box["ymin"] <= lat) & (lat <= box["ymax"]))
            if not len(near):
                continue
            shapes = shapely.from_wkb(table["geometry"].take(near).to_pylist())
            for i in near[shapely.intersects_xy(shapes, lon, lat)]:
                centre = ((box["xmin"][i] + box["xmax"][i]) / 2, (box["ymin"][i] + box["ymax"][i]) / 2)
                distance = float(np.hypot(centre[0] - lon, centre[1] - lat))
                if best is None or distance < best[0]:
                    best = (distance, int(self.offsets[number] + i))
        if best is None:
            raise InvalidInputError(f"no tile of {self.dataset.root}{f' of {sensor}' if sensor else ''} holds the point "
                                    f"({lon}, {lat}) (longitude, latitude in degrees).", field="near")
        return best[1]

    def row_vectors(self, ids: np.ndarray) -> np.ndarray:
        """The dataset's rows ``ids`` as unit vectors in the search's space (len(ids) x D), in the
        order of ``ids``."""
        pieces, order = [], []
        for number, local, at in self._by_part(np.asarray(ids, np.int64)):
            part = self.parts[number]
            pieces.append(self.space.index_vectors(self.dataset.vectors(part)[local], part.sensor, part.whitened))
            order.append(at)
        return np.concatenate(pieces)[np.argsort(np.concatenate(order))]

    # ---- ranking -------------------------------------------------------------------------

    def allowed(self, where: Any) -> np.ndarray | None:
        """The rows ``where`` keeps, as a bool mask over ids (``None``: no filter).

        Raises:
            InvalidOptionError: (``field="where"``) a filter the dataset's columns cannot answer.
        """
        if where is None:
            return None
        import pyarrow as pa

        expression = as_expression(where)
        mask = np.zeros(int(self.offsets[-1]), bool)
        for number, part in enumerate(self.parts):
            table = self.dataset.table(part, _FILTER_COLUMNS)
            table = table.append_column("__row", pa.array(np.arange(table.num_rows)))
            try:
                kept = table.filter(expression)["__row"].to_numpy()
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError, KeyError) as err:
                raise InvalidOptionError(f"where {where}: cannot be applied to the dataset's columns "
                                         f"({', '.join(_FILTER_COLUMNS)}): {err}.", field="where") from None
            mask[self.offsets[number] + kept] = True
        return mask

    def nearest(self, vectors: np.ndarray, k: int | None = None, where: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` (default: the options') best (scores, ids) of each query vector (B x D, in
        the search's space) among the rows ``where`` keeps (default: the options' filter), best
        first; fewer (id -1) only when fewer rows qualify."""
        k = self.options.k if k is None else SearchOptions(k=k).k
        allowed = self.allowed(self.options.where if where is None else where)
        return nearest(self.index, vectors, k, allowed, self.options.nprobe)

    def rows(self, ids: np.ndarray, scores: np.ndarray | None = None) -> Any:
        """The dataset's rows ``ids`` (ids of -1 left out) as a ``pyarrow.Table`` in that order,
        with ``score`` when given."""
        import pyarrow as pa

        ids = np.asarray(ids, np.int64)
        keep = ids >= 0
        ids = ids[keep]
        pieces, order = [], []
        for number, local, at in self._by_part(ids):
            pieces.append(self.dataset.table(self.parts[number]).take(pa.array(local)))
            order.append(at)
        first = pieces[0] if pieces else self.dataset.table(self.parts[0])
        schema = pa.schema([first.schema.field(c) for c in ROW_COLUMNS])  # without the parts' footers
        table = pa.concat_tables([p.cast(schema) for p in pieces]) if pieces else schema.empty_table()
        table = table.take(pa.array(np.argsort(np.concatenate(order)) if order else np.zeros(0, np.int64)))
        if scores is not None:
            table = table.append_column("score", pa.array(np.asarray(scores, np.float32)[keep]))
        return table

    def search(self, *, image: Any = None, sensor: str | None = None, near: tuple[float, float] | None = None,
               like: Any = None, k: int | None = None, where: Any = None) -> SearchResult:
        """The ``k`` rows most like one query: ``image`` (with its ``sensor``), ``near`` (lon,
        lat: the tile there, of ``sensor`` if given) or ``like`` (a tile: (scene_id, row, col)
        or ``"scene_id:row:col"``, of ``sensor`` if several have it).

        Raises:
            InvalidOptionError: not exactly one query (``field="query"``), an image without its
                sensor (``"sensor"``), a bad ``like`` or ``where``.
            InvalidInputError: no tile at ``near`` or ``like``.
        """
        given = [name for name, value in (("image", image), ("near", near), ("like", like)) if value is not None]
        if len(given) != 1:
            raise InvalidOptionError(
                f"give exactly one query, got {len(given)} ({', '.join(given) or 'none'}): an image of a sensor "
                "(image=, sensor=), a point whose tile to take (near=(lon, lat)) or a tile of the dataset "
                "(like=(scene_id, row, col)).",
                field="query",
            )
        if image is not None:
            if sensor is None:
                raise InvalidOptionError("an image query needs the sensor that took it: pass {sensor}.", field="sensor",
                                         settings={"sensor": "NAME"})
            query: dict[str, Any] = {"kind": "image", "sensor": sensor}
            vectors = self.embed_query(image, sensor)
        else:
            if near is not None:
                lon, lat = _point(near)
                row_id, query = self.tile_under(lon, lat, sensor), {"kind": "near", "lon": lon, "lat": lat}
            else:
                row_id, query = self.find_tile(*_tile_key(like), sensor), {"kind": "like"}
            tile = self.rows(np.array([row_id])).to_pylist()[0]
            query.update({key: tile[key] for key in ("sensor", "scene_id", "row", "col")})
            vectors = self.row_vectors(np.array([row_id]))
        scores, ids = self.nearest(vectors[:1], k, where)
        return SearchResult(self.rows(ids[0], scores[0]), query, self.report, self.dataset.root)

    def _by_part(self, ids: np.ndarray) -> list[tuple[int, np.ndarray, np.ndarray]]:
        """``ids`` part by part: (part number, row indices in it, their positions in ``ids``)."""
        numbers = np.searchsorted(self.offsets, ids, side="right") - 1
        found = []
        for n in np.unique(numbers):
            at = np.flatnonzero(numbers == n)
            found.append((int(n), ids[at] - self.offsets[n], at))
        return found


def search(dataset: str | os.PathLike[str], *, image: Any = None, sensor: str | None = None,
           near: tuple[float, float] | None = None, like: Any = None, options: SearchOptions | None = None,
           model: XStarsBase | None = None, local_files_only: bool = False, **kwargs: Any) -> SearchResult:
    """The rows of ``dataset`` most like one query, across every sensor unless ``where``
    narrows them: see :class:`SearchIndex` (the dataset and index) and
    :meth:`SearchIndex.search` (the query). Keywords are :class:`SearchOptions` fields (``k``,
    ``where``, ``whiten``, ``exact_max_rows``...)."""
    index = SearchIndex(dataset, options, model=model, local_files_only=local_files_only, **kwargs)
    return index.search(image=image, sensor=sensor, near=near, like=like)


def _may_hold(name: str, scene_id: str, kind: str) -> bool:
    """Whether a part named ``name`` can hold rows of ``scene_id`` (parts are named by scene)."""
    if kind == COLLECTION:
        return Path(name).name.startswith(f"part-{safe_id(scene_id)}-")
    return Path(name).stem == scene_id


def _point(near: Any) -> tuple[float, float]:
    try:
        lon, lat = (float(v) for v in near)
    except (TypeError, ValueError):
        raise InvalidOptionError(f"near must be (longitude, latitude) in degrees, got {near!r}.", field="near") from None
    return lon, lat


def _tile_key(like: Any) -> tuple[str, int, int]:
    """(scene_id, row, col) of ``like``: a tuple, or ``"scene_id:row:col"`` (the id may hold ``:``)."""
    parts = like.rsplit(":", 2) if isinstance(like, str) else list(like) if isinstance(like, (tuple, list)) else []
    try:
        scene_id, row, col = parts
        return str(scene_id), int(row), int(col)
    except (TypeError, ValueError):
        raise InvalidOptionError(f"like must name a tile as SCENE:ROW:COL or (scene_id, row, col), got {like!r}.",
                                 field="like") from None


def _read_image(path: Path) -> Any:
    """An image file as an array: ``.npy`` as stored, anything GDAL reads (GeoTIFF, PNG, JPEG) as
    C x H x W."""
    if path.suffix.lower() == ".npy":
        try:
            return np.load(path, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise InputReadError(f"{path}: cannot read it as a .npy array ({err}).", field="image") from None
    return read_raster(path, purpose=f"{path}: reading the query image", extra_bytes_per_value=4, field="image")
