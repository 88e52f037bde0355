"""Which build of helexa this is: the string every role reports as its version (a neuron's
descriptor and handshake, the fleet view, ``helexa status``, the console, ``helexa --version``).

Every release of a checkout is ``0.1.0`` by its package version alone, so an operator could not
tell an upgraded neuron from one still running the old code. :func:`version` adds a build
identifier: the commit checked out when helexa runs from a git checkout (``0.1.0+g47c558a``, a
PEP 440 local version, as ``git describe`` names commits), and the plain package version when
it runs from an installed wheel. It is read once per process and never decides anything: the
protocol's compatibility is the handshake's protocol versions (:mod:`helexa.protocol.join`).
"""

from __future__ import annotations

import functools
import importlib.metadata
import re
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


def build_version(package: str, commit: str | None) -> str:
    """``package`` with the build identifier of ``commit`` (its first 7 hex digits) as a
    local version label; ``package`` alone without a commit."""
    if not commit:
        return package
    return f"{package}{'.' if '+' in package else '+'}g{commit[:7]}"


@functools.cache
def version() -> str:
    """This process's build (see the module docstring), read on first use."""
    return build_version(package_version(), git_commit(PACKAGE_ROOT))
