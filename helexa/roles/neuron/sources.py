"""Model sources: what the neuron fetches before a backend loads, and from where.

:meth:`ModelSources.fetch` turns a :class:`~helexa.protocol.ModelConfig`'s ``source`` into
a local path (:class:`Fetched`), which the registry hands the backend as ``metadata.path``:

* an absolute path is used in place (checked against ``sha256`` when one is given);
* ``hf://ORG/REPO[@REV]/FILE`` and ``hf://ORG/REPO[@REV]`` are resolved with the hub
  (:mod:`.hub`) and fetched into the model cache (:mod:`.cache`);
* an ``https://`` URL is fetched into the cache.

A source already in the cache is used with no network at all (an unpinned hub source is
therefore fetched once per neuron, until it is evicted). Otherwise the fetch checks that
the bytes fit before it starts (``disk_full`` otherwise), downloads with progress (stage
``download``, in bytes, to every load waiting for it), resumes partial files
(:mod:`.download`), verifies every file against ``sha256`` and the hub's own hashes, and
records the source. Fetches are single-flight per source: concurrent loads of models with
the same source download it once and share the outcome. A fetched source stays in use
(never evicted) until :meth:`ModelSources.release`.

Failures raise :class:`~helexa.runtime.LoadFailed` with one line and a ``code``:
``model_not_found``, ``unauthorized``, ``hash_mismatch``, ``disk_full``,
``download_failed``.
"""

from __future__ import annotations

import errno
import hashlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlsplit

import httpx
import trio

from helexa.logs import redact
from helexa.protocol import ModelConfig, ModelSource, SourceKind, cache_key
from helexa.runtime import LoadFailed, ProgressFn

from . import hub
from .cache import ModelCache, NoRoom, Reservation, human, source_key
from .config import SourcesConfig
from .download import DownloadError, RemoteFile, download

log = logging.getLogger(__name__)

GB = 1024**3


@dataclass(frozen=True, slots=True)
class Fetched:
    """A source on local disk: ``path`` (a file, or a directory for a whole repository);
    ``key`` is its cache entry (``None`` for a path used in place)."""

    path: Path
    key: str | None = None

    def apply(self, config: ModelConfig) -> ModelConfig:
        """``config`` as the backend should see it: the local path in ``metadata.path``."""
        return replace(config, metadata={**config.metadata, "path": str(self.path)})


@dataclass
class _Flight:
    """One fetch in progress, shared by every load that wants the same source."""

    listeners: list[ProgressFn] = field(default_factory=list)
    done: trio.Event = field(default_factory=trio.Event)
    error: LoadFailed | None = None

    def report(self, done: int, total: int | None) -> None:
        for listener in list(self.listeners):
            listener("download", done, total, "bytes")


@dataclass
class _Meter:
    """Bytes of one fetch: progress for the loads waiting on it, and the room still held."""

    flight: _Flight
    total: int | None
    reservations: list[Reservation] = field(default_factory=list)
    done: int = 0
    """Bytes of the files finished so far."""
    file: int = 0
    """Bytes of the current file."""

    def start_file(self, already: int) -> None:
        self.file = already
        self.flight.report(self.done + already, self.total)

    def written(self, now: int) -> None:
        grown, self.file = now - self.file, now
        for r in reversed(self.reservations):  # what has arrived needs no reserving any more
            taken = min(r.nbytes, grown)
            r.nbytes -= taken
            grown -= taken
        self.flight.report(self.done + now, self.total)

    def end_file(self) -> None:
        self.done += self.file
        self.file = 0


@dataclass
class _KeyLock:
    """A download lock and how many downloads hold or wait for it."""

    lock: trio.Lock = field(default_factory=trio.Lock)
    users: int = 0


