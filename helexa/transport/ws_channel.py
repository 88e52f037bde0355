"""One upgraded websocket connection as a :class:`Channel`: the trio shell around a sans-IO
:class:`.wsframes.Connection`, the same on both sides (:class:`ServerChannel` in the
cortex, :class:`ClientChannel` in a neuron).

There is no reader task and no writer task. ``receive()`` reads and parses frames in the
caller's task. ``send()`` queues its frame and, unless another task is already writing,
writes everything queued in one system call; when other tasks are runnable it first
yields once, so every frame sent in the same scheduler tick goes out in that one write
(at c=16 a neuron's answers and a cortex's requests come in bursts). A frame queued behind
a write under way returns at once, as a frame handed to the kernel does; past
:data:`HIGH_WATER` bytes queued a sender waits for room. A send's ``timeout`` applies only
where it waits (a full socket, no room): the common case opens no cancel scope.

Close codes used: 1000 normal, 1001 going away, 1002 protocol error (malformed or unknown
frame), 1007 bad data, 1008 policy violation (refused join), 1009 frame too large, 1013
try again later.
"""

from __future__ import annotations

import logging
import socket
from typing import Any

import trio
from trio._core._run import GLOBAL_RUN_CONTEXT as _RUN_CONTEXT  # see _others_runnable

from helexa.protocol import Fault, ProtocolError, decode, encode

from . import wsframes, wsupgrade
from .admission import ReadBudget
from .channel import Channel, ChannelClosed, Screened

log = logging.getLogger(__name__)

CLOSE_PROTOCOL_ERROR = 1002
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009
CLOSE_TRY_LATER = 1013

READ_SIZE = 65536
"""The most bytes read in one system call. Not more: CPython allocates the whole size for
every read, and past glibc's mmap threshold (128 KiB) each read maps and unmaps memory
(measured on a socket pair: a 300-byte read took 5 us with 64 KiB, 35 us with 256 KiB)."""
HIGH_WATER = 1 << 20
"""Bytes queued behind a write under way past which a sender waits for room."""
CLOSE_WAIT = 2.0
"""Seconds a close waits for the peer's answering Close before it drops the socket."""
PONG_WAIT = 10.0
"""Seconds an answer to the peer's websocket ping may take to be written."""


def _others_runnable() -> bool:
    """Whether other tasks wait to run (then a send yields once before it writes).

    Read from trio's run queue directly: ``trio.lowlevel.current_statistics()`` says the
    same, but also counts every registered socket (O(connections) per call: a cortex with
    thousands of neurons would pay that on every send). ``tests/transport`` checks that
    this still reads trio's queue."""
    runner = getattr(_RUN_CONTEXT, "runner", None)
    return bool(runner.runq) if runner is not None else False


async def read_head(stream: trio.abc.Stream) -> tuple[bytes, bytes] | None:
    """The upgrade's HTTP head read from ``stream`` (the caller holds the deadline) and the
    bytes that came after it; ``None`` when the peer closed first.

    Raises:
        wsupgrade.UpgradeRejected: 431, no end of the head within its size limit."""
    buf = b""
    while (end := wsupgrade.head_end(buf)) < 0:
        data = await stream.receive_some(READ_SIZE)
        if not data:
            return None
        buf += data
    return buf[:end], buf[end:]


def _deadline(timeout: float | None) -> trio.CancelScope:
    return trio.CancelScope() if timeout is None else trio.move_on_after(timeout)


_BROKEN = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


