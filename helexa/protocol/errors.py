"""Errors raised by the sans-IO protocol layer.

Exception tree::

    ProtocolError                 anything wrong with a frame or a session step
    ├── DecodeError               bytes that are not a valid frame (malformed, unknown kind,
    │                             wrong field types, oversized)
    ├── VersionMismatch           the peer speaks no protocol version we speak
    └── AuthenticationError       a join proof (or a cortex's counter-proof) did not verify

``ProtocolError`` is what a connection handler catches to close only the offending
connection: everything else on the node carries on.
"""

from __future__ import annotations


class ProtocolError(Exception):
    """A frame or a protocol step was invalid.

    Attributes:
        code: a short machine-readable reason (``"malformed"``, ``"unknown_kind"``, ...).
    """

    code = "protocol_error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class DecodeError(ProtocolError):
    code = "malformed"


class VersionMismatch(ProtocolError):
    code = "version_mismatch"


class AuthenticationError(ProtocolError):
    code = "unauthorized"
