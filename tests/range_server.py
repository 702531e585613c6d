"""A static file server on 127.0.0.1 that answers HTTP range requests (as object stores and CDNs
serving cloud-optimised GeoTIFFs do) and counts the bytes it sends, so tests can check that a
remote read fetched only the windows it needed."""

from __future__ import annotations

import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


class RangeServer:
    """Serves the files of ``root``; ``bytes_sent`` and ``requests`` (method, path, Range header)
    accumulate until :meth:`clear_log`."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.bytes_sent = 0
        self.requests: list[tuple[str, str, str | None]] = []
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # keep test output clean
                pass

            def _file(self) -> Path | None:
                path = (server.root / unquote(urlsplit(self.path).path).lstrip("/")).resolve()
                return path if path.is_file() and server.root.resolve() in path.parents else None

            def _answer(self, body: bool) -> None:
                with server._lock:
                    server.requests.append((self.command, self.path, self.headers.get("Range")))
                path = self._file()
                if path is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data = path.read_bytes()
                start, end, status = 0, len(data) - 1, 200
                match = _RANGE.match(self.headers.get("Range") or "")
                if match and (match[1] or match[2]):
                    if match[1]:
                        start, end = int(match[1]), min(int(match[2]) if match[2] else len(data) - 1, len(data) - 1)
                    else:  # a suffix: the last N bytes
                        start = max(0, len(data) - int(match[2]))
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    status = 206
                chunk = data[start : end + 1]
                self.send_response(status)
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Length", str(len(chunk)))
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
                self.end_headers()
                if body:
                    self.wfile.write(chunk)
                    with server._lock:
                        server.bytes_sent += len(chunk)

            def do_HEAD(self) -> None:
                self._answer(body=False)

            def do_GET(self) -> None:
                self._answer(body=True)

        return Handler

    def start(self) -> str:
        self._thread.start()
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def clear_log(self) -> None:
        with self._lock:
            self.bytes_sent = 0
            self.requests.clear()
