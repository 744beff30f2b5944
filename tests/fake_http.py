"""A tiny HTTP file server for download tests: byte strings in, recorded requests out.

``serve(files)`` starts a threaded stdlib HTTP server on 127.0.0.1 (a free port) that answers ``GET <path>``
with ``files[path]``; an unknown path answers 404. A ``Range: bytes=N-`` header gets ``206 Partial Content``
from byte N on (``416`` when N is at or past the end), as a real file server resumes a download.

``server.drop_after = K`` makes the next response announce its full length but send only K body bytes and
then close the connection, once (the attribute resets to None). Every request's path and ``Range`` header
(None when absent) is recorded in ``server.requests`` in arrival order.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_RANGE = re.compile(r"^bytes=(\d+)-$")


class FileServer(ThreadingHTTPServer):
    """The server object: ``files``, ``requests``, ``drop_after`` and the ``url(path)`` of a served file."""

    daemon_threads = True

    def __init__(self, files: dict[str, bytes]):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files = dict(files)
        self.requests: list[tuple[str, str | None]] = []
        self.drop_after: int | None = None
        self.lock = threading.Lock()

    def url(self, path: str) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}{path}"


class _Handler(BaseHTTPRequestHandler):
    server: FileServer

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        return None

    def do_GET(self) -> None:  # noqa: N802 - the name http.server dispatches to
        header = self.headers.get("Range")
        with self.server.lock:
            self.server.requests.append((self.path, header))
            drop, self.server.drop_after = self.server.drop_after, None
        data = self.server.files.get(self.path)
        if data is None:
            self._empty(404)
            return
        start = 0
        if header is not None:
            match = _RANGE.match(header)
            if match is None:
                self._empty(400)
                return
            start = int(match.group(1))
            if start >= len(data):
                self._empty(416, {"Content-Range": f"bytes */{len(data)}"})
                return
        body = data[start:]
        self.send_response(206 if header is not None else 200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        if header is not None:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        if drop is not None:
            self.wfile.write(body[:drop])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)

    def _empty(self, status: int, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", "0")
        self.end_headers()


@contextmanager
def serve(files: dict[str, bytes]) -> Iterator[FileServer]:
    """Run a :class:`FileServer` for ``files`` in a background thread for the duration of the block."""
    server = FileServer(files)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
