"""What :meth:`.Connection.next_event` returns: two event types and three sentinels.

An exchange reads as ``Request``, then one or more ``Data`` (the last with
``more=False``; a request without a body has exactly one, empty). Between them the
connection may answer ``NEED_DATA`` (read the socket and feed the bytes in),
``PAUSED`` (the next request is held back until the current exchange ends) or
``CLOSED`` (nothing more will be read from this client).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Request:
    """A whole, valid request head.

    Attributes:
        method: e.g. ``b"POST"``, as sent (methods are case-sensitive).
        target: the request target as sent, e.g. ``b"/v1/models?x=1"``.
        http_version: ``b"1.1"`` or ``b"1.0"``.
        headers: ``(name, value)`` pairs in order, names lowercased, values with the
            surrounding whitespace removed.
    """

    method: bytes
    target: bytes
    http_version: bytes
    headers: list[tuple[bytes, bytes]]


@dataclass(frozen=True, slots=True)
class Data:
    """A part of a request body (chunked framing already removed).

    Attributes:
        body: the bytes (may be empty on the last part).
        more: ``False`` on the last part.
    """

    body: bytes
    more: bool


class Sentinel:
    """A named marker returned instead of an event (compare with ``is``)."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


NEED_DATA = Sentinel("NEED_DATA")
"""Feed more bytes (:meth:`.Connection.receive_data`) before asking again; wait for them
no later than :attr:`.Connection.deadline`."""
PAUSED = Sentinel("PAUSED")
"""The current request has been read; the next one waits until the exchange ends."""
CLOSED = Sentinel("CLOSED")
"""The client side is over (closed, gone, malformed or timed out): read nothing more."""
