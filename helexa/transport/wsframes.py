"""One websocket connection after its upgrade (RFC 6455), sans-IO, from either side.

Bytes from the peer go in (:meth:`Connection.receive_data`), events come out
(:meth:`Connection.next_event`); what this side says becomes bytes to write
(:meth:`Connection.message`, :meth:`~Connection.close`, :meth:`~Connection.pong`).
:class:`ServerConnection` reads masked frames and writes plain ones;
:class:`ClientConnection` the reverse. No sockets, no trio: :mod:`.ws_channel` is the
shell that moves the bytes.

Why it exists beside wsproto (which trio-websocket drives): the cortex reads a heartbeat
from every neuron every second, and trio-websocket's reader task per connection, its
memory channel and wsproto's general frame machinery cost more than a third of the
cortex's CPU per heartbeat (``docs/reliability.md``, "Join storms"); on the neuron they
were the largest part of its transport's cost per request (docs/benchmarks.md, issue 17).
This reads only what the control plane needs: no extensions.

The states, as one table (:data:`MOVES`)::

    OPEN ──close()──────────▶ CLOSE_SENT ──peer's Close──▶ CLOSED
      └───peer's Close──────▶ CLOSE_RECEIVED ──close()───▶ CLOSED

A frame that breaks the protocol raises :class:`FrameError` with the close code to answer
(1002 protocol error, 1009 too big, 1007 a close reason that is not UTF-8); the caller
writes ``close(exc.code)`` and drops the connection without waiting for an answer.
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass

BINARY, TEXT, CONTINUATION, CLOSE, PING, PONG = 0x2, 0x1, 0x0, 0x8, 0x9, 0xA
_DATA = frozenset({BINARY, TEXT})
_KNOWN = frozenset({BINARY, TEXT, CONTINUATION, CLOSE, PING, PONG})

CLOSE_NORMAL = 1000
CLOSE_NO_STATUS = 1005  # what a Close without a code reports; never sent
CLOSE_ABNORMAL = 1006  # the connection ended without a Close; never sent
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_BAD_DATA = 1007
CLOSE_TOO_BIG = 1009


class FrameError(Exception):
    """The peer broke RFC 6455; ``code`` is the close code to answer with."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class LocalError(Exception):
    """This side asked for something its state does not allow (a bug in the caller)."""


@dataclass(frozen=True, slots=True)
class Message:
    """One whole data message (its fragments joined); ``text`` for an opcode-1 message."""

    data: bytes
    text: bool = False


@dataclass(frozen=True, slots=True)
class Ping:
    payload: bytes


@dataclass(frozen=True, slots=True)
class Pong:
    payload: bytes


@dataclass(frozen=True, slots=True)
class CloseReceived:
    """The peer's Close frame: its code (1005 when it gave none) and reason."""

    code: int
    reason: str


class State(enum.Enum):
    OPEN = "open"
    CLOSE_SENT = "close sent"
    CLOSE_RECEIVED = "close received"
    CLOSED = "closed"


class Trigger(enum.Enum):
    SEND_CLOSE = "send close"
    RECEIVE_CLOSE = "receive close"


MOVES: dict[tuple[State, Trigger], State] = {
    (State.OPEN, Trigger.SEND_CLOSE): State.CLOSE_SENT,
    (State.OPEN, Trigger.RECEIVE_CLOSE): State.CLOSE_RECEIVED,
    (State.CLOSE_SENT, Trigger.RECEIVE_CLOSE): State.CLOSED,
    (State.CLOSE_RECEIVED, Trigger.SEND_CLOSE): State.CLOSED,
}


def server_frame(payload: bytes, opcode: int = BINARY) -> bytes:
    """One final, unmasked frame (a server never masks)."""
    n = len(payload)
    if n < 126:
        return bytes((0x80 | opcode, n)) + payload
    if n < 65536:
        return bytes((0x80 | opcode, 126)) + n.to_bytes(2, "big") + payload
    return bytes((0x80 | opcode, 127)) + n.to_bytes(8, "big") + payload


_KEYS = b""
_KEYS_POS = 0


