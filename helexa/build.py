"""Which build of helexa this is: the string every role reports as its version (a neuron's
descriptor and handshake, the fleet view, ``helexa status``, the console, ``helexa --version``).

Every release of a checkout is ``0.1.0`` by its package version alone, so an operator could not
tell an upgraded neuron from one still running the old code. :func:`version` adds a build
identifier: the commit checked out when helexa runs from a git checkout (``0.1.0+g47c558a``, a
PEP 440 local version, as ``git describe`` names commits; ``0.1.0+g47c558a.dirty`` when the
package's files were edited since, as ``git describe --dirty`` marks them), and the plain
package version when it runs from an installed wheel. It is read once per process and never decides anything: the
protocol's compatibility is the handshake's protocol versions (:mod:`helexa.protocol.join`).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import os
import re
import stat
import struct
from collections.abc import Iterator
from pathlib import Path

from helexa import __version__

_SHA = re.compile(r"[0-9a-f]{40}([0-9a-f]{24})?")
"""A commit id (SHA-1, or SHA-256 in a repository that uses it)."""

PACKAGE_ROOT = Path(__file__).resolve().parent.parent
"""The directory that holds the ``helexa`` package: a checkout's root, or site-packages."""


def package_version() -> str:
    """The installed distribution's version, or the source's ``__version__`` when helexa
    runs from a tree that is not installed."""
    try:
        return importlib.metadata.version("helexa")
    except importlib.metadata.PackageNotFoundError:
        return __version__


def git_commit(root: Path) -> str | None:
    """The commit checked out at ``root`` (a git checkout or a worktree of one), read from
    its ``.git`` files without running git (not installed on every host, and it refuses a
    checkout owned by another user); None when ``root`` is no checkout or it cannot be read."""
    try:
        gitdir = _gitdir(root)
        if gitdir is None:
            return None
        head = (gitdir / "HEAD").read_text().strip()
        if not head.startswith("ref:"):
            return head if _SHA.fullmatch(head) else None  # a detached HEAD names its commit
        ref = head.removeprefix("ref:").strip()
        common = gitdir
        if (gitdir / "commondir").is_file():  # a worktree: its branches live in the main repository
            common = (gitdir / (gitdir / "commondir").read_text().strip()).resolve()
        for where in (gitdir, common):
            if (where / ref).is_file():
                sha = (where / ref).read_text().strip()
                return sha if _SHA.fullmatch(sha) else None
        for line in (common / "packed-refs").read_text().splitlines():
            sha, _, name = line.partition(" ")
            if name.strip() == ref and _SHA.fullmatch(sha):
                return sha
    except (OSError, UnicodeDecodeError):
        return None
    return None


def _gitdir(root: Path) -> Path | None:
    dotgit = root / ".git"
    if dotgit.is_dir():
        return dotgit
    if dotgit.is_file():  # a worktree or submodule: "gitdir: PATH", relative to root when not absolute
        text = dotgit.read_text().strip()
        if text.startswith("gitdir:"):
            return (root / text.removeprefix("gitdir:").strip()).resolve()
    return None


def changed(root: Path, commit: str, under: str = "helexa/") -> bool | None:
    """Whether a file git tracks under ``under`` (the package: what runs) differs in the
    checkout at ``root`` from what its index holds: edited, removed, or in a merge
    conflict; None when that cannot be told (no index, one this cannot read). Read from the
    index without running git, as git does: a file whose size and modification time are
    the index's is unchanged; another is hashed as git hashes it. Not seen: a change staged
    (``git add``) but not committed, which would take reading git's object database (its
    packs) to compare the index with the commit; and files git does not track.

    ``commit``: the checked-out commit (:func:`git_commit`), whose length says the hash
    (SHA-1 or SHA-256)."""
    try:
        gitdir = _gitdir(root)
        if gitdir is None:
            return None
        index = gitdir / "index"
        data = index.read_bytes()
        racy = index.stat().st_mtime_ns
    except OSError:
        return None
    size = len(commit) // 2
    algo = hashlib.sha1 if size == 20 else hashlib.sha256
    try:
        for path, mtime, length, sha, special in _index_entries(data, size):
            if not path.startswith(under):
                continue
            if special:  # in a merge conflict (or a file git would need to check out)
                return True
            try:
                st = os.lstat(root / path)
            except OSError:
                return True  # removed
            if st.st_size == length and st.st_mtime_ns == mtime and mtime < racy:
                continue
            body = os.readlink(root / path).encode() if stat.S_ISLNK(st.st_mode) else (root / path).read_bytes()
            if algo(b"blob %d\0" % len(body) + body).digest() != sha:
                return True
    except (OSError, ValueError, struct.error, UnicodeDecodeError):
        return None
    return False


def _index_entries(data: bytes, size: int) -> Iterator[tuple[str, int, int, bytes, bool]]:
    """Each entry of a git index (versions 2 to 4): its path, modification time (ns), size,
    object id, and whether it is special (a conflict stage; a gitlink, skip-worktree and
    intent-to-add entries are left out). Raises ValueError for what is not an index."""
    if data[:4] != b"DIRC":
        raise ValueError("not a git index")
    version, count = struct.unpack_from(">II", data, 4)
    if version not in (2, 3, 4):
        raise ValueError(f"index version {version}")
    at, previous = 12, b""
    for _ in range(count):
        start = at
        (_, _, m_s, m_ns, _, _, mode, _, _, length) = struct.unpack_from(">10I", data, at)
        at += 40
        sha = data[at:at + size]
        at += size
        (flags,) = struct.unpack_from(">H", data, at)
        at += 2
        extended = 0
        if flags & 0x4000:
            (extended,) = struct.unpack_from(">H", data, at)
            at += 2
        if version == 4:  # the path is the previous one less N bytes, plus what follows
            strip, shift = 0, 0
            while True:
                byte = data[at]
                at += 1
                strip = (strip << 7) | (byte & 0x7F) if shift == 0 else ((strip + 1) << 7) | (byte & 0x7F)
                shift += 1
                if not byte & 0x80:
                    break
            end = data.index(b"\0", at)
            path = previous[:len(previous) - strip] + data[at:end]
            at = end + 1
        else:
            end = data.index(b"\0", at)
            path = data[at:end]
            at = start + ((end - start + 8) & ~7)  # padded with 1 to 8 NULs to a multiple of 8
        previous = path
        if mode >> 12 == 0o16 or extended & 0x6000:  # a gitlink; skip-worktree or intent-to-add
            continue
        yield path.decode(), m_s * 1_000_000_000 + m_ns, length, sha, bool(flags & 0x3000)


def build_version(package: str, commit: str | None, dirty: bool = False) -> str:
    """``package`` with the build identifier of ``commit`` (its first 7 hex digits) as a
    local version label, and ``.dirty`` when the package's files differ from that commit's
    (:func:`changed`); ``package`` alone without a commit."""
    if not commit:
        return package
    return f"{package}{'.' if '+' in package else '+'}g{commit[:7]}{'.dirty' if dirty else ''}"


@functools.cache
def version() -> str:
    """This process's build (see the module docstring), read on first use."""
    commit = git_commit(PACKAGE_ROOT)
    return build_version(package_version(), commit, bool(commit and changed(PACKAGE_ROOT, commit)))
