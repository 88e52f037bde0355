"""The operator's join token: created on first start in the data directory (mode 0600,
like k3s's node token), handed to each neuron, rotatable from the CLI.

The cortex re-reads the file at every handshake, so a rotation takes effect at once for
new joins; neurons already joined stay joined until they reconnect.
"""

from __future__ import annotations

import os
from pathlib import Path

from helexa.protocol.auth import new_token

FILENAME = "join-token"


def path_in(data_dir: Path) -> Path:
    return Path(data_dir) / FILENAME


def _write(path: Path, token: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(token + "\n")
    os.replace(tmp, path)


def load_or_create(data_dir: Path) -> str:
    path = path_in(data_dir)
    if path.exists():
        return read(path)
    token = new_token()
    _write(path, token)
    return token


def rotate(data_dir: Path) -> str:
    """Replace the token with a fresh one and return it."""
    token = new_token()
    _write(path_in(data_dir), token)
    return token


def read(path: Path) -> str:
    """Read a token file. Raises ``ValueError`` if it is empty."""
    token = Path(path).read_text().strip()
    if not token:
        raise ValueError(f"{path} is empty")
    return token
