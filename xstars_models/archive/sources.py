"""What a collection run embeds: the scenes its sources name, each with the id its rows carry.

A source is a raster file or ``http(s)://`` COG URL (one scene, its id the file name without
extension), a STAC Item (its id), a STAC ItemCollection (each feature), a static STAC Catalog
or Collection (walked through its child and item links), or a :class:`StacSearch` of a STAC API
(each item it finds, page after page). JSON documents are read locally or within the network
limits (:mod:`xstars_models.io.network`): pystac's own reader waits on a stalled server forever,
so the walk reads through a bounded one, and the search's requests get the same limits.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import (
    InvalidInputError,
    InvalidOptionError,
    InvalidTypeError,
    MissingExtraError,
    NetworkTimeoutError,
    XStarsError,
)
from ..io.network import NetworkLimits, network_limits, read_url

__all__ = ["SceneRef", "StacSearch", "expand_sources"]

_URL = re.compile(r"^https?://", re.IGNORECASE)
# An RFC 3339 date or date-time: year, month, day[, hour, minute, second[, fraction]][, offset].
_INSTANT = re.compile(r"(\d{4})-(\d{2})-(\d{2})(?:[Tt](\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?([Zz]|[+-]\d{2}:\d{2})?)?")


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


@dataclass(frozen=True)
class StacSearch:
    """A search of a STAC API (``/search``), as a source of a collection run: each item found is
    one scene, its id the item id. All requests (landing page, every page of results) are bounded
    by the network limits (``XSTARS_HTTP_TIMEOUT`` per request, ``XSTARS_HTTP_RETRIES`` further
    attempts after a timeout, a dropped connection or a 5xx answer).

    Attributes:
        url: the API's landing page, ``https://earth-search.aws.element84.com/v1``.
        collections: ids of the collections to search (a single id may be given as a string);
            empty: every collection.
        bbox: (west, south, east, north) in degrees, EPSG:4326 longitude and latitude; items whose
            footprint intersects it. west > east crosses the antimeridian.
        datetime: an RFC 3339 instant or interval, ``2024-01-01/2024-12-31``,
            ``2024-06-01T00:00:00Z/..`` (``..`` or nothing: open); a date alone covers its whole
            day in UTC.
        query: a STAC API ``query`` extension object, ``{"eo:cloud_cover": {"lt": 20}}``.
        filter: a CQL2 JSON ``filter`` (the API must support the filter extension).
        max_items: stop after this many items (the API's order); ``None``: every item found.
        limit: items per page asked of the API (its own default when ``None``); pages are
            followed through their ``next`` links either way.
    """

    url: str
    collections: tuple[str, ...] = ()
    bbox: tuple[float, float, float, float] | None = None
    datetime: str | None = None
    query: Mapping[str, Any] | None = field(default=None, hash=False)
    filter: Mapping[str, Any] | None = field(default=None, hash=False)
    max_items: int | None = None
    limit: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.url, str) or not _URL.match(self.url):
            raise InvalidOptionError(f"url={self.url!r}: expected the http(s):// URL of a STAC API's landing page.",
                                     field="url")
        given = self.collections
        names = (given,) if isinstance(given, str) else tuple(given) if isinstance(given, Iterable) else None
        if names is None or not all(isinstance(n, str) and n for n in names):
            raise InvalidTypeError(f"collections={given!r}: expected collection ids (strings).", field="collections")
        object.__setattr__(self, "collections", names)
        if self.bbox is not None:
            object.__setattr__(self, "bbox", _check_bbox(self.bbox))
        if self.datetime is not None:
            _check_interval(self.datetime)
        for name in ("query", "filter"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), Mapping):
                raise InvalidTypeError(f"{name}={getattr(self, name)!r}: expected a JSON object (a dict).", field=name)
        for name, most in (("max_items", None), ("limit", 10_000)):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1
                                      or (most is not None and value > most)):
                raise InvalidOptionError(f"{name}={value!r}: expected a whole number >= 1"
                                         + (f" and <= {most}" if most else "") + " (or None).", field=name)


def expand_sources(sources: Iterable[str | os.PathLike[str] | StacSearch]) -> list[SceneRef]:
    """The scenes named by ``sources``, in the order given (a catalogue's in walk order, a
    search's in the API's order).

    Raises:
        InvalidInputError: (``field="sources"``) no scene at all, a JSON document that is no STAC
            Item, ItemCollection, Catalog or Collection, or two scenes with one id (rows would
            collide); the message names the sources involved. (``field="url"``) a STAC API that
            answers with an error, is not a STAC API with item search, or cannot be reached.
        NetworkTimeoutError, FileNotFoundError: a document could not be fetched or found
            (a search: ``NetworkTimeoutError`` with ``field="url"``).
        MissingExtraError: STAC sources without pystac, a search without pystac-client.
    """
    scenes: list[SceneRef] = []
    seen: dict[str, str] = {}
    searches: list[StacSearch] = []
    for source in sources:
        if isinstance(source, StacSearch):
            searches.append(source)
        found = _search(source) if isinstance(source, StacSearch) else _expand(os.fspath(source))
        for scene in found:
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
        found_none = "".join(f"; {search.url} found no item for {_criteria(search)}" for search in searches)
        raise InvalidInputError(f"no scene to embed: the sources name no raster and no STAC item{found_none}.",
                                field="sources")
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


def _search(search: StacSearch) -> Iterator[SceneRef]:
    """The items ``search`` finds, page after page, each detached from the client (a plain
    ``pystac.Item``: what a Dask worker receives carries no HTTP session)."""
    pystac = _pystac()
    client_module = _pystac_client()
    limits = network_limits()
    try:
        # The timeout again: Client.open sets its reader's timeout to its own argument.
        client = client_module.Client.open(search.url, stac_io=_bounded_api_io(limits), timeout=limits.timeout_s)
        # POST where the API offers it (long filters fit in a body), else GET; pystac-client would
        # POST to an API that only takes GET.
        methods = {link.extra_fields.get("method") or "GET" for link in client.get_links("search")}
        results = client.search(
            method="POST" if "POST" in methods else "GET", collections=list(search.collections) or None,
            bbox=search.bbox, datetime=search.datetime, query=dict(search.query) if search.query else None,
            filter=dict(search.filter) if search.filter else None, max_items=search.max_items, limit=search.limit,
        )
        for document in results.items_as_dicts():
            item = pystac.Item.from_dict(document)
            yield _item_ref(item, item.get_self_href() or f"{search.url} search")
    except client_module.warnings.DoesNotConformTo:
        raise InvalidInputError(f"{search.url}: not a STAC API with item search (its landing page declares no "
                                "item-search conformance class); give its catalogue as a source instead.",
                                field="url") from None
    except (json.JSONDecodeError, pystac.STACError, pystac.STACTypeError, client_module.errors.ClientTypeError) as err:
        raise InvalidInputError(f"{search.url}: not a STAC API landing page or search result ({err}).",
                                field="url") from None


def _criteria(search: StacSearch) -> str:
    """What a search asked for, for messages: its criteria as the API names them."""
    asked = {"collections": ",".join(search.collections) or None, "bbox": search.bbox, "datetime": search.datetime,
             "query": search.query, "filter": search.filter}
    return " ".join(f"{name}={value}" for name, value in asked.items() if value) or "any item"


def _bounded_api_io(limits: NetworkLimits) -> Any:
    """pystac-client's reader within the network limits, retried as :func:`xstars_models.io.network.read_url`
    retries: each request waits at most ``timeout_s`` to connect and between bytes, and is tried
    again after ``retry_delay_s`` (then twice as long each time) on a timeout, a dropped or refused
    connection or a 5xx answer; what still fails becomes a typed error naming the request."""
    from pystac_client.exceptions import APIError
    from pystac_client.stac_api_io import StacApiIO

    class BoundedApiIO(StacApiIO):
        def request(self, href: str, method: str | None = None, headers: dict[str, str] | None = None,
                    parameters: dict[str, Any] | None = None) -> str:
            what = f"{method or 'GET'} {href}"
            for _ in limits.attempts():
                try:
                    return str(super().request(href, method=method, headers=headers, parameters=parameters))
                except APIError as err:
                    failure, again = _api_failure(err, what, limits)
                    if not again:
                        break
            raise failure from None

    # No retries inside requests: urllib3's would not cover a stall in the body, the loop above does.
    return BoundedApiIO(timeout=limits.timeout_s, max_retries=None)


def _api_failure(err: Exception, request: str, limits: NetworkLimits) -> tuple[XStarsError, bool]:
    """The typed error for a failed STAC API request, and whether to try it again. pystac-client
    wraps every failure in its ``APIError``; the requests exception it wrapped is the error's
    ``__context__``."""
    import requests
    import urllib3

    attempts = f"{limits.retries + 1} attempt" + ("s" if limits.retries else "")
    status = getattr(err, "status_code", None)
    if status is not None:
        answer = " ".join(str(err).split())[:300] or "(no body)"
        message = f"STAC API: {request} answered HTTP {status}: {answer}"
        if status < 500:
            return InvalidInputError(message + ".", field="url"), False
        return InvalidInputError(f"{message} ({attempts}).", field="url"), True
    cause = err.__context__
    # requests raises a stall before the headers as Timeout, one in the body as a ConnectionError
    # around urllib3's ReadTimeoutError; a refused connection is urllib3's NewConnectionError,
    # which it derives from ConnectTimeoutError.
    inner = cause.args[0] if isinstance(cause, requests.ConnectionError) and cause.args else cause
    reason = getattr(inner, "reason", inner)
    if isinstance(cause, requests.Timeout) or (
        isinstance(reason, urllib3.exceptions.TimeoutError) and not isinstance(reason, urllib3.exceptions.NewConnectionError)
    ):
        return NetworkTimeoutError(f"STAC API: {request} did not answer in time ({attempts}; {limits.describe()}).",
                                   field="url"), True
    return InvalidInputError(f"STAC API: cannot read {request}: {reason or err} ({attempts}; {limits.describe()}).",
                             field="url"), True


def _check_bbox(bbox: Any) -> tuple[float, float, float, float]:
    try:
        west, south, east, north = (float(v) for v in bbox)
    except (TypeError, ValueError):
        raise InvalidOptionError(f"bbox={bbox!r}: expected four numbers (west, south, east, north) in degrees.",
                                 field="bbox") from None
    if not all(math.isfinite(v) for v in (west, south, east, north)) or not (
        -180 <= west <= 180 and -180 <= east <= 180 and -90 <= south <= north <= 90
    ):
        raise InvalidOptionError(
            f"bbox={bbox!r}: expected (west, south, east, north) in degrees, longitudes in [-180, 180] and "
            "-90 <= south <= north <= 90.", field="bbox")
    return west, south, east, north


def _check_interval(text: Any) -> None:
    """Refuse what is not an RFC 3339 instant or interval (pystac-client would raise a bare
    ``Exception``)."""
    parts = text.split("/") if isinstance(text, str) else []
    try:
        if not 1 <= len(parts) <= 2:
            raise ValueError("one instant, or two separated by '/'")
        ends = [None if len(parts) == 2 and part in ("", "..") else _instant(part) for part in parts]
        if ends == [None, None]:
            raise ValueError("an interval open at both ends")
        if len(ends) == 2 and ends[0] is not None and ends[1] is not None and ends[0] > ends[1]:
            raise ValueError("its start is after its end")
    except ValueError as err:
        raise InvalidOptionError(
            f"datetime={text!r}: expected an RFC 3339 instant or interval such as 2024-01-01/2024-12-31 or "
            f"2024-06-01T00:00:00Z/.. ({err}).", field="datetime") from None


def _instant(text: str) -> dt.datetime:
    """A date (its first instant) or a date-time; UTC where no offset is given, as pystac-client
    sends it."""
    match = _INSTANT.fullmatch(text)
    if match is None:
        raise ValueError(f"{text!r} is not a date or date-time")
    *fields, fraction, offset = match.groups()
    zone = dt.timezone.utc
    if offset and offset not in "Zz":
        minutes = int(offset[1:3]) * 60 + int(offset[4:6])
        zone = dt.timezone(dt.timedelta(minutes=-minutes if offset[0] == "-" else minutes))
    year, month, day, hour, minute, second = (int(f or 0) for f in fields)
    microsecond = int((fraction or "0")[:6].ljust(6, "0"))
    return dt.datetime(year, month, day, hour, minute, second, microsecond, tzinfo=zone)  # ValueError: 2024-13-01


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


def _pystac_client() -> Any:
    try:
        import pystac_client
        import pystac_client.errors
        import pystac_client.warnings
    except ImportError:
        raise MissingExtraError("Searching a STAC API needs pystac-client: pip install 'xstars-models[archive]'.") from None
    return pystac_client


def _bounded_stac_io() -> Any:
    """pystac's default reader, except that URLs are fetched within the network limits."""

    class BoundedStacIO(_pystac().stac_io.DefaultStacIO):  # type: ignore[misc]
        def read_text(self, source: Any, *args: Any, **kwargs: Any) -> str:
            href = os.fspath(source)
            if _URL.match(href):
                return read_url(href, "STAC document", field="sources").decode("utf-8")
            return str(super().read_text(source, *args, **kwargs))

    return BoundedStacIO()
