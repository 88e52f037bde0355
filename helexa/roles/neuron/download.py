"""One file over HTTP(S) into a partial file of the model cache: resumable, verified,
cancellable, on trio (httpx's async client), never blocking the neuron's event loop.

* Resume: the partial file outlives the process. A later attempt (a dropped connection
  retried here, or a load after a restart) asks for ``Range: bytes=<have>-`` with
  ``If-Range`` set to the validator (strong ETag, else Last-Modified) the server gave the
  first time; a server that answers 200 instead of 206 (it changed the file, or ignores
  ranges) is downloaded from the start again.
* Integrity: the SHA-256 of the whole file (and the git blob SHA-1, for hub files that are
  not in LFS) is computed as it is written and compared with what is expected; a mismatch
  removes the partial file. Writing and hashing run on a worker thread, 1 MiB at a time.
* Deadlines: connect and read timeouts on every request (a stalled server is a dropped
  connection); a connection that fails is retried with backoff, up to ``retries`` times in
  a row without progress.

Exception tree::

    DownloadError          ``code``: model_not_found (404), unauthorized (401/403),
                           hash_mismatch, disk_full (ENOSPC while writing),
                           download_failed (anything else: HTTP errors, retries exhausted)
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import httpx
import trio

from helexa.logs import redact

log = logging.getLogger(__name__)

WRITE_CHUNK = 1024 * 1024
"""Bytes written (and reported) at a time: progress moves at least every MiB."""
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


class DownloadError(Exception):
    """A fetch failed; its message has any URL's userinfo and query string masked
    (:func:`helexa.logs.redact`: it travels to the cortex, its views and logs)."""

    def __init__(self, message: str, *, code: str = "download_failed") -> None:
        super().__init__(redact(message))
        self.code = code


@dataclass(frozen=True, slots=True)
class RemoteFile:
    """One file to fetch.

    Attributes:
        rel: its path inside the source's tree (``model.gguf``, ``tokenizer/config.json``).
        url: where to GET it (redirects are followed; ``Authorization`` is dropped when one
            leaves the origin).
        size: its size, when known before the download (the hub says; a URL may not).
        sha256: its expected SHA-256, when known.
        git_sha1: its expected git blob id (hub files not stored in LFS), when known.
        headers: sent with every request (the hub's token).
    """

    rel: str
    url: str
    size: int | None = None
    sha256: str | None = None
    git_sha1: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)


class _Digest:
    """SHA-256 (and, when the size is known up front, the git blob SHA-1) of a stream."""

    def __init__(self, size: int | None, want_git: bool) -> None:
        self.sha256 = hashlib.sha256()
        self.git = hashlib.sha1(f"blob {size}\0".encode()) if want_git and size is not None else None

    def update(self, data: bytes | memoryview) -> None:
        self.sha256.update(data)
        if self.git is not None:
            self.git.update(data)


def _write(f: BinaryIO, digest: _Digest, data: bytes) -> None:
    f.write(data)
    digest.update(data)


def _hash_prefix(path: Path, digest: _Digest, have: int) -> None:
    with path.open("rb") as f:
        left = have
        while left:
            block = f.read(min(WRITE_CHUNK, left))
            if not block:
                raise OSError(f"{path} is shorter than {have} bytes")
            digest.update(block)
            left -= len(block)


class _Restart(Exception):
    """The server cannot resume: start again from byte 0."""


async def download(
    client: httpx.AsyncClient,
    file: RemoteFile,
    part: Path,
    *,
    on_bytes: Callable[[int], None] = lambda n: None,
    on_total: Callable[[int | None, int], None] = lambda total, have: None,
    retries: int = 5,
    backoff: float = 1.0,
) -> str:
    """Fetch ``file`` into ``part`` (resuming what is there) and verify it.

    Args:
        client: the HTTP client (its timeouts are the deadlines).
        part: the partial file; its sidecar ``part.with_suffix(".json")`` remembers the
            server's validator.
        on_bytes: called with the bytes written so far, after each write.
        on_total: called once, before the first byte of the body is written, with the
            file's size (``None`` if nobody knows) and the bytes already there; it may
            raise (no room) to stop the download before it starts.
        retries: attempts in a row without progress before giving up.

    Returns the file's SHA-256 (hex). Raises :class:`DownloadError`; on a hash mismatch
    the partial file is removed. Cancellation leaves the partial file to resume later.
    """
    sidecar = part.with_suffix(".json")
    have, validator = _resume_state(part, sidecar, file.url)
    got = _Written(have, _Digest(file.size, file.git_sha1 is not None))
    if have:
        await trio.to_thread.run_sync(_hash_prefix, part, got.digest, have)
    announced = False
    failures = 0
    while True:
        headers = {**file.headers, "Accept-Encoding": "identity"}
        if got.bytes:
            headers["Range"] = f"bytes={got.bytes}-"
            if validator:
                headers["If-Range"] = validator
        before = got.bytes
        try:
            async with client.stream("GET", file.url, headers=headers) as resp:
                total = _check_response(resp, file, got.bytes)
                if resp.status_code == 416:  # asked for bytes past the end: we have it all
                    break
                if resp.status_code == 200 and got.bytes:
                    log.info("%s: the server cannot resume; downloading again from the start", file.url)
                    raise _Restart
                validator = _validator(resp)
                sidecar.write_text(json.dumps({"url": file.url, "validator": validator}))
                if not announced:
                    announced = True
                    on_total(total, got.bytes)
                await _receive(resp, part, got, on_bytes)
            if total is None or got.bytes >= total:
                break
            raise httpx.RemoteProtocolError(f"the body ended at {got.bytes} of {total} bytes")
        except _Restart:
            part.unlink(missing_ok=True)
            got = _Written(0, _Digest(file.size, file.git_sha1 is not None))
            validator = None
        except httpx.TransportError as exc:
            failures = 0 if got.bytes > before else failures + 1
            if failures > retries:
                raise DownloadError(f"downloading {file.url} failed after {retries} retries: "
                                    f"{type(exc).__name__}: {exc}") from None
            log.warning("downloading %s: %s at %d bytes; resuming", file.url, exc or type(exc).__name__, got.bytes)
            await trio.sleep(0 if got.bytes > before else backoff * 2 ** (failures - 1))
    if file.size is not None and got.bytes != file.size:
        _discard(part)
        raise DownloadError(f"{file.url}: got {got.bytes} bytes, expected {file.size}")
    return _verify(file, part, got.digest)


@dataclass(slots=True)
class _Written:
    """What the partial file holds: its length and the digest of exactly those bytes."""

    bytes: int
    digest: _Digest


def _resume_state(part: Path, sidecar: Path, url: str) -> tuple[int, str | None]:
    try:
        have = part.stat().st_size
        state = json.loads(sidecar.read_text())
    except (OSError, ValueError):
        part.unlink(missing_ok=True)
        return 0, None
    if not isinstance(state, dict) or state.get("url") != url:
        part.unlink(missing_ok=True)
        return 0, None
    return have, state.get("validator")


def _check_response(resp: httpx.Response, file: RemoteFile, have: int) -> int | None:
    """The file's total size from a response; raises for statuses that are not a body."""
    status = resp.status_code
    if status == 416 and have and file.size in (None, have):
        return have
    if status == 404:
        raise DownloadError(f"{file.url}: not found (HTTP 404)", code="model_not_found")
    if status in (401, 403):
        raise DownloadError(f"{file.url}: access refused (HTTP {status}); is a token needed?", code="unauthorized")
    if status in (429, 500, 502, 503, 504):
        raise httpx.RemoteProtocolError(f"HTTP {status}")  # transient: retried
    if status == 206:
        m = _CONTENT_RANGE.fullmatch(resp.headers.get("Content-Range", ""))
        if m is None or int(m.group(1)) != have:
            raise _Restart
        total = None if m.group(3) == "*" else int(m.group(3))
    elif status == 200:
        length = resp.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
    else:
        raise DownloadError(f"{file.url}: HTTP {status}")
    if file.size is not None and total is not None and total != file.size:
        raise DownloadError(f"{file.url}: the server has {total} bytes, expected {file.size}")
    return total if total is not None else file.size


def _validator(resp: httpx.Response) -> str | None:
    etag = resp.headers.get("ETag")
    if etag and not etag.startswith("W/"):
        return etag
    return resp.headers.get("Last-Modified")


async def _receive(resp: httpx.Response, part: Path, got: _Written, on_bytes: Callable[[int], None]) -> None:
    """Append the body to ``part``, keeping ``got`` true to the file even when the
    connection fails or the task is cancelled half-way."""
    buffer = bytearray()
    with part.open("ab" if got.bytes else "wb") as f:
        try:
            async for chunk in resp.aiter_raw():
                buffer += chunk
                if len(buffer) >= WRITE_CHUNK:
                    await _flush(f, got, buffer)
                    on_bytes(got.bytes)
        finally:
            if buffer:
                with trio.CancelScope(shield=True):
                    await _flush(f, got, buffer)
                on_bytes(got.bytes)


async def _flush(f: BinaryIO, got: _Written, buffer: bytearray) -> None:
    data = bytes(buffer)
    buffer.clear()
    try:
        await trio.to_thread.run_sync(_write, f, got.digest, data)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise DownloadError("the disk filled up during the download", code="disk_full") from None
        raise DownloadError(f"cannot write {f.name}: {exc.strerror or exc}") from None
    got.bytes += len(data)


def _verify(file: RemoteFile, part: Path, digest: _Digest) -> str:
    got = digest.sha256.hexdigest()
    if file.sha256 is not None and got != file.sha256:
        _discard(part)
        raise DownloadError(f"{file.url}: SHA-256 mismatch (expected {file.sha256}, got {got}); "
                            "the download was removed", code="hash_mismatch")
    if file.git_sha1 is not None and digest.git is not None and digest.git.hexdigest() != file.git_sha1:
        _discard(part)
        raise DownloadError(f"{file.url}: git blob id mismatch (expected {file.git_sha1}, "
                            f"got {digest.git.hexdigest()}); the download was removed", code="hash_mismatch")
    return got


def _discard(part: Path) -> None:
    part.unlink(missing_ok=True)
    part.with_suffix(".json").unlink(missing_ok=True)
