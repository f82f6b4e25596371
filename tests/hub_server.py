"""A stand-in for the Hugging Face Hub on 127.0.0.1: serves checkpoint folders at /{repo}/resolve/{revision}/{file}
the way huggingface_hub reads them (HEAD with X-Repo-Commit, ETag and Content-Length; GET with Range; 404s with the
Hub's X-Error-Code), and can drop the connection halfway through a file, once."""

from __future__ import annotations

import hashlib
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

COMMIT = "0123456789abcdef0123456789abcdef01234567"
RESOLVE = re.compile(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")


class FakeHub:
    def __init__(self, repos: dict[str, Path]):
        self.repos = repos
        self.requests: list[tuple[str, str, str | None]] = []  # (method, file, Range header)
        self.drop_once: set[str] = set()  # file names whose next full GET stops halfway
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def do_HEAD(self):
                self._serve(body=False)

            def do_GET(self):
                self._serve(body=True)

            def _fail(self, code: str):
                self.send_response(404)
                self.send_header("X-Error-Code", code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def _serve(self, body: bool):
                m = RESOLVE.match(self.path.split("?")[0])
                if not m or m.group(1) not in hub.repos:
                    return self._fail("RepoNotFound")
                repo, revision, name = m.groups()
                hub.requests.append((self.command, name, self.headers.get("Range")))
                if revision not in ("main", COMMIT):
                    return self._fail("RevisionNotFound")
                path = hub.repos[repo] / name
                if not path.is_file():
                    return self._fail("EntryNotFound")
                data = path.read_bytes()
                start, status = 0, 200
                ranged = re.match(r"bytes=(\d+)-(\d*)", self.headers.get("Range") or "")
                if ranged:
                    start = int(ranged.group(1))
                    end = int(ranged.group(2)) + 1 if ranged.group(2) else len(data)
                    data, status = data[start:end], 206
                self.send_response(status)
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("ETag", '"' + hashlib.sha256(path.read_bytes()).hexdigest() + '"')
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Accept-Ranges", "bytes")
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{start + len(data) - 1}/{path.stat().st_size}")
                self.end_headers()
                if not body:
                    return
                if name in hub.drop_once and start == 0 and status == 200:
                    hub.drop_once.discard(name)
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def downloads(self, name: str) -> list[str | None]:
        """The Range header of each GET of a file (None: the whole file)."""
        return [r for method, n, r in self.requests if method == "GET" and n == name]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