class FrameChannel(Channel):
    """A :class:`Channel` over one upgraded connection.

    ``receive`` is for one reader task; ``send`` may be called from any number of tasks
    (frames never interleave). ``aclose`` may be called from any task, also while another
    one waits in ``receive``: it sends the Close, and the reader (or ``aclose`` itself,
    when nobody reads) waits up to 2 s for the peer's answering Close before the socket
    is dropped.

    Args:
        stream: the connection (plain or TLS), after the upgrade.
        conn: the sans-IO side, holding any bytes read past the upgrade's head.
        raw: the plain socket under ``stream`` (not under TLS), then read and written
            directly: trio's stream wrappers cost more than the system calls they make.
        eager_read: try a read before waiting for the socket (where data usually waits).
    """

    def __init__(self, stream: trio.abc.Stream, conn: wsframes.Connection, *, max_frame: int,
                 remote: str, raw: socket.socket | None = None, eager_read: bool = False,
                 budget: ReadBudget | None = None) -> None:
        self._stream = stream
        self._budget = budget  # until set_max_frame: what this connection reads is charged to it
        self._charged = 0
        self._raw = raw
        self._conn = conn
        self._max_frame = max_frame
        self._eager_read = eager_read
        self.remote = remote
        self._out: list[bytes] = []  # frames queued, in order; the first may be a frame's rest
        self._out_size = 0
        self._writing = False  # a task is writing _out
        self._room: trio.Event | None = None  # set when a write ends (senders waiting for room)
        self._reading = False
        self._closed = False  # the socket is gone
        self._gone = trio.Event()  # set with _closed
        self._close_code: int | None = None  # the peer's Close, once read

    def set_max_frame(self, max_frame: int) -> None:
        """The peer proved who it is: frames up to ``max_frame``, and no longer charged to the
        pre-join read budget."""
        self._max_frame = max_frame
        self._conn.max_message = max_frame + 64  # as the server sized it (ws_server.serve)
        self._release_budget()

    def _release_budget(self) -> None:
        if self._budget is not None:
            self._budget.give(self._charged)
            self._budget = None
            self._charged = 0

    def _read_size(self) -> int:
        """How much the next read may take (the pre-join budget's room); raises _BudgetSpent."""
        budget = self._budget
        if budget is None:
            return READ_SIZE
        room = budget.room()
        if room <= 0:
            budget.refused += 1
            raise _BudgetSpent
        return min(READ_SIZE, room)

    def _charge(self, n: int) -> None:
        if self._budget is not None:
            self._budget.take(n)
            self._charged += n

    # --- sending --------------------------------------------------------------------------

    async def send(self, msg: Any, *, timeout: float | None = None) -> None:
        if self._conn.state is not wsframes.State.OPEN or self._closed:
            raise ChannelClosed("channel closed", code=self._close_code)
        await self._write(self._conn.message(encode(msg)), timeout)

    async def _write(self, frame: bytes, timeout: float | None = None) -> None:
        if self._closed:
            raise ChannelClosed("channel closed", code=self._close_code)
        self._out.append(frame)
        self._out_size += len(frame)
        if self._writing:  # the task writing takes this frame too
            if self._out_size > HIGH_WATER:
                with _deadline(timeout) as scope:
                    await self._wait_room()
                if scope.cancelled_caught:
                    raise trio.TooSlowError
            return
        await self._flush(timeout)

    async def _wait_room(self) -> None:
        while self._writing and self._out_size > HIGH_WATER:
            if self._room is None:
                self._room = trio.Event()
            await self._room.wait()
        if not self._writing and self._out:  # the writer gave up (cancelled): take over
            await self._flush()

    async def _flush(self, timeout: float | None = None) -> None:
        """Write everything queued, in as few writes as the kernel allows. Stopped while
        the socket is full (cancelled, or ``timeout`` passed: TooSlowError), the rest stays
        queued for the next sender (or one waiting for room); under TLS a stopped write
        breaks the stream."""
        self._writing = True
        try:
            if _others_runnable():
                # Let the other tasks of this tick queue their frames into this write.
                await trio.lowlevel.cancel_shielded_checkpoint()
            raw = self._raw
            deadline: float | None = None
            while self._out:
                out = self._out
                data = out[0] if len(out) == 1 else b"".join(out)
                out.clear()
                self._out_size = 0
                if raw is None:
                    with _deadline(timeout) as scope:
                        await self._stream.send_all(data)
                    if scope.cancelled_caught:
                        raise trio.TooSlowError
                    continue
                try:
                    sent = raw.send(data)
                except BlockingIOError:
                    sent = 0
                if sent < len(data):
                    rest = data[sent:]
                    out.insert(0, rest)
                    self._out_size += len(rest)
                    if timeout is None:
                        await trio.lowlevel.wait_writable(raw)
                        continue
                    if deadline is None:  # the deadline starts with the first wait
                        deadline = trio.current_time() + timeout
                    with trio.CancelScope(deadline=deadline) as scope:
                        await trio.lowlevel.wait_writable(raw)
                    if scope.cancelled_caught:
                        raise trio.TooSlowError
        except _BROKEN as exc:
            self._out.clear()
            self._out_size = 0
            raise ChannelClosed(f"connection broken: {exc}", code=self._close_code) from None
        finally:
            self._writing = False
            if self._room is not None:
                self._room.set()
                self._room = None

    # --- receiving ------------------------------------------------------------------------

    async def receive(self) -> Any:
        conn = self._conn
        while True:
            try:
                event = conn.next_event()
            except wsframes.FrameError as exc:
                error = ProtocolError(f"websocket: {exc.reason}",
                                      code="oversized" if exc.code == CLOSE_TOO_BIG else "bad_frame")
                await self._fail(error, exc.code)
                raise error from None
            if event is None:
                await self._read_more()
                continue
            match event:
                case wsframes.Message(data=data, text=False):
                    if self.screen is not None and (why := self.screen(data)) is not None:
                        raise Screened(why)
                    try:
                        return decode(data, max_size=self._max_frame)
                    except ProtocolError as exc:
                        await self._fail(exc, CLOSE_TOO_BIG if exc.code == "oversized" else CLOSE_PROTOCOL_ERROR)
                        raise
                case wsframes.Message():
                    error = ProtocolError("text frames are not part of the protocol")
                    await self._fail(error, CLOSE_PROTOCOL_ERROR)
                    raise error
                case wsframes.Ping(payload=payload):
                    if conn.state is wsframes.State.OPEN:
                        with trio.move_on_after(PONG_WAIT) as scope:
                            try:
                                await self._write(conn.pong(payload))
                            except ChannelClosed:
                                pass
                        if scope.cancelled_caught:  # a peer that pings and does not read
                            await self._drop()
                            raise ChannelClosed("a websocket pong could not be sent in time")
                case wsframes.Pong():
                    pass
                case wsframes.CloseReceived(code=code, reason=reason):
                    self._close_code = code
                    if conn.state is wsframes.State.CLOSE_RECEIVED:  # the peer closed first: answer
                        with trio.move_on_after(CLOSE_WAIT) as scope:
                            scope.shield = True
                            try:
                                await self._write(conn.close(code if code != wsframes.CLOSE_NO_STATUS
                                                             else wsframes.CLOSE_NORMAL))
                            except ChannelClosed:
                                pass
                    await self._drop()
                    raise ChannelClosed(f"closed by peer: {code} {reason}".strip(), code=code, reason=reason)

    async def _read_more(self) -> None:
        if self._closed:
            raise ChannelClosed("channel closed", code=self._close_code)
        self._reading = True
        spent = False
        try:
            if self._raw is not None:
                data = await self._recv(self._raw)
            else:  # (TLS: the room is checked before the wait, so the budget may be passed by a read each)
                data = await self._stream.receive_some(self._read_size())
        except _BudgetSpent:
            spent = True
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError, ValueError) as exc:
            await self._drop()
            raise ChannelClosed(f"connection broken: {exc}", code=self._close_code) from None
        finally:
            self._reading = False
        if spent:
            log.warning("closing %s before its join: the bytes read from connections not yet joined are at "
                        "their limit (max_handshake_bytes); it may retry later", self.remote)
            with trio.move_on_after(CLOSE_WAIT) as scope:  # not aclose: it would read the peer's Close
                scope.shield = True
                if self._conn.state is wsframes.State.OPEN:
                    try:
                        await self._write(self._conn.close(CLOSE_TRY_LATER, "busy with other joins: retry later"))
                    except ChannelClosed:
                        pass
            await self._drop()
            raise ChannelClosed("the pre-join read budget is spent", code=CLOSE_TRY_LATER)
        self._charge(len(data))
        if not data:
            await self._drop()
            raise ChannelClosed("connection lost (no close frame)", code=self._close_code or wsframes.CLOSE_ABNORMAL)
        self._conn.receive_data(data)

    async def _recv(self, sock: socket.socket) -> bytes:
        # Where frames seldom wait (a cortex reading a neuron's heartbeat a second), wait
        # first, then read: trying the read first would nearly always cost a failed system
        # call. Where they usually do (a neuron under load), read first; the wait is
        # then skipped, so a checkpoint is taken by hand.
        if self._eager_read:
            await trio.lowlevel.checkpoint_if_cancelled()
            try:
                data = sock.recv(self._read_size())
            except BlockingIOError:
                pass
            else:
                # A schedule point, not a cancel point: the bytes are read, and a cancel
                # here would drop them unparsed (the cancel point is before the read).
                await trio.lowlevel.cancel_shielded_checkpoint()
                return data
        while True:
            await trio.lowlevel.wait_readable(sock)
            try:
                return sock.recv(self._read_size())  # (no checkpoint between the room and the read)
            except BlockingIOError:
                continue

    async def _fail(self, exc: ProtocolError, code: int) -> None:
        """Tell the peer (a Fault, then a Close with ``code``) and drop the connection;
        the caller raises ``exc``."""
        log.warning("protocol error from %s: %s; closing", self.remote, exc)
        with trio.move_on_after(CLOSE_WAIT) as scope:
            scope.shield = True
            if self._conn.state is wsframes.State.OPEN:
                try:
                    await self.send(Fault(exc.code, str(exc)))
                    await self._write(self._conn.close(code, exc.code))
                except ChannelClosed:
                    pass
        # The peer's answering Close is not awaited: it broke the protocol.
        await self._drop()

    # --- closing --------------------------------------------------------------------------

    async def aclose(self, code: int = 1000, reason: str = "") -> None:
        if self._closed:
            return
        with trio.move_on_after(CLOSE_WAIT) as scope:
            scope.shield = True
            if self._conn.state is wsframes.State.OPEN:
                try:
                    await self._write(self._conn.close(code, reason))
                except ChannelClosed:
                    pass
            if self._reading:
                await self._gone.wait()  # the reader reads the peer's Close and drops the socket
            else:
                try:
                    while not self._closed and self._conn.state is wsframes.State.CLOSE_SENT:
                        await self.receive()  # frames after our Close are dropped unread
                except (ChannelClosed, ProtocolError):
                    pass
        await self._drop()

    async def _drop(self) -> None:
        self._release_budget()
        if not self._closed:
            self._closed = True
            self._gone.set()
            await trio.aclose_forcefully(self._stream)  # wakes a writer waiting on the socket


class _BudgetSpent(Exception):
    """A pending connection may read no more: the pre-join read budget is spent."""


class ServerChannel(FrameChannel):
    """The cortex's side of a neuron's connection (see :mod:`.ws_server`)."""


class ClientChannel(FrameChannel):
    """A neuron's side of its connection to the cortex (see :mod:`.ws_client`)."""
