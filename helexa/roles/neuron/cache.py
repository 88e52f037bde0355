"""The neuron's model cache: fetched model files, content-addressed, bounded in size.

Layout under the cache directory (one neuron per directory)::

    blobs/<sha256>          a complete, verified file, named by the SHA-256 of its content
    partial/<name>.part     a download in progress, kept across restarts so it can resume
    partial/<name>.json     what the server said about it (ETag, Last-Modified: for If-Range)
    refs/<key>.json         one cached source: {"source": ..., "files": {relpath: sha256}}
    trees/<key>/<relpath>   that source's files as symlinks into blobs/: what a backend opens

A source's ``key`` is a digest of its text. The same bytes reached from two sources (a hub
file and a URL mirror of it) are stored once. A ref's mtime is its last use.

Room: before a download starts, :meth:`ModelCache.reserve` asks :func:`plan_room` (pure)
whether the bytes still to come fit both the cache limit and the free disk space, counting
what other downloads in flight have reserved, and evicts what the plan says: least
recently used first, never a source in use (acquired by a loaded model, or being fetched).
When nothing more can go, :class:`NoRoom` says why in one line.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

MB = 1024 * 1024


class NoRoom(Exception):
    """A download cannot fit: ``disk`` is True when free disk space is what is missing,
    False when it is the cache's own limit."""

    def __init__(self, message: str, *, disk: bool) -> None:
        super().__init__(message)
        self.disk = disk


@dataclass(frozen=True, slots=True)
class CacheItem:
    """Something :func:`plan_room` may evict: a cached source (its blobs), a stray blob, or
    a stale partial download (``own_bytes``)."""

    key: str
    blobs: frozenset[str] = frozenset()
    own_bytes: int = 0
    last_used: float = 0.0
    in_use: bool = False


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def plan_room(
    needed: int,
    *,
    free: int,
    limit: int,
    min_free: int = 0,
    items: Iterable[CacheItem],
    blob_sizes: Mapping[str, int],
    reserved: int = 0,
) -> list[str]:
    """What to evict so that ``needed`` more bytes fit; ``[]`` when they fit already.

    Args:
        needed: bytes the download will still write.
        free: free bytes on the cache's filesystem now.
        limit: the cache's size limit in bytes.
        min_free: bytes to leave free on the filesystem.
        items: everything evictable, with what it holds and when it was last used.
        blob_sizes: the size of every blob on disk (blobs shared by several items free
            their bytes only when the last of them goes).
        reserved: bytes other downloads in flight have reserved.

    Returns the keys to evict, least recently used first. Raises :class:`NoRoom` when even
    evicting everything not in use is not enough.
    """
    items = list(items)
    used = sum(blob_sizes.values()) + sum(i.own_bytes for i in items) + reserved
    holders = Counter(b for i in items for b in i.blobs)
    freed = 0

    def fits() -> bool:
        return used - freed + needed <= limit and free + freed - needed >= min_free

    evict: list[str] = []
    for item in sorted((i for i in items if not i.in_use), key=lambda i: i.last_used):
        if fits():
            break
        evict.append(item.key)
        freed += item.own_bytes
        for blob in item.blobs:
            holders[blob] -= 1
            if holders[blob] == 0:
                freed += blob_sizes.get(blob, 0)
    if fits():
        return evict
    if free + freed - needed < min_free:
        raise NoRoom(
            f"not enough disk space: {human(needed)} to download, {human(free)} free"
            + (f" and {human(freed)} more in unused cached models" if freed else "")
            + (f", {human(min_free)} to be left free" if min_free else ""),
            disk=True,
        )
    raise NoRoom(
        f"the model cache limit of {human(limit)} cannot hold {human(needed)} more"
        f" ({human(used - reserved)} cached, of which {human(used - reserved - freed)} in use or in flight)",
        disk=False,
    )


def _disk_free(path: Path) -> int:
    return shutil.disk_usage(path).free


def source_key(source: str) -> str:
    """The cache key of a source text."""
    return hashlib.sha256(source.encode()).hexdigest()[:32]


@dataclass(eq=False)
class Reservation:
    """Room held for one download; :meth:`ModelCache.reserve` returns it, :meth:`release`
    ends it (always, in a ``finally``)."""

    cache: ModelCache
    nbytes: int
    partials: frozenset[str] = frozenset()
    """This download's partial files (names under ``partial/``): never evicted while it runs."""
    blobs: set[str] = field(default_factory=set)
    """Blobs this download has completed so far: never evicted while it runs."""

    def release(self) -> None:
        self.cache._reservations.discard(self)


