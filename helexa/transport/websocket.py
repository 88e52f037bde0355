"""The websocket transport (``ws://`` and ``wss://``), built from sans-IO pieces:
:func:`connect` (a neuron's client, :mod:`.ws_client`) and :func:`serve` (the cortex's
server, :mod:`.ws_server`); both give :class:`.ws_channel.FrameChannel`\\ s.

Close codes used: 1000 normal, 1001 going away, 1002 protocol error (malformed or unknown
frame), 1007 bad data, 1008 policy violation (refused join), 1009 frame too large, 1013
try again later.
"""

from __future__ import annotations

from .ws_channel import (
    CLOSE_POLICY,
    CLOSE_PROTOCOL_ERROR,
    CLOSE_TOO_BIG,
    CLOSE_TRY_LATER,
    ClientChannel,
    FrameChannel,
    ServerChannel,
)
from .ws_client import connect, handshake
from .ws_server import serve

__all__ = ["CLOSE_POLICY", "CLOSE_PROTOCOL_ERROR", "CLOSE_TOO_BIG", "CLOSE_TRY_LATER", "ClientChannel",
           "FrameChannel", "ServerChannel", "connect", "handshake", "serve"]
