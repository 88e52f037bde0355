"""One clear line for a data file the cortex cannot use at start: damaged (restore it), or
on a disk that will not take it (full, read-only, not this user's, failed: fix the disk).

The two need opposite fixes, so they are told apart: SQLite says a file is damaged only with
``SQLITE_CORRUPT`` or ``SQLITE_NOTADB``; its other errors, like the OS's ``ENOSPC`` or
``EROFS``, say nothing about the file's bytes. A full disk told to restore the usage store
from a backup would have the operator replace a sound ledger with an older one.
"""

from __future__ import annotations

import errno
import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from helexa.config import ConfigError

_CORRUPT = (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)

_FULL_BYTES = 1 << 20
"""A disk with less free than this is called full (SQLite fails with ``disk I/O error`` when
it cannot make its ``-shm`` file on one)."""


def disk_state(path: Path) -> str | None:
    """``"full"``, ``"read-only"`` or None for the file system holding ``path`` (or its
    nearest existing folder)."""
    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        st = os.statvfs(probe)
    except OSError:
        return None
    if st.f_flag & os.ST_RDONLY:
        return "read-only"
    if st.f_bavail * st.f_frsize < _FULL_BYTES:
        return "full"
    return None


def disk_fix(path: Path, *, busy: bool = False) -> str:
    """What the operator does about a data file that cannot be written."""
    state = disk_state(path)
    if state == "full":
        return "its disk is full: free space there and start again"
    if state == "read-only":
        return ("its file system is read-only (under the packaged systemd unit, ProtectSystem=strict, only "
                "/var/lib/helexa is writable: add the folder to ReadWritePaths=)")
    if busy:
        return "another process holds it locked: end that session and start again"
    return "check that its folder is writable by this user, on a disk that has not failed"


def unusable(what: str, path: Path, exc: OSError) -> ConfigError:
    """A data file the OS would not let this process have, as one line naming why and the fix."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
        return ConfigError(f"{what} {path}: cannot write it ({exc.strerror}): {disk_fix(path)}")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return ConfigError(f"{what} {path}: cannot read or write it ({exc.strerror}): {disk_fix(path)}")
    return ConfigError(f"{what} {path}: cannot read it ({exc.strerror or exc})")


@contextmanager
def data_file(what: str, path: Path, fix: str) -> Iterator[None]:
    """Turn a data-directory file that cannot be read or written, or is corrupt, into one
    clear line (a :class:`ConfigError`: the CLI prints it and exits 2, no traceback). Nothing
    is repaired or replaced on its own: each of these files is a key, a secret or money;
    ``fix`` is said only of a file that is damaged."""
    try:
        yield
    except sqlite3.DatabaseError as exc:
        reason = str(exc).split(". See ")[0] or type(exc).__name__
        code = getattr(exc, "sqlite_errorcode", None)
        if code is not None and code & 0xFF not in _CORRUPT:
            hint = disk_fix(path, busy=code & 0xFF == sqlite3.SQLITE_BUSY)
            raise ConfigError(f"{what} {path}: cannot open or write it ({reason}): {hint}") from None
        raise ConfigError(f"{what} {path} is corrupt or truncated ({reason}): {fix}") from None
    except (ValueError, TypeError, UnicodeDecodeError) as exc:
        reason = str(exc).split(". See ")[0] or type(exc).__name__
        raise ConfigError(f"{what} {path} is corrupt or truncated ({reason}): {fix}") from None
    except OSError as exc:
        raise unusable(what, path, exc) from None


def check_writable(what: str, folder: Path) -> None:
    """Refuse to start on a data folder this process cannot write: with its files already
    there, SQLite opens a read-only usage store without a word, and every recorded request
    would then be refused (503) until a restart."""
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(f"{what} {folder} is not writable: {disk_fix(folder)}")