class ModelCache:
    """The on-disk store (see the module docstring). Its methods are quick filesystem
    operations, called on the trio thread; the downloads themselves live in
    :mod:`helexa.roles.neuron.download`.

    Args:
        root: the cache directory (created on first use).
        limit_bytes: the most the cache may hold.
        min_free_bytes: what to leave free on its filesystem.
        free_space: how free space is measured (``shutil.disk_usage`` by default).
    """

    def __init__(
        self,
        root: Path,
        *,
        limit_bytes: int,
        min_free_bytes: int = 0,
        free_space: Callable[[Path], int] = _disk_free,
    ) -> None:
        self.root = Path(root)
        self.limit_bytes = limit_bytes
        self.min_free_bytes = min_free_bytes
        self._free_space = free_space
        self._in_use: Counter[str] = Counter()
        self._reservations: set[Reservation] = set()
        self.generation = 0
        """Counts the changes to what the cache holds (a source recorded or dropped): the
        heartbeats report :meth:`held` again when it moved."""

    # --- paths ----------------------------------------------------------------------------

    def _dir(self, name: str) -> Path:
        path = self.root / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def blob(self, sha256: str) -> Path:
        return self.root / "blobs" / sha256

    def has_blob(self, sha256: str) -> bool:
        return self.blob(sha256).is_file()

    def partial(self, name: str) -> Path:
        """Where a download named ``name`` writes (``.part``); its sidecar is ``.json``."""
        return self._dir("partial") / f"{name}.part"

    def _ref(self, key: str) -> Path:
        return self.root / "refs" / f"{key}.json"

    def _tree(self, key: str) -> Path:
        return self.root / "trees" / key

    # --- lookups --------------------------------------------------------------------------

    def cached(self, key: str) -> Path | None:
        """The local path of a cached source (its one file, or its directory), or ``None``
        when it is not (wholly) in the cache. Marks it used now."""
        ref = self._read_ref(key)
        if ref is None:
            return None
        files: dict[str, str] = ref["files"]
        if not all(self.has_blob(sha) for sha in files.values()):
            self._drop(key)
            return None
        path = self._build_tree(key, files, ref.get("file"))
        os.utime(self._ref(key))
        return path

    def held(self, limit: int) -> tuple[str, ...]:
        """The keys of the sources wholly in the cache, the most recently used first, at most
        ``limit`` of them (what the neuron reports to its cortex). Marks nothing used."""
        refs = []
        for path in self._scan("refs"):
            if path.suffix == ".json":
                try:
                    refs.append((path.stat().st_mtime, path.stem))
                except OSError:
                    continue
        out: list[str] = []
        for _, key in sorted(refs, reverse=True):
            ref = self._read_ref(key)
            if ref is not None and all(isinstance(sha, str) and self.has_blob(sha) for sha in ref["files"].values()):
                out.append(key)
                if len(out) >= limit:
                    break
        return tuple(out)

    def _read_ref(self, key: str) -> dict | None:
        try:
            ref = json.loads(self._ref(key).read_text())
        except (OSError, ValueError):
            return None
        return ref if isinstance(ref, dict) and isinstance(ref.get("files"), dict) else None

    def _build_tree(self, key: str, files: Mapping[str, str], file: str | None) -> Path:
        tree = self._tree(key)
        for rel, sha in files.items():
            link = tree / rel
            if not link.is_symlink():
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to(os.path.relpath(self.blob(sha), link.parent))
        return tree / file if file is not None else tree

    # --- writing --------------------------------------------------------------------------

    def adopt(self, part: Path, sha256: str, reservation: Reservation | None = None) -> Path:
        """Move a finished, verified download into ``blobs/`` under its hash."""
        target = self.blob(sha256)
        self._dir("blobs")
        if target.exists():
            part.unlink(missing_ok=True)
        else:
            os.replace(part, target)
        part.with_suffix(".json").unlink(missing_ok=True)
        if reservation is not None:
            reservation.blobs.add(sha256)
        return target

    def commit(self, key: str, source: str, files: Mapping[str, str], *, file: str | None) -> Path:
        """Record a source whose blobs are all in place; returns its local path (``file``
        inside its tree, or the tree itself for a whole repository)."""
        self._dir("refs")
        tmp = self._ref(key).with_suffix(".tmp")
        tmp.write_text(json.dumps({"source": source, "files": dict(files), "file": file}, indent=1))
        os.replace(tmp, self._ref(key))
        self.generation += 1
        return self._build_tree(key, files, file)

    # --- use ------------------------------------------------------------------------------

    def acquire(self, key: str) -> None:
        """Mark a source in use (a model loaded from it): it is never evicted until released."""
        self._in_use[key] += 1

    def release(self, key: str) -> None:
        self._in_use[key] -= 1
        if self._in_use[key] <= 0:
            del self._in_use[key]

    def in_use(self, key: str) -> bool:
        return self._in_use[key] > 0

    # --- room -----------------------------------------------------------------------------

    def reserve(self, nbytes: int, *, partials: Iterable[Path] = ()) -> Reservation:
        """Make room for ``nbytes`` more (evicting as :func:`plan_room` says) and hold it
        until the reservation is released. ``partials`` are this download's own partial
        files. Raises :class:`NoRoom`."""
        self._dir("blobs")
        reservation = Reservation(self, nbytes, frozenset(p.name for p in partials))
        evict = plan_room(
            nbytes,
            free=self._free_space(self.root),
            limit=self.limit_bytes,
            min_free=self.min_free_bytes,
            items=self._items(extra=reservation),
            blob_sizes=self._blob_sizes(),
            reserved=sum(r.nbytes for r in self._reservations),
        )
        for key in evict:
            self._evict(key)
        self._reservations.add(reservation)
        return reservation

    def _blob_sizes(self) -> dict[str, int]:
        sizes = {}
        for path in self._scan("blobs"):
            try:
                sizes[path.name] = path.stat().st_size
            except OSError:
                continue
        return sizes

    def _scan(self, name: str) -> list[Path]:
        try:
            return list((self.root / name).iterdir())
        except OSError:
            return []

    def _items(self, *, extra: Reservation | None = None) -> list[CacheItem]:
        """Everything in the cache as :func:`plan_room` sees it. Downloads in flight hold
        their finished blobs and partial files through one item that is always in use."""
        flights = [*self._reservations, *([extra] if extra is not None else [])]
        flight_blobs = frozenset(b for r in flights for b in r.blobs)
        flight_partials = {p for r in flights for p in r.partials}
        items = [CacheItem("flight", flight_blobs, in_use=True)]
        held = set(flight_blobs)
        for ref_path in self._scan("refs"):
            if ref_path.suffix != ".json":
                continue
            ref = self._read_ref(ref_path.stem)
            try:
                last_used = ref_path.stat().st_mtime
            except OSError:
                continue
            if ref is not None:
                blobs = frozenset(ref["files"].values())
                held |= blobs
                items.append(CacheItem(ref_path.stem, blobs, 0, last_used, self.in_use(ref_path.stem)))
        for sha in self._blob_sizes():
            if sha not in held:  # a stray (its source was dropped while another held it)
                items.append(CacheItem(f"blob:{sha}", frozenset({sha})))
        for part in self._scan("partial"):
            if part.suffix != ".part":
                continue
            try:
                st = part.stat()
            except OSError:
                continue
            if part.name in flight_partials:
                items[0] = CacheItem("flight", flight_blobs, items[0].own_bytes + st.st_size, in_use=True)
            else:
                items.append(CacheItem(f"partial:{part.name}", frozenset(), st.st_size, st.st_mtime))
        return items

    def _evict(self, key: str) -> None:
        if key.startswith("partial:"):
            part = self.root / "partial" / key.removeprefix("partial:")
            log.info("model cache: removing stale partial download %s", part.name)
            part.unlink(missing_ok=True)
            part.with_suffix(".json").unlink(missing_ok=True)
        elif key.startswith("blob:"):
            self.blob(key.removeprefix("blob:")).unlink(missing_ok=True)
        else:
            ref = self._read_ref(key)
            log.info("model cache: evicting %s", ref.get("source") if ref else key)
            self._drop(key)

    def _drop(self, key: str) -> None:
        """Forget a source and delete the blobs no other source holds."""
        ref = self._read_ref(key)
        self._ref(key).unlink(missing_ok=True)
        self.generation += 1
        shutil.rmtree(self._tree(key), ignore_errors=True)
        if ref is None:
            return
        still_held = {b for i in self._items() if not i.key.startswith("blob:") for b in i.blobs}
        for sha in set(ref["files"].values()) - still_held:
            self.blob(sha).unlink(missing_ok=True)

    def usage(self) -> int:
        """Bytes the cache holds on disk (blobs and partial downloads)."""
        partial = sum(p.stat().st_size for p in self._scan("partial") if p.suffix == ".part")
        return sum(self._blob_sizes().values()) + partial
