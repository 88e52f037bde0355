"""A message channel: typed helexa messages in, typed messages out.

The one interface the control plane is written against. Implementations carry encoded
frames (always through :mod:`helexa.protocol`'s codec) over a websocket
(:mod:`.websocket`) or an in-memory pipe for unit tests (:mod:`.memory`); both map their
own errors to this module's tree at the boundary.

Exception tree::

    TransportError
    ├── ChannelClosed        the peer closed, or the connection broke (``code`` is the
    │                        websocket close code where there is one)
    ├── ConnectFailed        could not connect / the opening handshake failed or timed out
    └── Screened             a frame refused unread by the channel's ``screen``

Decoding failures surface as :class:`helexa.protocol.ProtocolError`; the channel has then
already sent a ``Fault`` frame and closed itself.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any


class TransportError(Exception):
    pass


class ChannelClosed(TransportError):
    def __init__(self, message: str = "channel closed", *, code: int | None = None, reason: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        """The reason of the peer's close frame (empty when none came)."""


class ConnectFailed(TransportError):
    pass


class Screened(TransportError):
    """A frame the channel's ``screen`` refused unread; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Channel(abc.ABC):
    """A bidirectional stream of protocol messages.

    ``send`` is safe to call from many tasks at once (frames are never interleaved).
    ``receive`` is meant for one reader task.
    """

    remote: str = "?"
    screen: Callable[[bytes], str | None] | None = None
    """While set, each binary frame is first passed to it undecoded; a reason back refuses
    the frame unread (:class:`Screened`; the channel stays open for the caller to close). A
    channel without raw frames ignores it."""

    @abc.abstractmethod
    async def send(self, msg: Any, *, timeout: float | None = None) -> None:
        """Encode and send one message.

        ``timeout`` bounds the wait when the connection cannot take the message at once
        (the peer does not read); a channel that can applies it only then, so the common
        case pays for no cancel scope.

        Raises:
            ChannelClosed: the channel is closed or broke.
            trio.TooSlowError: ``timeout`` passed; the message may still go out later.
        """

    @abc.abstractmethod
    async def receive(self) -> Any:
        """Receive and decode the next message.

        Raises:
            ChannelClosed: the peer closed or the connection broke.
            ProtocolError: the peer sent a malformed frame; the channel is now closed.
        """

    def set_max_frame(self, max_frame: int) -> None:
        """From now on accept frames of up to ``max_frame`` bytes (a server raises its
        limit for a peer that proved who it is). A channel without a limit ignores it."""

    @abc.abstractmethod
    async def aclose(self, code: int = 1000, reason: str = "") -> None:
        """Close the channel; idempotent; never raises for an already broken link."""
