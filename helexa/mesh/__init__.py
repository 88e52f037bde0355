"""The cortex mesh: the only package that imports libp2p (and only in
:mod:`.libp2p_mesh`, loaded on demand, since ``import libp2p`` costs seconds).

See :mod:`.base` for the interface and the exception tree, ``docs/mesh.md`` for the
design.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import (
    DialFailed,
    GossipMessage,
    Mesh,
    MeshError,
    MessageStream,
    StreamClosed,
    StreamHandler,
    StreamTimeout,
    TopicValidator,
)
from .identity import MeshIdentity, format_identity, mesh_identity, record_addrs
from .memory import MemoryMesh, MemoryNetwork
from .peer_id import peer_id_from_ed25519
from .settings import MeshSettings

if TYPE_CHECKING:
    from .libp2p_mesh import Libp2pMesh


def open_libp2p_mesh(seed: bytes, settings: MeshSettings = MeshSettings()) -> "Libp2pMesh":
    """A :class:`~.libp2p_mesh.Libp2pMesh` for the identity ``seed`` (imports libp2p)."""
    from .libp2p_mesh import Libp2pMesh

    return Libp2pMesh(seed, settings)


__all__ = [
    "DialFailed",
    "GossipMessage",
    "Mesh",
    "MeshError",
    "MeshIdentity",
    "MemoryMesh",
    "MemoryNetwork",
    "MeshSettings",
    "MessageStream",
    "StreamClosed",
    "StreamHandler",
    "StreamTimeout",
    "TopicValidator",
    "format_identity",
    "mesh_identity",
    "open_libp2p_mesh",
    "peer_id_from_ed25519",
    "record_addrs",
]
