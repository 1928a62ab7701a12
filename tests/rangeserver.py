"""A small HTTP server with byte-range support, to read ROOT files remotely in tests."""

from __future__ import annotations

import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class RangeServer:
    """Serve the files of a folder on 127.0.0.1; `fail_after` requests, then answer 503."""

    def __init__(self, folder: Path, fail_after: int | None = None) -> None:
        self.folder = folder
        self.fail_after = fail_after
        self.requests = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                return

            def _body(self) -> tuple[bytes, int, int, int] | None:
                path = server.folder / self.path.lstrip("/")
                if not path.is_file():
                    self.send_error(404)
                    return None
                data = path.read_bytes()
                match = re.match(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
                if match:
                    start = int(match.group(1))
                    stop = int(match.group(2)) + 1 if match.group(2) else len(data)
                    return data[start:stop], start, min(stop, len(data)), len(data)
                return data, 0, len(data), len(data)

            def _answer(self, with_body: bool) -> None:
                server.requests += 1
                if server.fail_after is not None and server.requests > server.fail_after:
                    self.send_error(503, "server going away")
                    return
                found = self._body()
                if found is None:
                    return
                body, start, stop, total = found
                partial = "Range" in self.headers
                self.send_response(206 if partial else 200)
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Length", str(len(body)))
                if partial:
                    self.send_header("Content-Range", f"bytes {start}-{stop - 1}/{total}")
                self.end_headers()
                if with_body:
                    self.wfile.write(body)

            def do_GET(self) -> None:
                self._answer(with_body=True)

            def do_HEAD(self) -> None:
                self._answer(with_body=False)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{name}"

    def __enter__(self) -> RangeServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
