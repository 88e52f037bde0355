"""A cortex's mesh identity as seen from outside: its peer id and dialable multiaddrs.

Backs ``helexa mesh id --data-dir DIR``: it needs no libp2p import (the peer id is
computed by :mod:`.peer_id`), so it answers instantly.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from helexa.identity import load_or_create

from .peer_id import peer_id_from_ed25519

log = logging.getLogger(__name__)

IDENTITY_FILE = "identity.key"
ADDRS_FILE = "mesh-addrs.json"


@dataclass(frozen=True, slots=True)
class MeshIdentity:
    peer_id: str
    multiaddrs: tuple[str, ...]
    """Where the running (or last run) cortex listens; from the configured listen address
    when it never ran (a port of 0 is then chosen only at start)."""


def mesh_identity(data_dir: Path, listen: str | None = None) -> MeshIdentity:
    """The peer id of the identity in ``data_dir`` (created, mode 0600, if absent) and
    its multiaddrs: those the last run recorded in ``mesh-addrs.json``, else ``listen``.

    Raises:
        ValueError: the identity file holds no Ed25519 key.
    """
    ident = load_or_create(Path(data_dir) / IDENTITY_FILE)
    peer_id = peer_id_from_ed25519(ident.public_bytes)
    addrs: list[str] = []
    recorded = Path(data_dir) / ADDRS_FILE
    try:
        data = json.loads(recorded.read_text())
        if data.get("peer_id") == peer_id:
            addrs = [str(a) for a in data.get("multiaddrs", [])]
    except (OSError, ValueError, AttributeError):
        pass
    if not addrs and listen:
        addrs = [f"{listen}/p2p/{peer_id}"]
    return MeshIdentity(peer_id, tuple(addrs))


def record_addrs(data_dir: Path, peer_id: str, multiaddrs: list[str]) -> bool:
    """Record the bound multiaddrs (called once the mesh has started) for ``mesh id``;
    False when they could not be written (a full or read-only disk: logged, and the file
    left as it was). ``mesh id`` then says the configured listen address, or the last run's:
    no reason to stop a cortex whose mesh is up. Before, the ``OSError`` ended the start
    with a traceback and left a partial ``mesh-addrs.tmp``."""
    path = Path(data_dir) / ADDRS_FILE
    tmp = path.with_suffix(".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({"peer_id": peer_id, "multiaddrs": list(multiaddrs)}))
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("mesh: cannot record the mesh addresses in %s (%s); `helexa mesh id` may show old ones",
                    path, exc.strerror or exc)
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        return False
    return True


def format_identity(ident: MeshIdentity) -> str:
    """What ``helexa mesh id`` prints: the peer id, then one multiaddr a line."""
    return "\n".join([ident.peer_id, *ident.multiaddrs])
