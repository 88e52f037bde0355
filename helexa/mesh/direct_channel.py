"""The direct channel: request streams over a plain TCP connection, sealed with keys
that the libp2p connection granted.

py-libp2p's yamux and noise cost some 1.4 ms of CPU per request/response exchange
beyond what a TCP connection with one AEAD seal per write costs (``docs/benchmarks.md``,
issue 17). So a node also listens on a TCP port beside its libp2p listener, and
:meth:`DirectChannel.open` gives a stream over it:

1. the dialer asks the peer for a ticket over a libp2p stream (``/helexa/direct/1``;
   noise has authenticated both ends and keeps the answer secret): port, ticket id,
   random secret, bound to the dialer's peer id (:mod:`.direct_tickets`);
2. it connects to the peer's libp2p address at that port; both send a nonce, derive
   one key per direction from the secret and both nonces, and seal every record after
   (:mod:`.direct_session`);
3. its first record names the protocol; the listener answers ``accepted`` (or ``not
   served``) and runs the handler registered with ``Mesh.serve`` for it, with
   ``remote_peer`` the peer the ticket was granted to.

One stream per connection: the federation keeps idle streams per peer, so a connection
carries request after request. Closing the stream closes the connection; resetting it
aborts it. A ticket serves many connections until it expires or is used up; the dialer
keeps one per peer. Whatever fails on the way (no ticket protocol on an older peer, a
port a firewall drops, a refused handshake) makes :meth:`DirectChannel.open` return
``None``: the caller opens the stream over libp2p, and that peer is not tried directly
again for ``direct_retry_after``.

On the listener, a connection that does not complete its handshake in time, names an
unknown, expired or used-up ticket, replays a nonce, or sends a record that does not
open or is oversized is closed, and only it.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import trio

from helexa.protocol import DecodeError, encode

from .base import DialFailed, StreamClosed, StreamHandler, StreamTimeout
from .direct_session import HELLO_SIZE, NONCE_SIZE, DirectSession, decode_hello, encode_hello
from .direct_tickets import Grant, TicketBook
from .framing import encode_frame
from .settings import MeshSettings
from .streams import FramedStream, run_handler

log = logging.getLogger(__name__)

DIRECT_PROTOCOL = "/helexa/direct/1"
"""The libp2p protocol a ticket is asked for over."""

_ACCEPTED = b"\x01"
_NOT_SERVED = b"\x00"
_READ_CHUNK = 64 * 1024
_MAX_PENDING = 64
"""Handshakes the listener works on at once; connections beyond are closed at once."""

TicketAsker = Callable[[str], Awaitable[tuple[str, bytes]]]
"""``ask(peer) -> (peer's address, grant bytes)`` over the libp2p connection to it."""


class _Unavailable(Exception):
    """The direct channel could not be had for this peer now (fall back to libp2p)."""


class DirectStream(FramedStream):
    """A :class:`~.base.MessageStream` over one sealed TCP connection.

    Reads and writes go straight to the socket (``send``/``recv`` on the non-blocking
    socket, trio's ``wait_readable``/``wait_writable`` only when it must wait), not
    through trio's ``SocketStream``, whose layers cost as much as the system calls on
    both ends of every federated request; a send opens a cancel scope (its deadline)
    only once the socket is full (``docs/benchmarks.md``, issue 17)."""

    def __init__(self, raw: socket.socket, session: DirectSession, remote_peer: str, *, timeout: float,
                 max_frame: int, on_done: Callable[["DirectStream"], None]) -> None:
        super().__init__(remote_peer, timeout=timeout, max_frame=max_frame)
        self._raw = raw
        self._session = session
        self._on_done = on_done
        self._broken = False

    async def send(self, *msgs: Any, timeout: float | None = None) -> None:
        data = b"".join(encode_frame(encode(msg)) for msg in msgs)
        deadline = None
        lock = self._send_lock
        try:
            lock.acquire_nowait()  # uncontended, as it nearly always is
        except trio.WouldBlock:
            deadline = trio.current_time() + (self._timeout if timeout is None else timeout)
            with trio.CancelScope(deadline=deadline) as scope:
                await lock.acquire()
            if scope.cancelled_caught:
                await self.reset()
                raise StreamTimeout(f"send to {self.remote_peer} timed out") from None
        try:
            if self._broken:
                raise StreamClosed(f"direct stream to {self.remote_peer} broke earlier")
            out = memoryview(self._session.seal(data))
            raw = self._raw
            try:
                while out:
                    try:
                        out = out[raw.send(out):]
                    except BlockingIOError:
                        pass
                    if out:  # the socket is full: wait for room, under the send's deadline
                        if deadline is None:
                            deadline = trio.current_time() + (self._timeout if timeout is None else timeout)
                        with trio.CancelScope(deadline=deadline):
                            await trio.lowlevel.wait_writable(raw)
                        if trio.current_time() >= deadline:
                            break
            except (OSError, trio.ClosedResourceError) as exc:
                self._broken = True
                raise StreamClosed(f"direct stream to {self.remote_peer} broke: {type(exc).__name__}") from None
            finally:
                # A write cut short (cancelled, or past its deadline) leaves half a record
                # on the wire: the stream cannot carry another.
                self._broken = self._broken or bool(out)
        finally:
            lock.release()
        if out:
            await self.reset()
            raise StreamTimeout(f"send to {self.remote_peer} timed out")

    async def _write_raw(self, data: bytes) -> None:
        raise AssertionError("DirectStream.send writes itself")  # pragma: no cover

    async def _read_raw(self) -> bytes:
        session, raw = self._session, self._raw
        try:
            while True:
                record = session.next_record()
                if record:
                    return record
                if record is None:
                    await trio.lowlevel.wait_readable(raw)
                    try:
                        data = raw.recv(_READ_CHUNK)
                    except BlockingIOError:
                        continue
                    if not data:
                        return b""
                    session.feed(data)
        except (OSError, trio.ClosedResourceError) as exc:
            raise StreamClosed(f"direct stream from {self.remote_peer} broke: {type(exc).__name__}") from None

    async def _close_raw(self) -> None:
        self._close_socket()
        await trio.lowlevel.checkpoint()

    async def _reset_raw(self) -> None:
        try:
            # An abort, as a reset is on a muxed stream: RST, no FIN, no TIME_WAIT.
            self._raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        self._close_socket()
        await trio.lowlevel.checkpoint()

    def _close_socket(self) -> None:
        try:
            if self._raw.fileno() != -1:
                trio.lowlevel.notify_closing(self._raw)  # wakes a task waiting on it
                self._raw.close()
        finally:
            self._on_done(self)


async def read_record(sock: trio.SocketStream, session: DirectSession) -> bytes:
    """The next record's plaintext from ``sock``; ``b""`` at end of stream.

    Raises:
        DecodeError: a record did not open or was oversized.
        trio.BrokenResourceError, trio.ClosedResourceError: the connection broke."""
    while True:
        record = session.next_record()
        if record:
            return record
        if record is None:
            data = await sock.receive_some(_READ_CHUNK)
            if not data:
                return b""
            session.feed(data)


async def _read_exactly(sock: trio.SocketStream, size: int) -> tuple[bytes, bytes]:
    """``size`` bytes and whatever arrived after them."""
    buf = b""
    while len(buf) < size:
        data = await sock.receive_some(_READ_CHUNK)
        if not data:
            raise _Unavailable("the connection closed during the handshake")
        buf += data
    return buf[:size], buf[size:]


@dataclass(slots=True)
class DirectStats:
    """Counters of one node's direct channel (for tests, benchmarks and logs)."""

    opened: int = 0
    """Streams this node opened over it."""
    accepted: int = 0
    """Streams peers opened to this node over it."""
    fallbacks: int = 0
    """Opens that went over libp2p because the channel could not be had."""
    refused: int = 0
    """Inbound connections closed during the handshake."""


@dataclass(slots=True)
class _Held:
    grant: Grant
    address: str
    expires: float
    uses_left: int


class DirectChannel:
    """Both ends of one node's direct channel.

    Args:
        settings: the mesh's settings (``direct_*``, ``stream_timeout``, ``max_frame``).
        handlers: protocol -> handler, the mesh's own map (read at each connection).
    """

    def __init__(self, settings: MeshSettings, handlers: Mapping[str, StreamHandler]) -> None:
        self._settings = settings
        self._handlers = handlers
        self._book: TicketBook | None = None
        self._held: dict[str, _Held] = {}
        self._asking: dict[str, trio.Lock] = {}
        self._retry_at: dict[str, float] = {}
        self._live: dict[str, set[DirectStream]] = {}
        self._pending = 0
        self.stats = DirectStats()

    @property
    def port(self) -> int | None:
        """The listener's port once :meth:`run` has started (``None`` before)."""
        return None if self._book is None else self._book.port

    # --- the listening end -----------------------------------------------------------------

    async def run(self, host: str, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Listen on ``host`` at ``direct_port`` until cancelled; ``started(port)``.

        Raises:
            OSError: the port could not be bound (before ``started``)."""
        s = self._settings
        listeners = await trio.open_tcp_listeners(s.direct_port, host=host)
        try:
            port = listeners[0].socket.getsockname()[1]
            self._book = TicketBook(port, ttl=s.direct_ticket_ttl, max_tickets=s.direct_max_tickets)
            task_status.started(port)
            await trio.serve_listeners(self._accept, listeners)
        finally:
            self._book = None
            for listener in listeners:
                await trio.aclose_forcefully(listener)

    def grant(self, peer: str) -> bytes:
        """A new ticket for ``peer`` (authenticated by the libp2p connection it asked
        over), encoded for the wire.

        Raises:
            RuntimeError: the listener is not running."""
        if self._book is None:
            raise RuntimeError("the direct listener is not running")
        return self._book.issue(peer, trio.current_time()).encode()

    async def _accept(self, sock: trio.SocketStream) -> None:
        if self._pending >= _MAX_PENDING:
            self.stats.refused += 1
            await trio.aclose_forcefully(sock)
            return
        self._pending += 1
        accepted = None
        try:
            with trio.move_on_after(min(self._settings.direct_timeout, self._settings.stream_timeout)):
                accepted = await self._handshake(sock)
        except Exception as exc:  # whatever a peer sends, only its connection pays
            log.debug("direct: a handshake failed: %s", str(exc) or type(exc).__name__)
        finally:
            self._pending -= 1
        if accepted is None:
            self.stats.refused += 1
            await trio.aclose_forcefully(sock)
            return
        stream, handler, protocol = accepted
        self.stats.accepted += 1
        await run_handler(handler, stream, protocol)

    async def _handshake(self, sock: trio.SocketStream) -> tuple[DirectStream, StreamHandler, str] | None:
        hello, rest = await _read_exactly(sock, HELLO_SIZE)
        ticket_id, dialer_nonce = decode_hello(hello)
        book = self._book
        redeemed = None if book is None else book.redeem(ticket_id, dialer_nonce, trio.current_time())
        if redeemed is None:
            return None
        peer, secret = redeemed
        nonce = os.urandom(NONCE_SIZE)
        await sock.send_all(nonce)
        session = DirectSession(secret, ticket_id, dialer_nonce, nonce, dialer=False)
        session.feed(rest)
        protocol = (await read_record(sock, session)).decode("utf-8", "replace")
        handler = self._handlers.get(protocol)
        if handler is None:
            await sock.send_all(session.seal(_NOT_SERVED))
            return None
        await sock.send_all(session.seal(_ACCEPTED))
        return self._stream(sock, session, peer), handler, protocol

    # --- the dialling end ------------------------------------------------------------------

    async def open(self, peer: str, protocols: Sequence[str], ask: TicketAsker, *,
                   deadline: float) -> DirectStream | None:
        """A stream to ``peer`` over the direct channel speaking the first of
        ``protocols`` the peer serves (its listener closes a connection that names one
        it does not: each other choice costs a connection), or ``None`` if it cannot be
        had now (open it over libp2p then). Takes at most ``direct_timeout`` or half the
        time left before ``deadline``.

        Raises:
            DialFailed: the peer's direct listener says it serves none of ``protocols``."""
        now = trio.current_time()
        if self._retry_at.get(peer, 0.0) > now:
            return None
        try:
            with trio.fail_after(max(0.0, min(self._settings.direct_timeout, (deadline - now) / 2))):
                for protocol in protocols[:-1]:
                    try:
                        return await self._open(peer, protocol, ask)
                    except DialFailed:
                        continue  # not served there: the next choice
                return await self._open(peer, protocols[-1], ask)
        except DialFailed:
            raise
        except (trio.TooSlowError, _Unavailable, DecodeError, trio.BrokenResourceError, trio.ClosedResourceError,
                OSError) as exc:
            self.stats.fallbacks += 1
            self._retry_at[peer] = trio.current_time() + self._settings.direct_retry_after
            log.info("direct: %s not reached directly (%s); over libp2p for %.0fs", peer,
                     str(exc) or type(exc).__name__, self._settings.direct_retry_after)
            return None

    async def _open(self, peer: str, protocol: str, ask: TicketAsker) -> DirectStream:
        for _ in range(2):
            held, fresh = await self._ticket(peer, ask)
            try:
                return await self._dial(peer, protocol, held)
            except (_Unavailable, DecodeError, trio.BrokenResourceError, OSError):
                # The peer may have restarted (new port, tickets forgotten): one more try
                # with a new ticket before giving up on it.
                if self._held.get(peer) is held:
                    del self._held[peer]
                if fresh:
                    raise
        raise AssertionError("unreachable")

    async def _ticket(self, peer: str, ask: TicketAsker) -> tuple[_Held, bool]:
        """A usable ticket for ``peer`` (asked for if none), and whether it is new."""
        lock = self._asking.setdefault(peer, trio.Lock())
        async with lock:  # concurrent opens to a new peer share one ticket
            held = self._held.get(peer)
            now = trio.current_time()
            if held is not None and now < held.expires and held.uses_left > 0:
                held.uses_left -= 1
                return held, False
            try:
                address, data = await ask(peer)
            except trio.Cancelled:
                raise
            except Exception as exc:
                raise _Unavailable(f"no ticket: {str(exc) or type(exc).__name__}") from None
            grant = Grant.decode(data)
            # Renewed a tenth before it runs out, so a connection never races the expiry.
            held = _Held(grant, address, trio.current_time() + grant.ttl * 0.9, grant.max_uses - 1)
            self._held[peer] = held
            return held, True

    async def _dial(self, peer: str, protocol: str, held: _Held) -> DirectStream:
        grant = held.grant
        sock = await trio.open_tcp_stream(held.address, grant.port)
        try:
            nonce = os.urandom(NONCE_SIZE)
            await sock.send_all(encode_hello(grant.ticket_id, nonce))
            their_nonce, rest = await _read_exactly(sock, NONCE_SIZE)
            session = DirectSession(grant.secret, grant.ticket_id, nonce, their_nonce, dialer=True)
            session.feed(rest)
            await sock.send_all(session.seal(protocol.encode()))
            answer = await read_record(sock, session)
            if answer == _NOT_SERVED:
                raise DialFailed(f"{peer} does not serve {protocol}")
            if answer != _ACCEPTED:
                raise _Unavailable("the listener closed the connection")
        except BaseException:
            await trio.aclose_forcefully(sock)
            raise
        self.stats.opened += 1
        stream = self._stream(sock, session, peer)
        stream.protocol = protocol
        return stream

    # --- streams of both ends ------------------------------------------------------------

    def _stream(self, sock: trio.SocketStream, session: DirectSession, peer: str) -> DirectStream:
        s = self._settings
        # The standard socket is taken out of trio's stream (which is left closed, so that
        # closing it later is a no-op): the DirectStream reads and writes it itself.
        raw = socket.socket(fileno=sock.socket.detach())
        raw.setblocking(False)
        stream = DirectStream(raw, session, peer, timeout=s.stream_timeout, max_frame=s.max_frame,
                              on_done=self._forget)
        self._live.setdefault(peer, set()).add(stream)
        return stream

    def _forget(self, stream: DirectStream) -> None:
        live = self._live.get(stream.remote_peer)
        if live is not None:
            live.discard(stream)
            if not live:
                del self._live[stream.remote_peer]

    def live(self, peer: str) -> int:
        """Direct streams open to or from ``peer`` now."""
        return len(self._live.get(peer, ()))

    async def abort_peer(self, peer: str) -> None:
        """Reset every direct stream to or from ``peer`` (the mesh found it silent, as it
        closes its libp2p connection) and forget its ticket."""
        self._held.pop(peer, None)
        for stream in list(self._live.get(peer, ())):
            await stream.reset()