def _mask_key() -> bytes:
    """Four bytes from the system's random source, drawn a page at a time (one system call
    per 1,024 frames rather than one per frame)."""
    global _KEYS, _KEYS_POS
    if _KEYS_POS >= len(_KEYS):
        _KEYS, _KEYS_POS = os.urandom(4096), 0
    _KEYS_POS += 4
    return _KEYS[_KEYS_POS - 4:_KEYS_POS]


def _forget_keys() -> None:
    global _KEYS, _KEYS_POS
    _KEYS, _KEYS_POS = b"", 0


os.register_at_fork(after_in_child=_forget_keys)  # a forked child never reuses its parent's keys


def client_frame(payload: bytes, opcode: int = BINARY) -> bytes:
    """One final frame, masked with a fresh random key (a client always masks)."""
    n = len(payload)
    key = _mask_key()
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        head = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
    return head + key + unmask(payload, key)


def unmask(payload: bytes, key: bytes) -> bytes:
    """``payload`` XOR the repeated 4-byte ``key``, as one big-integer XOR (C speed)."""
    n = len(payload)
    if not n:
        return b""
    mask = (key * ((n >> 2) + 1))[:n]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(mask, "little")).to_bytes(n, "little")


class Connection:
    """One upgraded connection; use :class:`ServerConnection` or :class:`ClientConnection`.

    Args:
        max_message: the largest message accepted (all fragments together); a bigger one
            raises :class:`FrameError` with 1009 as soon as its header says so.
    """

    __slots__ = ("max_message", "state", "_buf", "_pos", "_fragments", "_fragment_size", "_fragment_text")

    _PEER_MASKS = True
    """Whether the peer's frames carry a mask (a client's do, a server's must not)."""

    def __init__(self, max_message: int) -> None:
        self.max_message = max_message
        self.state = State.OPEN
        self._buf = b""
        self._pos = 0
        self._fragments: list[bytes] | None = None  # a fragmented message under way
        self._fragment_size = 0
        self._fragment_text = False

    def _move(self, trigger: Trigger) -> None:
        try:
            self.state = MOVES[(self.state, trigger)]
        except KeyError:
            raise LocalError(f"cannot {trigger.value} in state {self.state.value}") from None

    # --- bytes in, events out -------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Add bytes read from the peer (after the upgrade's head)."""
        if self._pos >= len(self._buf):
            self._buf, self._pos = data, 0
        else:
            self._buf, self._pos = self._buf[self._pos:] + data, 0

    def next_event(self) -> Message | Ping | Pong | CloseReceived | None:
        """The next whole event, or None until more bytes come.

        Raises:
            FrameError: the peer broke the protocol (answer ``close(exc.code)``).
        """
        masked = self._PEER_MASKS
        while True:
            buf, pos = self._buf, self._pos
            avail = len(buf) - pos
            if avail < 2 or self.state is State.CLOSED or self.state is State.CLOSE_RECEIVED:
                return None
            b0, b1 = buf[pos], buf[pos + 1]
            opcode, n, off = b0 & 0x0F, b1 & 0x7F, 2
            if n == 126:
                if avail < 4:
                    return None
                n, off = int.from_bytes(buf[pos + 2:pos + 4], "big"), 4
            elif n == 127:
                if avail < 10:
                    return None
                n, off = int.from_bytes(buf[pos + 2:pos + 10], "big"), 10
            self._check_header(b0, b1, opcode, n)
            if masked:
                end = off + 4 + n
                if avail < end:
                    return None
                payload = unmask(buf[pos + off + 4:pos + end], buf[pos + off:pos + off + 4])
            else:
                end = off + n
                if avail < end:
                    return None
                payload = buf[pos + off:pos + end]
            self._pos = pos + end
            if opcode >= CLOSE:
                return self._control(opcode, payload)
            event = self._data(b0, opcode, payload)
            if event is not None:
                return event

    def _check_header(self, b0: int, b1: int, opcode: int, n: int) -> None:
        if b0 & 0x70:
            raise FrameError(CLOSE_PROTOCOL_ERROR, "reserved bits set (no extension was agreed)")
        if opcode not in _KNOWN:
            raise FrameError(CLOSE_PROTOCOL_ERROR, f"unknown opcode {opcode}")
        if bool(b1 & 0x80) is not self._PEER_MASKS:
            raise FrameError(CLOSE_PROTOCOL_ERROR, "a client frame must be masked" if self._PEER_MASKS
                             else "a server frame must not be masked")
        if opcode >= CLOSE:
            if not b0 & 0x80 or n > 125:
                raise FrameError(CLOSE_PROTOCOL_ERROR, "a control frame must be final and at most 125 bytes")
            return
        if opcode == CONTINUATION:
            if self._fragments is None:
                raise FrameError(CLOSE_PROTOCOL_ERROR, "a continuation frame with no message under way")
            n += self._fragment_size
        elif self._fragments is not None:
            raise FrameError(CLOSE_PROTOCOL_ERROR, "a new message before the last one was finished")
        if n > self.max_message:
            raise FrameError(CLOSE_TOO_BIG, f"message of {n} bytes is over the limit of {self.max_message}")

    def _data(self, b0: int, opcode: int, payload: bytes) -> Message | None:
        final = b0 & 0x80
        if opcode != CONTINUATION:
            if final:
                return Message(payload, opcode == TEXT)
            self._fragments, self._fragment_size, self._fragment_text = [payload], len(payload), opcode == TEXT
            return None
        assert self._fragments is not None
        self._fragments.append(payload)
        self._fragment_size += len(payload)
        if not final:
            return None
        data, text = b"".join(self._fragments), self._fragment_text
        self._fragments, self._fragment_size = None, 0
        return Message(data, text)

    def _control(self, opcode: int, payload: bytes) -> Ping | Pong | CloseReceived:
        if opcode == PING:
            return Ping(payload)
        if opcode == PONG:
            return Pong(payload)
        if len(payload) == 1:
            raise FrameError(CLOSE_PROTOCOL_ERROR, "a close frame with a one-byte payload")
        code = int.from_bytes(payload[:2], "big") if payload else CLOSE_NO_STATUS
        try:
            reason = payload[2:].decode()
        except UnicodeDecodeError:
            raise FrameError(CLOSE_BAD_DATA, "a close reason that is not UTF-8") from None
        self._move(Trigger.RECEIVE_CLOSE)
        return CloseReceived(code, reason)

    # --- what this side says, as bytes -------------------------------------------------------

    @staticmethod
    def _frame(payload: bytes, opcode: int = BINARY) -> bytes:
        return server_frame(payload, opcode)

    def message(self, data: bytes) -> bytes:
        """One binary message, to write. Raises :class:`LocalError` once a close was sent."""
        if self.state is not State.OPEN and self.state is not State.CLOSE_RECEIVED:
            raise LocalError(f"cannot send a message in state {self.state.value}")
        return self._frame(data)

    def pong(self, payload: bytes) -> bytes:
        """The answer to the peer's Ping."""
        return self._frame(payload, PONG)

    def ping(self, payload: bytes = b"") -> bytes:
        """A Ping (at most 125 bytes of payload)."""
        return self._frame(payload[:125], PING)

    def close(self, code: int = CLOSE_NORMAL, reason: str = "") -> bytes:
        """The Close frame to write (``reason`` cut to fit a control frame)."""
        self._move(Trigger.SEND_CLOSE)
        raw = reason.encode()[:123]
        while raw:
            try:
                raw.decode()
                break
            except UnicodeDecodeError:  # cut inside a character
                raw = raw[:-1]
        return self._frame(code.to_bytes(2, "big") + raw, CLOSE)


class ServerConnection(Connection):
    """The server's side: reads masked client frames, writes plain ones."""

    __slots__ = ()


class ClientConnection(Connection):
    """The client's side: reads plain server frames, writes masked ones."""

    __slots__ = ()
    _PEER_MASKS = False

    @staticmethod
    def _frame(payload: bytes, opcode: int = BINARY) -> bytes:
        return client_frame(payload, opcode)