class ModelSources:
    """The neuron's model sources and their cache (see the module docstring).

    Args:
        config: the neuron's ``[sources]`` table.
        cache: the store (built from ``config`` by default; tests inject a free-space probe
            through it).
    """

    def __init__(self, config: SourcesConfig | None = None, *, cache: ModelCache | None = None) -> None:
        self.config = config or SourcesConfig()
        self.cache = cache or ModelCache(
            self.config.cache_path(),
            limit_bytes=int(self.config.cache_max_gb * GB),
            min_free_bytes=int(self.config.min_free_gb * GB),
        )
        self._flights: dict[str, _Flight] = {}
        self._writing: dict[str, _KeyLock] = {}
        """One download at a time of the bytes one SHA-256 names (else of one partial file):
        two sources can name the same bytes (a hub file and a URL mirror of it with its
        sha256), and the second then finds the first's blob. Each writes its own partial
        file (:func:`_part_name`). An entry lives while some download holds or waits for it
        (:meth:`_writer`): a neuron that fetches many models over months kept one per file."""
        self._verified: dict[tuple[str, int, int], str] = {}

    async def fetch(self, config: ModelConfig, progress: ProgressFn) -> Fetched:
        """Make ``config.source`` local; see the module docstring. Pair with :meth:`release`.

        Cancelling a fetch stops its download (the partial file stays, to resume later);
        other loads waiting for the same source then carry on with it themselves."""
        source = config.parsed_source
        if source is None:
            raise LoadFailed(f"model {config.model_id!r} has no source", code="not_configured")
        if source.kind is SourceKind.PATH:
            return await self._local(source, config.sha256)
        key = cache_key(config.source, config.sha256)
        assert key is not None  # a source that is not a path
        while True:
            path = self.cache.cached(key)
            if path is not None:
                self.cache.acquire(key)
                return Fetched(path, key)
            flight = self._flights.get(key)
            if flight is None:
                break
            flight.listeners.append(progress)
            try:
                await flight.done.wait()
            finally:
                flight.listeners.remove(progress)
            if flight.error is not None:
                raise LoadFailed(str(flight.error), code=flight.error.code)
        flight = self._flights[key] = _Flight([progress])
        try:
            path = await self._download(key, source, config.sha256, flight)
        except (DownloadError, NoRoom, OSError) as exc:
            reason = str(exc)
            if isinstance(exc, OSError):  # the cache directory itself: unwritable, or full
                code = "disk_full" if exc.errno == errno.ENOSPC else "load_failed"
                reason = f"the model cache {self.cache.root}: {exc.strerror or exc}"
            else:
                code = "disk_full" if isinstance(exc, NoRoom) else exc.code
            flight.error = LoadFailed(redact(f"cannot fetch {source.location}: {reason}"), code=code)
            raise flight.error from None
        finally:
            del self._flights[key]
            flight.done.set()
        self.cache.acquire(key)
        return Fetched(path, key)

    def is_cached(self, config: ModelConfig) -> bool | None:
        """Whether ``config``'s source is in the cache (None: no source, or a local path)."""
        source = config.parsed_source
        if source is None or source.kind is SourceKind.PATH:
            return None
        return self.cache.cached(cache_key(config.source, config.sha256)) is not None

    def release(self, fetched: Fetched) -> None:
        """The model loaded from ``fetched`` is gone: its files may be evicted again."""
        if fetched.key is not None:
            self.cache.release(fetched.key)

    # --- a path on this host --------------------------------------------------------------

    async def _local(self, source: ModelSource, sha256: str | None) -> Fetched:
        path = Path(source.location)
        if not path.exists():
            raise LoadFailed(f"model source {path} does not exist on this neuron", code="model_not_found")
        if sha256 is not None:
            if not path.is_file():
                raise LoadFailed(f"sha256 given for {path}, which is not a file", code="load_failed")
            st = path.stat()
            memo = (str(path), st.st_size, st.st_mtime_ns)
            got = self._verified.get(memo) or await trio.to_thread.run_sync(_sha256_file, path)
            if got != sha256:
                raise LoadFailed(f"{path}: SHA-256 mismatch (expected {sha256}, got {got})", code="hash_mismatch")
            self._verified[memo] = got
        return Fetched(path)

    # --- into the cache -------------------------------------------------------------------

    async def _download(self, key: str, source: ModelSource, sha256: str | None, flight: _Flight) -> Path:
        files = await self._plan(source, sha256)
        have = {f.rel: f.sha256 for f in files if f.sha256 is not None and self.cache.has_blob(f.sha256)}
        todo = [f for f in files if f.rel not in have]
        parts = {f.rel: self.cache.partial(_part_name(f)) for f in todo}
        on_disk = {rel: (p.stat().st_size if p.exists() else 0) for rel, p in parts.items()}
        # Hub files have known sizes; a URL's size is learnt from its response (on_total).
        needed = sum(max(0, f.size - on_disk[f.rel]) for f in todo if f.size is not None)
        meter = _Meter(flight, total=sum(f.size for f in todo if f.size is not None) or None)
        meter.reservations.append(self.cache.reserve(needed, partials=parts.values()))
        try:
            if todo:
                log.info("fetching %s: %d file(s), %s", source.location, len(todo),
                         human(meter.total) if meter.total is not None else "size unknown")
            async with httpx.AsyncClient(follow_redirects=True, timeout=self._timeout()) as client:
                for f in todo:
                    have[f.rel] = await self._one(client, f, parts[f.rel], meter)
        finally:
            for r in meter.reservations:
                r.release()
        if todo:
            log.info("fetched %s", source.location)
        return self.cache.commit(key, source.location, have, file=None if source.whole_repo else files[0].rel)

    async def _one(self, client: httpx.AsyncClient, f: RemoteFile, part: Path, meter: _Meter) -> str:
        def on_total(size: int | None, already: int) -> None:
            meter.start_file(already)
            if f.size is None and size is not None:  # now the room for it can be checked
                meter.reservations.append(self.cache.reserve(size - already, partials=[part]))
                meter.total = (meter.total or 0) + size

        async with self._writer(f.sha256 or part.name):
            if f.sha256 is not None and self.cache.has_blob(f.sha256):  # another source fetched it meanwhile
                return f.sha256
            try:
                sha = await download(client, f, part, on_bytes=meter.written, on_total=on_total,
                                     retries=self.config.retries, backoff=self.config.retry_backoff)
            except DownloadError as exc:
                if exc.code == "disk_full":  # give the space back: this file cannot be finished
                    _discard_part(part)
                raise
            except OSError as exc:
                # The disk can also fill up outside the body's writes (closing the part file
                # flushes it; its side file is written apart): the same failure, said alike.
                if exc.errno != errno.ENOSPC:
                    raise
                _discard_part(part)
                raise DownloadError("the disk filled up during the download", code="disk_full") from None
            self.cache.adopt(part, sha, meter.reservations[0])
        meter.end_file()
        return sha

    @asynccontextmanager
    async def _writer(self, key: str) -> AsyncIterator[None]:
        """Hold the download lock of ``key``; its entry goes when no download holds or awaits it."""
        entry = self._writing.get(key)
        if entry is None:
            entry = self._writing[key] = _KeyLock()
        entry.users += 1
        try:
            async with entry.lock:
                yield
        finally:
            entry.users -= 1
            if entry.users == 0 and self._writing.get(key) is entry:
                del self._writing[key]

    async def _plan(self, source: ModelSource, sha256: str | None) -> list[RemoteFile]:
        if source.kind is SourceKind.URL:
            return [RemoteFile(rel=_url_filename(source.location), url=source.location, sha256=sha256)]
        try:
            token = self.config.token()
        except OSError as exc:
            raise DownloadError(f"sources.hf_token_file: cannot read {self.config.hf_token_file} "
                                f"({exc.strerror or exc})", code="unauthorized") from None
        plan = await trio.to_thread.run_sync(
            lambda: hub.resolve(source, endpoint=hub.endpoint_from(self.config.hf_endpoint), token=token,
                                timeout=self.config.read_timeout),
            abandon_on_cancel=True,
        )
        files = list(plan.files)
        if sha256 is not None:
            (f,) = files
            if f.sha256 is not None and f.sha256 != sha256:
                raise DownloadError(f"the hub's file has SHA-256 {f.sha256}, the config expects {sha256}",
                                    code="hash_mismatch")
            files = [replace(f, sha256=sha256)]
        return files

    def _timeout(self) -> httpx.Timeout:
        c = self.config
        return httpx.Timeout(connect=c.connect_timeout, read=c.read_timeout, write=c.read_timeout,
                             pool=c.connect_timeout)


def _part_name(f: RemoteFile) -> str:
    """A download's partial file, its own source's: its URL with the hash it is expected to
    have. Named by the hash alone, another model's config with a wrong sha256 equal to this
    one's wrote its own server's bytes into this partial file, then deleted it on the
    mismatch, and this download started again from nothing."""
    return source_key(f"{f.url} {f.sha256 or f.git_sha1 or ''}")


def _url_filename(url: str) -> str:
    name = unquote(PurePosixPath(urlsplit(url).path).name)
    return name if name not in ("", ".", "..") and "/" not in name else "model"


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(8 * 1024 * 1024):
            h.update(block)
    return h.hexdigest()


def _discard_part(part: Path) -> None:
    """Give a download's space back: its part file and its side file."""
    part.unlink(missing_ok=True)
    part.with_suffix(".json").unlink(missing_ok=True)
