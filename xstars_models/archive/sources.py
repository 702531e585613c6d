"""What a collection run embeds: the scenes its sources name, each with the id its rows carry.

A source is a raster file or ``http(s)://`` COG URL (one scene, its id the file name without
extension), a STAC Item (its id), a STAC ItemCollection (each feature), or a static STAC Catalog
or Collection (walked through its child and item links). JSON documents are read locally or
within the network limits (:mod:`xstars_models.io.network`): pystac's own reader waits on a
stalled server forever, so the walk reads through a bounded one.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InvalidInputError, MissingExtraError
from ..io.network import read_url

__all__ = ["SceneRef", "expand_sources"]

_URL = re.compile(r"^https?://", re.IGNORECASE)


@dataclass(frozen=True)
class SceneRef:
    """One scene of a collection run.

    Attributes:
        scene_id: the STAC item id, else the file name without its extension: the ``scene_id``
            of the scene's rows, unique within a run.
        source: what ``embed_scene`` opens: a path, a URL, or (for items) a ``pystac.Item``.
        datetime: the item's acquisition time, ISO 8601 in UTC; ``None`` for plain rasters.
        origin: the source it came from (a file, URL or catalogue), for messages.
    """

    scene_id: str
    source: Any
    datetime: str | None
    origin: str


def expand_sources(sources: Iterable[str | os.PathLike[str]]) -> list[SceneRef]:
    """The scenes named by ``sources``, in the order given (a catalogue's in walk order).

    Raises:
        InvalidInputError: (``field="sources"``) no scene at all, a JSON document that is no STAC
            Item, ItemCollection, Catalog or Collection, or two scenes with one id (rows would
            collide); the message names the sources involved.
        NetworkTimeoutError, FileNotFoundError: a document could not be fetched or found.
        MissingExtraError: STAC sources without pystac.
    """
    scenes: list[SceneRef] = []
    seen: dict[str, str] = {}
    for source in sources:
        for scene in _expand(os.fspath(source)):
            if scene.scene_id in seen:
                raise InvalidInputError(
                    f"scene id {scene.scene_id!r} comes from both {seen[scene.scene_id]} and {scene.origin}: ids must "
                    "be unique within a run (rows are keyed by scene id); rename one of the files or embed them "
                    "into separate datasets.",
                    field="sources",
                )
            seen[scene.scene_id] = scene.origin
            scenes.append(scene)
    if not scenes:
        raise InvalidInputError("no scene to embed: the sources name no raster and no STAC item.", field="sources")
    return scenes


def _expand(source: str) -> Iterator[SceneRef]:
    if not source.split("?", 1)[0].lower().endswith(".json"):
        name = Path(source.split("?", 1)[0]).name
        yield SceneRef(name.rsplit(".", 1)[0] if "." in name else name, source, None, source)
        return
    pystac = _pystac()
    document = _read_json(source)
    kind = document.get("type") if isinstance(document, dict) else None
    if kind == "Feature":
        yield _item_ref(pystac.Item.from_dict(document, href=source), source)
    elif kind == "FeatureCollection":
        for feature in document.get("features", []):
            yield _item_ref(pystac.Item.from_dict(feature), source)
    elif kind in ("Catalog", "Collection"):
        catalog = pystac.read_file(source, stac_io=_bounded_stac_io())
        for item in catalog.get_items(recursive=True):
            yield _item_ref(item, source)
    else:
        raise InvalidInputError(
            f"{source}: a JSON document of type {kind!r}, not a STAC Item, ItemCollection, Catalog or Collection.",
            field="sources",
        )


def _item_ref(item: Any, origin: str) -> SceneRef:
    when = item.datetime or item.common_metadata.start_datetime
    stamp = when.isoformat().replace("+00:00", "Z") if when is not None else None
    return SceneRef(item.id, item, stamp, origin)


def _read_json(source: str) -> Any:
    try:
        text = read_url(source, "STAC document", field="sources") if _URL.match(source) else Path(source).read_text()
        return json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InvalidInputError(f"{source}: not a JSON document ({err}).", field="sources") from None


def _pystac() -> Any:
    try:
        import pystac
    except ImportError:
        raise MissingExtraError("Reading STAC sources needs pystac: pip install 'xstars-models[geo]'.") from None
    return pystac


def _bounded_stac_io() -> Any:
    """pystac's default reader, except that URLs are fetched within the network limits."""

    class BoundedStacIO(_pystac().stac_io.DefaultStacIO):  # type: ignore[misc]
        def read_text(self, source: Any, *args: Any, **kwargs: Any) -> str:
            href = os.fspath(source)
            if _URL.match(href):
                return read_url(href, "STAC document", field="sources").decode("utf-8")
            return str(super().read_text(source, *args, **kwargs))

    return BoundedStacIO()
