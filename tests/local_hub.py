"""A model hub on 127.0.0.1 for tests, answering the routes ``huggingface_hub`` calls the way
the real hub does, plus plain file URLs:

* ``HEAD|GET /{org}/{name}/resolve/{rev}/{path}``: ``X-Repo-Commit``; for an LFS file a
  302 to ``http://localhost:{port}/cdn/{sha256}`` (another host, as the real CDN is, so
  ``huggingface_hub`` reads ``X-Linked-Etag`` / ``X-Linked-Size`` off the redirect and
  the token is not sent on); for a small file 200 with ``ETag`` = its git blob id.
* ``GET /api/models/{org}/{name}/revision/{rev}[?blobs=true]``: the repo's commit and its
  files (``siblings`` with ``size``, ``blobId``, ``lfs``).
* ``GET /cdn/{sha256}`` and ``GET /files/{name}``: the bytes, with ``Range`` / ``If-Range``.
* Errors carry ``X-Error-Code`` (``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``).

Faults for tests: :attr:`LocalHub.cut` (paths whose next GET sends half the body and
drops the connection; with :attr:`LocalHub.down_after_cut` they then answer 503),
:attr:`LocalHub.down` (paths answering 503), :attr:`LocalHub.lie` (paths served with other
bytes than the hub declares). :attr:`LocalHub.log` records every request as ``(method, path, Range)``.

A threaded stdlib server: the code under test runs in other threads or processes and
talks real HTTP to it.
"""

from __future__ import annotations

import hashlib
import json
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    commit: str
    files: dict[str, bytes]
    lfs: set[str]


@dataclass
class LocalHub:
    port: int = 0
    repos: dict[str, Repo] = field(default_factory=dict)
    urls: dict[str, bytes] = field(default_factory=dict)
    cut: set[str] = field(default_factory=set)
    lie: set[str] = field(default_factory=set)
    down: set[str] = field(default_factory=set)
    down_after_cut: bool = False
    rate: float | None = None
    """Bytes per second each body is sent at (``None``: as fast as it goes)."""
    log: list[tuple[str, str, str | None]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def add_repo(self, repo: str, files: dict[str, bytes], *, lfs_over: int = 1024) -> str:
        """Publish ``files`` as ``repo``; files bigger than ``lfs_over`` are LFS files.
        Returns the commit."""
        commit = hashlib.sha1(repo.encode() + "".join(sorted(files)).encode()).hexdigest()
        self.repos[repo] = Repo(commit, dict(files), {p for p, d in files.items() if len(d) > lfs_over})
        return commit

    def add_url(self, name: str, data: bytes) -> str:
        self.urls[name] = data
        return f"{self.url}/files/{name}"

    def gets(self, path_part: str) -> list[str | None]:
        """The Range headers of the GETs whose path contains ``path_part``."""
        return [rng for method, path, rng in self.log if method == "GET" and path_part in path]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hub: LocalHub

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    def do_HEAD(self) -> None:
        self._route(head=True)

    def do_GET(self) -> None:
        self._route(head=False)

    def _route(self, *, head: bool) -> None:
        hub = self.hub
        path = unquote(urlsplit(self.path).path)
        hub.log.append(("HEAD" if head else "GET", path, self.headers.get("Range")))
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] == "revision":
            return self._api(f"{parts[2]}/{parts[3]}", parts[5])
        if parts[0] == "cdn" and len(parts) == 2:
            for repo in hub.repos.values():
                for name, data in repo.files.items():
                    if hashlib.sha256(data).hexdigest() == parts[1]:
                        return self._bytes(path, data, etag=parts[1], head=head)
            return self._error(404, "EntryNotFound")
        if parts[0] == "files" and len(parts) == 2 and parts[1] in hub.urls:
            data = hub.urls[parts[1]]
            return self._bytes(path, data, etag=hashlib.sha256(data).hexdigest()[:16], head=head)
        if len(parts) >= 5 and parts[2] == "resolve":
            return self._resolve(f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]), head=head)
        self._error(404, "RepoNotFound")

    def _repo(self, name: str, rev: str) -> Repo | None:
        repo = self.hub.repos.get(name)
        if repo is None:
            self._error(404, "RepoNotFound")
        elif rev not in ("main", repo.commit):
            self._error(404, "RevisionNotFound")
            return None
        return repo

    def _api(self, name: str, rev: str) -> None:
        repo = self._repo(name, rev)
        if repo is None:
            return
        siblings = []
        for path, data in sorted(repo.files.items()):
            sib = {"rfilename": path, "size": len(data), "blobId": git_blob_id(data)}
            if path in repo.lfs:
                sib["lfs"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "pointerSize": 134}
            siblings.append(sib)
        body = json.dumps({"id": name, "modelId": name, "sha": repo.commit, "private": False,
                           "siblings": siblings}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _resolve(self, name: str, rev: str, file: str, *, head: bool) -> None:
        repo = self._repo(name, rev)
        if repo is None:
            return
        data = repo.files.get(file)
        if data is None:
            return self._error(404, "EntryNotFound", commit=repo.commit)
        if file in repo.lfs:
            sha = hashlib.sha256(data).hexdigest()
            self.send_response(302)
            self.send_header("Location", f"http://localhost:{self.hub.port}/cdn/{sha}")
            self.send_header("X-Repo-Commit", repo.commit)
            self.send_header("X-Linked-Etag", f'"{sha}"')
            self.send_header("X-Linked-Size", str(len(data)))
            self.send_header("ETag", f'"{git_blob_id(data)}"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self._bytes(unquote(urlsplit(self.path).path), data, etag=git_blob_id(data), head=head, commit=repo.commit)

    def _bytes(self, path: str, data: bytes, *, etag: str, head: bool, commit: str | None = None) -> None:
        hub = self.hub
        if path in hub.down:
            return self._error(503, "Unavailable")
        if path in hub.lie:
            data = bytes(b ^ 0xFF for b in data[:64]) + data[64:]
        start = 0
        rng = self.headers.get("Range")
        if_range = self.headers.get("If-Range")
        if rng and rng.startswith("bytes=") and (if_range is None or if_range.strip('"') == etag):
            start = int(rng[len("bytes="):].split("-")[0])
        if start >= len(data) and rng:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(data)}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = data[start:]
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", f'"{etag}"')
        if commit is not None:
            self.send_header("X-Repo-Commit", commit)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if head:
            return
        if path in hub.cut and not start:
            hub.cut.discard(path)
            if hub.down_after_cut:
                hub.down.add(path)
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        if hub.rate is None:
            self.wfile.write(body)
            return
        step = 64 * 1024
        for i in range(0, len(body), step):
            self.wfile.write(body[i : i + step])
            time.sleep(step / hub.rate)

    def _error(self, status: int, code: str, commit: str | None = None) -> None:
        body = json.dumps({"error": code}).encode()
        self.send_response(status)
        self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", code)
        if commit is not None:
            self.send_header("X-Repo-Commit", commit)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        # A client that gives up mid-download (a test of a full disk, a cancelled load)
        # breaks the handler's write; that is the client's choice, not a fault of the hub.
        # Anything else is still printed, as socketserver does.
        exc = sys.exc_info()[1]
        if isinstance(exc, (BrokenPipeError, ConnectionResetError)):
            return
        super().handle_error(request, client_address)


@contextmanager
def serve_hub() -> Iterator[LocalHub]:
    """Run a :class:`LocalHub` on 127.0.0.1 (a free port) for the duration of the block."""
    hub = LocalHub()
    handler = type("Handler", (_Handler,), {"hub": hub})
    server = _Server(("127.0.0.1", 0), handler)
    hub.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield hub
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
