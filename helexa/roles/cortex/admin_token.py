"""The operator's admin token: what the admin API (``/admin/*``) and ``helexa keys`` /
``helexa usage`` / ``helexa status`` authenticate with. Created on first start in the data
directory (``admin-token``, mode 0600, like the join token), rotatable from the CLI
(``helexa admin-token --rotate``); the cortex re-reads the file on every admin request, so
a rotation applies at once.
"""

from __future__ import annotations

import hmac
import secrets
from pathlib import Path

from helexa import secret_files

FILENAME = "admin-token"
PREFIX = "hlx-admin-"


def path_in(data_dir: Path) -> Path:
    return Path(data_dir) / FILENAME


def new_token() -> str:
    """A fresh admin token (256 bits of entropy)."""
    return PREFIX + secrets.token_urlsafe(32)


def load_or_create(data_dir: Path) -> str:
    return secret_files.load_or_create(path_in(data_dir), new_token, read)


def rotate(data_dir: Path) -> str:
    """Replace the token with a fresh one and return it."""
    return secret_files.rotate(path_in(data_dir), new_token)


def read(path: Path) -> str:
    """Read a token file. Raises ``ValueError`` if it is empty, ``OSError`` if unreadable."""
    return secret_files.read(path)


def matches(expected: str | None, presented: str | None) -> bool:
    """Whether ``presented`` is the admin token, compared in constant time."""
    if not expected or not presented:
        return False
    return hmac.compare_digest(expected.encode(), presented.encode())
