"""A static file server on 127.0.0.1 that answers HTTP range requests (as object stores and CDNs
serving cloud-optimised GeoTIFFs do) and logs the bytes it sends, so tests can check that a remote
read fetched only the windows it needed.

It runs in its own process: GDAL's HTTP reads come from C code that may hold the Python GIL while
it waits, which would starve a server thread in the test process."""

from __future__ import annotations

import json
import multiprocessing
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


def _handler(root: Path, log: Path) -> type[BaseHTTPRequestHandler]:
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # the JSON log below replaces stderr lines
            pass

        def _record(self, sent: int) -> None:
            # Logged before the body goes out, so a client that has its bytes finds them logged.
            with lock, open(log, "a") as fh:
                fh.write(json.dumps([self.command, self.path, self.headers.get("Range"), sent]) + "\n")

        def _file(self) -> Path | None:
            path = (root / unquote(urlsplit(self.path).path).lstrip("/")).resolve()
            return path if path.is_file() and root in path.parents else None

        def _reply(self, status: int, headers: dict[str, str], body: bytes) -> None:
            self._record(len(body) if self.command == "GET" else 0)
            self.send_response(status)
            for key, value in {**headers, "Content-Length": str(len(body))}.items():
                self.send_header(key, value)
            self.end_headers()
            if self.command == "GET":
                self.wfile.write(body)

        def _answer(self) -> None:
            path = self._file()
            if path is None:
                self._reply(404, {}, b"")
                return
            data = path.read_bytes()
            match = _RANGE.match(self.headers.get("Range") or "")
            if not (match and (match[1] or match[2])):  # no (single) range: the whole file
                self._reply(200, {"Accept-Ranges": "bytes"}, data)
                return
            if match[1]:
                start, end = int(match[1]), min(int(match[2]) if match[2] else len(data) - 1, len(data) - 1)
            else:  # a suffix: the last N bytes
                start, end = max(0, len(data) - int(match[2])), len(data) - 1
            if start >= len(data):
                self._reply(416, {"Content-Range": f"bytes */{len(data)}"}, b"")
                return
            self._reply(206, {"Accept-Ranges": "bytes", "Content-Range": f"bytes {start}-{end}/{len(data)}"}, data[start : end + 1])

        def do_HEAD(self) -> None:
            self._answer()

        def do_GET(self) -> None:
            self._answer()

    return Handler


def _serve(root: str, log: str, ports: multiprocessing.Queue) -> None:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(Path(root).resolve(), Path(log)))
    ports.put(httpd.server_address[1])
    httpd.serve_forever()


class RangeServer:
    """Serves the files of ``root`` from a child process; ``requests`` (method, path, Range
    header) and ``bytes_sent`` cover everything since the last :meth:`clear_log`."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.log = self.root.parent / f".{self.root.name}.requests.jsonl"
        self.log.write_text("")
        self._process: multiprocessing.Process | None = None

    def start(self) -> str:
        context = multiprocessing.get_context("spawn")
        ports = context.Queue()
        self._process = context.Process(target=_serve, args=(str(self.root), str(self.log), ports), daemon=True)
        self._process.start()
        return f"http://127.0.0.1:{ports.get(timeout=60)}"

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.join(timeout=10)

    def _entries(self) -> list[list]:
        return [json.loads(line) for line in self.log.read_text().splitlines() if line]

    @property
    def requests(self) -> list[tuple[str, str, str | None]]:
        return [(method, path, byte_range) for method, path, byte_range, _ in self._entries()]

    @property
    def bytes_sent(self) -> int:
        return sum(entry[3] for entry in self._entries())

    def clear_log(self) -> None:
        self.log.write_text("")
