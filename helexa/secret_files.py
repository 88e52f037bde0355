"""Refusing secrets files that other users may read: the join token, the admin token, a
TLS private key, a node's identity key.

A secret left at mode 0644 is readable by every local account; like ssh with a private
key, helexa refuses to start on one and says which file and the fix, in one line (a
:class:`~helexa.config.ConfigError`, which the CLI prints and exits 2 on).
"""

from __future__ import annotations

import os
import re
import secrets
import stat
from collections.abc import Callable
from pathlib import Path

from helexa.config import ConfigError

LOOSE = 0o077
"""Any permission bit for the group or others."""


_SECRET_ENV = re.compile(r"HELEXA_\w*(TOKEN|KEY|SECRET|PASSWORD)")
"""The variables by which helexa takes a secret itself (``HELEXA_JOIN_TOKEN``,
``HELEXA_ADMIN_TOKEN``, ``HELEXA_API_KEY``, ``HELEXA_SOURCES__HF_TOKEN``...); a path to
one (``..._FILE``) is not a secret."""


def child_env() -> dict[str, str]:
    """This process's environment for a process it starts (a model's worker, a supervised
    server), without the secrets helexa took from it: a model's code, or a third party's
    server, has no use for the operator's join or admin token, and may log its environment."""
    return {name: value for name, value in os.environ.items() if not _SECRET_ENV.fullmatch(name)}


def check(path: Path | str | None, what: str) -> None:
    """Raise :class:`ConfigError` when ``path`` exists and its group or others have any
    permission on it. A missing file passes (whoever creates it creates it 0600)."""
    if path is None:
        return
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ConfigError(f"{what} {path}: cannot read it ({exc.strerror or exc})") from None
    mode = stat.S_IMODE(st.st_mode)
    if mode & LOOSE:
        raise ConfigError(
            f"{what} {path} is open to other users (mode {mode:04o}); refusing to start: run 'chmod 600 {path}'"
        )


def private_file(path: Path | str) -> None:
    """Make ``path`` empty and mode 0600 if it does not exist yet (its folder 0700 if new),
    before SQLite opens it: SQLite creates a database at the process's umask (0644: every
    local account could read it) and its ``-wal`` and ``-shm`` files with the database's
    mode. The usage store holds every tenant's stored answers and its keys' digests. A file
    that exists is left as its operator made it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        pass


def keep_owner(fd: int, path: Path) -> None:
    """Give the new file open as ``fd``, about to take the place of ``path``, the owner of
    ``path`` (else of its folder) when this process runs as root. The cortex runs as its own
    user (the unit's ``helexa``) and the docs run ``sudo helexa admin-token --rotate`` on
    its data directory: a secret written there as root, mode 0600, is one the cortex can no
    longer read (every admin request, or every join, refused until someone chowns it)."""
    if os.geteuid() != 0:
        return
    try:
        owner = os.stat(path)
    except FileNotFoundError:
        owner = os.stat(path.parent)
    if (owner.st_uid, owner.st_gid) != (0, 0):
        os.fchown(fd, owner.st_uid, owner.st_gid)


def write(path: Path, text: str) -> None:
    """Write a secret atomically, mode 0600 from its first byte (its folder 0700 if new),
    owned as the file it replaces (:func:`keep_owner`), durable when this returns (the file
    and its folder synced)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as fh:
            keep_owner(fh.fileno(), path)
            fh.write(text + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def read(path: Path) -> str:
    """The secret in ``path``, without surrounding white space. Raises ``ValueError`` if the
    file is empty, ``OSError`` if it cannot be read."""
    secret = Path(path).read_text().strip()
    if not secret:
        raise ValueError(f"{path} is empty")
    return secret


def rotate(path: Path, new: Callable[[], str]) -> str:
    """Replace the secret in ``path`` with a fresh one from ``new``, and return it."""
    secret = new()
    write(path, secret)
    return secret


def load_or_create(path: Path, new: Callable[[], str], read: Callable[[Path], str]) -> str:
    """The secret in ``path`` (through ``read``), made with ``new`` and written first if absent."""
    if path.exists():
        return read(path)
    secret = new()
    write(path, secret)
    return secret
