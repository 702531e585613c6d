"""A tiny STAC API on 127.0.0.1 for the search tests: landing page ``/``, ``/conformance``,
``/collections``, ``/collections/{id}``, ``/collections/{id}/items/{item}`` and ``/search`` (GET
with query parameters, POST with a JSON body), filtering by ``collections``, ``bbox`` (items whose
bbox intersects it) and ``datetime`` (an item's instant inside the interval, ends included), in
pages of ``limit`` items (default ``page_size``, 10) chained by ``next`` links that carry a ``token`` (the offset).

Served from threads of the test process: pystac-client's requests are plain Python sockets, and the
search is over before GDAL reads any pixels (from the range server's own process).

Options: ``post=False`` advertises only GET and answers 405 to a POST search; ``fail=status``
answers every ``/search`` with that status; ``stall=True`` answers the first page of a search and
never the following ones (until :meth:`stop`). ``requests`` logs (method, path with query, JSON body).
"""

from __future__ import annotations

import datetime as dt
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

CONFORMANCE = [
    "https://api.stacspec.org/v1.0.0/core",
    "https://api.stacspec.org/v1.0.0/item-search",
    "https://api.stacspec.org/v1.0.0/collections",
    "http://www.opengis.net/spec/ogcapi-features-1/conf/1.0/core",
]
GEOJSON = "application/geo+json"


def _instant(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


def _in_interval(stamp: str, interval: str) -> bool:
    start, _, end = interval.partition("/") if "/" in interval else (interval, "", interval)
    when = _instant(stamp)
    return (start in ("", "..") or _instant(start) <= when) and (end in ("", "..") or when <= _instant(end))


def _intersects(box: list[float], query: list[float]) -> bool:
    return box[0] <= query[2] and query[0] <= box[2] and box[1] <= query[3] and query[1] <= box[3]


class StacApiServer:
    """Serves ``items`` (STAC Item dicts, each with ``collection``, ``bbox`` and a
    ``properties.datetime``) from ``collections`` (Collection dicts)."""

    def __init__(self, collections: list[dict[str, Any]], items: list[dict[str, Any]], *, post: bool = True,
                 fail: int | None = None, stall: bool = False, page_size: int = 10) -> None:
        self.collections, self.items, self.post, self.fail, self.stall = collections, items, post, fail, stall
        self.page_size = page_size
        self.requests: list[tuple[str, str, Any]] = []
        self._httpd: ThreadingHTTPServer | None = None
        self._stopped = threading.Event()

    def start(self) -> str:
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._httpd.daemon_threads = True
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def stop(self) -> None:
        self._stopped.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()

    def search(self, base: str, method: str, params: dict[str, Any]) -> dict[str, Any]:
        """One page of results for ``params`` (POST body form: lists; GET form: strings)."""
        collections = params.get("collections")
        if isinstance(collections, str):
            collections = collections.split(",")
        bbox = params.get("bbox")
        if isinstance(bbox, str):
            bbox = [float(v) for v in bbox.split(",")]
        interval = params.get("datetime")
        found = [
            item for item in self.items
            if (not collections or item["collection"] in collections)
            and (bbox is None or _intersects(item["bbox"], bbox))
            and (interval is None or _in_interval(item["properties"]["datetime"], interval))
        ]
        limit, start = int(params.get("limit") or self.page_size), int(params.get("token") or 0)
        page = found[start : start + limit]
        links = [{"rel": "root", "href": f"{base}/", "type": "application/json"}]
        if start + limit < len(found):
            following = {**params, "token": start + limit}
            if method == "POST":
                links.append({"rel": "next", "href": f"{base}/search", "type": GEOJSON, "method": "POST",
                              "body": following, "merge": False})
            else:
                links.append({"rel": "next", "href": f"{base}/search?{urlencode(following)}", "type": GEOJSON})
        return {"type": "FeatureCollection", "features": page, "links": links, "numberMatched": len(found),
                "numberReturned": len(page)}

    def landing(self, base: str) -> dict[str, Any]:
        methods = ["GET", "POST"] if self.post else ["GET"]
        return {
            "type": "Catalog", "id": "loopback-api", "stac_version": "1.0.0", "description": "a test STAC API",
            "conformsTo": CONFORMANCE,
            "links": [
                {"rel": "self", "href": f"{base}/", "type": "application/json"},
                {"rel": "root", "href": f"{base}/", "type": "application/json"},
                {"rel": "conformance", "href": f"{base}/conformance", "type": "application/json"},
                {"rel": "data", "href": f"{base}/collections", "type": "application/json"},
                *({"rel": "search", "href": f"{base}/search", "type": GEOJSON, "method": m} for m in methods),
            ],
        }

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # ``requests`` replaces stderr lines
                pass

            def _send(self, status: int, document: Any) -> None:
                body = json.dumps(document).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _route(self, body: Any) -> None:
                base = f"http://{self.headers['Host']}"
                parts = urlsplit(self.path)
                path = parts.path.rstrip("/").split("/")[1:]
                server.requests.append((self.command, self.path, body))
                collections = {c["id"]: c for c in server.collections}
                if path == ["search"]:
                    if server.fail is not None:
                        self._send(server.fail, {"code": "Failure", "description": "the search failed on purpose"})
                    elif self.command == "POST" and not server.post:
                        self._send(405, {"code": "MethodNotAllowed", "description": "POST is not supported"})
                    else:
                        params = body if self.command == "POST" else {k: v[0] for k, v in parse_qs(parts.query).items()}
                        if server.stall and params.get("token"):
                            server._stopped.wait()
                            return
                        self._send(200, server.search(base, self.command, params))
                elif self.command != "GET":
                    self._send(405, {"code": "MethodNotAllowed", "description": f"{self.command} {parts.path}"})
                elif path == []:
                    self._send(200, server.landing(base))
                elif path == ["conformance"]:
                    self._send(200, {"conformsTo": CONFORMANCE})
                elif path == ["collections"]:
                    self._send(200, {"collections": list(collections.values()), "links": []})
                elif len(path) == 2 and path[0] == "collections" and path[1] in collections:
                    self._send(200, collections[path[1]])
                elif len(path) == 4 and path[0] == "collections" and path[2] == "items":
                    found = [i for i in server.items if i["collection"] == path[1] and i["id"] == path[3]]
                    self._send(200 if found else 404, found[0] if found else {"code": "NotFound"})
                else:
                    self._send(404, {"code": "NotFound", "description": parts.path})

            def do_GET(self) -> None:
                self._route(None)

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                self._route(json.loads(self.rfile.read(length) or b"{}"))

        return Handler
