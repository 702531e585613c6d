"""A file server on 127.0.0.1 that stalls on purpose, for the network limits' tests. The first part
of the path says how it misbehaves with the file named by the rest:

- ``/ok/<file>``: answers HEAD, GET and single byte ranges normally;
- ``/before-headers/<file>``: accepts the connection and sends nothing;
- ``/after-headers/<file>``: sends the status line and headers, then no body;
- ``/after-open/<file>``: answers ranges that start in the file's first 16 KiB (where a GeoTIFF's
  header and tile index are: enough to open it) and stalls on the rest (the pixels);
- ``/cut/<file>``: answers normally, except that while a file ``CUT`` exists in the served folder,
  a GET whose range reaches the byte offset written in it gets the full ``Content-Length`` but the
  body only up to that offset, and the connection closes there (a truncated transfer).

A stall lasts 10 minutes or until the server stops. It runs in its own process for the reason given
in range_server.py (GDAL's reads may hold the GIL)."""

from __future__ import annotations

import multiprocessing
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")
HEADER_BYTES = 16384
STALL_S = 600


def _handler(root: Path) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:
            pass

        def _stall(self) -> None:
            threading.Event().wait(STALL_S)

        def _answer(self) -> None:
            mode, _, name = unquote(urlsplit(self.path).path).lstrip("/").partition("/")
            path = (root / name).resolve()
            if root not in path.parents or not path.is_file():
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if mode == "before-headers":
                self._stall()
                return
            data = path.read_bytes()
            match = _RANGE.match(self.headers.get("Range") or "")
            start, end = (0, len(data) - 1) if not match else (int(match[1]), min(int(match[2] or len(data) - 1), len(data) - 1))
            if mode == "after-open" and start >= HEADER_BYTES:
                self._stall()
                return
            body = data[start : end + 1]
            self.send_response(206 if match else 200)
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Length", str(len(body)))
            if match:
                self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
            self.end_headers()
            if mode == "after-headers":
                self.wfile.flush()
                self._stall()
                return
            if self.command != "GET":
                return
            cut = root / "CUT"
            if mode == "cut" and cut.exists() and end >= int(cut.read_text()):
                self.wfile.write(body[: max(0, int(cut.read_text()) - start)])
                self.close_connection = True
                return
            self.wfile.write(body)

        def do_HEAD(self) -> None:
            self._answer()

        def do_GET(self) -> None:
            self._answer()

    return Handler


def _serve(root: str, ports: multiprocessing.Queue) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(Path(root).resolve()))
    server.daemon_threads = True
    ports.put(server.server_address[1])
    server.serve_forever()


class StallServer:
    """Serves ``root`` from a child process; :meth:`start` returns the base URL."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self._process: multiprocessing.Process | None = None

    def start(self) -> str:
        context = multiprocessing.get_context("spawn")
        ports = context.Queue()
        self._process = context.Process(target=_serve, args=(str(self.root), ports), daemon=True)
        self._process.start()
        return f"http://127.0.0.1:{ports.get(timeout=60)}"

    def stop(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.join(timeout=10)
