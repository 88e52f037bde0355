"""A swarm of lean simulated neurons in one process, for the control-plane benchmark.

Each simulated neuron behaves as :class:`helexa.roles.neuron.connection.Connection` does
on the wire: it dials the cortex, joins with the real sans-IO
:class:`~helexa.protocol.join.NeuronJoin` (Hello, Challenge, Join with the HMAC proof,
Welcome), heartbeats every ``heartbeat_interval`` on its own phase, answers ``Ping``, and
after a drop or a failed attempt redials with the neuron's own
:func:`~helexa.roles.neuron.connection.backoff_delays` and its default timeouts. What the
cortex receives is what a fleet of real neurons sends.

What is lean, so that one process stands in for thousands of neurons and the simulator is
not what a benchmark measures:

- The websocket client is written here over a plain socket (an upgrade request, then
  frames): no reader task, memory channel or lock per connection, as trio-websocket has.
  Client frames carry the all-zero masking key, which RFC 6455 allows and which leaves the
  payload as it is.
- One task per process sends every neuron's heartbeat from a timetable (a heap), with a
  non-blocking ``send`` on the socket; a heartbeat's msgpack body is the codec's own
  encoding of a real :class:`~helexa.protocol.Heartbeat`, made once per neuron, with only
  its sequence number and load figures changed per beat.
- A joined neuron's only task waits for bytes from the cortex, which sends nothing in the
  steady state.

The simulator's own lag (how late its timetable sent a heartbeat) is measured apart, so a
benchmark can tell a slow simulator from a slow cortex.
"""

from __future__ import annotations

import base64
import collections
import errno
import heapq
import os
import random
import re
import socket
import time
from dataclasses import dataclass, field
from typing import Any

import msgpack
import trio

from helexa.protocol import Heartbeat, Ping, Pong, ProtocolError, decode, encode, to_wire
from helexa.protocol.join import Failure, Impostor, NeuronJoin, Refusal, Welcomed
from helexa.roles.neuron.config import NeuronConfig
from helexa.roles.neuron.connection import backoff_delays

_DEFAULTS = {name: NeuronConfig.model_fields[name].default
             for name in ("connect_timeout", "handshake_timeout", "reconnect_initial", "reconnect_max")}


class JoinFailed(Exception):
    """One attempt to join failed; ``kind`` says how (counted by the swarm)."""

    def __init__(self, kind: str, detail: str = "") -> None:
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind


# --- websocket framing (client side) -------------------------------------------------------


def client_frame(payload: bytes, opcode: int = 0x2) -> bytes:
    """One final, masked (all-zero key) client frame."""
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        head = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
    return head + b"\0\0\0\0" + payload


def parse_frames(buf: bytearray) -> list[tuple[int, bytes]]:
    """Take every complete server frame off the front of ``buf``: ``(opcode, payload)``.

    Fragmented messages are not expected (the cortex sends each message in one frame)."""
    out = []
    while len(buf) >= 2:
        b0, b1 = buf[0], buf[1]
        n, off = b1 & 0x7F, 2
        if n == 126:
            if len(buf) < 4:
                break
            n, off = int.from_bytes(buf[2:4], "big"), 4
        elif n == 127:
            if len(buf) < 10:
                break
            n, off = int.from_bytes(buf[2:10], "big"), 10
        if b1 & 0x80:
            off += 4  # a masked server frame breaks RFC 6455; it is read (unmasked) anyway
        if len(buf) < off + n:
            break
        payload = bytes(buf[off:off + n])
        if b1 & 0x80:
            key = buf[off - 4:off]
            payload = bytes(c ^ key[i % 4] for i, c in enumerate(payload))
        del buf[:off + n]
        out.append((b0 & 0x0F, payload))
    return out


def _close_reason(payload: bytes) -> str:
    if len(payload) >= 2:
        return f"{int.from_bytes(payload[:2], 'big')} {payload[2:].decode(errors='replace')}".strip()
    return "no code"


# --- one simulated neuron --------------------------------------------------------------------


@dataclass(eq=False)
class SimNeuron:
    node_id: str
    descriptor: Any
    models: tuple
    rng: random.Random
    sock: socket.socket | None = None
    stream: trio.SocketStream | None = None
    buf: bytearray = field(default_factory=bytearray)
    body: dict = field(default_factory=dict)  # the heartbeat's msgpack map, reused
    seq: int = 0
    session: int = 0  # bumped per connection: stale timetable entries are skipped
    joined_generation: int = -1
    started: float = 0.0


class Swarm:
    """Simulated neurons in this process, joined to ``host:port``.

    Args:
        url: the cortex's ``ws://host:port``.
        token: the join token.
        prefix: node ids are ``{prefix}-{index:05d}``.
        descriptor: ``node_id -> NeuronDescriptor``.
        models: the model statuses every neuron reports.
        heartbeat: ``(seq, rng) -> Heartbeat``: what a neuron sends (its encoding is kept as
            a template; seq and the load figures change per beat).
    """

    def __init__(self, url: str, token: str, prefix: str, *, descriptor, models, heartbeat) -> None:  # noqa: ANN001
        m = re.fullmatch(r"ws://([^:/]+):(\d+)/?", url)
        if m is None:
            raise ValueError(f"the swarm dials ws://host:port only, not {url!r}")
        self.host, self.port = m.group(1), int(m.group(2))
        self.token = token
        self.prefix = prefix
        self._descriptor = descriptor
        self._models = models
        self._heartbeat = heartbeat
        self.neurons: list[SimNeuron] = []
        self.interval = 1.0
        self._timetable: list[tuple[float, int, int, SimNeuron]] = []
        self._tick = 0
        self.generation = 0
        self.joined_in_generation = 0
        self.alive = 0
        self.drops = 0
        self.heartbeats = 0
        self.held_back = 0  # heartbeats not sent because the socket's buffer was full
        self.max_lag = 0.0
        self.attempt_failures: collections.Counter[str] = collections.Counter()
        self.join_times: list[float] = []
        self.last_join_wall = 0.0

    # --- the heartbeat timetable --------------------------------------------------------------

    async def run_timetable(self) -> None:
        """Send every joined neuron's heartbeats on time, until cancelled."""
        tick = 0.005
        while True:
            now = trio.current_time()
            table = self._timetable
            while table and table[0][0] <= now:
                due, _, session, n = heapq.heappop(table)
                if session != n.session or n.sock is None:
                    continue  # that connection is gone
                self.max_lag = max(self.max_lag, now - due)
                self._beat(n)
                self._tick += 1
                heapq.heappush(table, (due + self.interval, self._tick, session, n))
            await trio.sleep(tick)

    def _beat(self, n: SimNeuron) -> None:
        n.seq += 1
        body = n.body
        body["seq"] = n.seq
        metrics = body["metrics"]
        metrics["cpu_percent"] = n.rng.uniform(0, 100)
        for gpu in metrics.get("gpus", ()):
            gpu["utilization"] = n.rng.uniform(0, 100)
        frame = client_frame(msgpack.packb(body, use_bin_type=True))
        try:
            sent = n.sock.send(frame)  # type: ignore[union-attr]
        except BlockingIOError:
            sent = 0
        except OSError:
            return  # the reader sees the connection end
        if sent < len(frame):
            # The cortex is not reading: a real neuron's send would wait; this one counts it.
            # A partly sent frame cannot be abandoned without corrupting the stream.
            self.held_back += 1
            if sent:
                self._finish_send(n, frame[sent:])
            return
        self.heartbeats += 1

    def _finish_send(self, n: SimNeuron, rest: bytes) -> None:
        sock = n.sock
        assert sock is not None
        sock.setblocking(True)  # rare: only when the cortex stalls for a socket buffer's worth
        try:
            sock.settimeout(5)
            sock.sendall(rest)
        except OSError:
            pass
        finally:
            sock.setblocking(False)

    # --- one neuron's life ----------------------------------------------------------------------

    def add(self, nursery: trio.Nursery, count: int) -> list[SimNeuron]:
        """Start ``count`` more neurons, each dialing at once (their own backoff after)."""
        new = []
        for _ in range(count):
            i = len(self.neurons)
            node_id = f"{self.prefix}-{i:05d}"
            n = SimNeuron(node_id, self._descriptor(node_id), self._models, random.Random(node_id))
            n.body = to_wire(self._heartbeat(0, n.rng))
            n.body.update(k=Heartbeat.KIND, v=1)
            self.neurons.append(n)
            new.append(n)
            nursery.start_soon(self._live, n)
        return new

    def next_generation(self) -> None:
        """From now on, count joins afresh (a cortex restart: every neuron must rejoin)."""
        self.generation += 1
        self.joined_in_generation = 0

    async def _live(self, n: SimNeuron) -> None:
        delays = backoff_delays(_DEFAULTS["reconnect_initial"], _DEFAULTS["reconnect_max"], n.rng)
        n.started = time.perf_counter()
        while True:
            try:
                await self._connect_and_join(n)
            except JoinFailed as exc:
                self.attempt_failures[exc.kind] += 1
                await self._close(n)
                await trio.sleep(delays())
                continue
            self._joined(n)
            await self._stay(n)
            self.alive -= 1
            self.drops += 1
            await self._close(n)
            delays = backoff_delays(_DEFAULTS["reconnect_initial"], _DEFAULTS["reconnect_max"], n.rng)
            n.started = time.perf_counter()
            await trio.sleep(delays())

    def _joined(self, n: SimNeuron) -> None:
        self.alive += 1
        self.join_times.append(time.perf_counter() - n.started)
        self.last_join_wall = time.time()
        if n.joined_generation != self.generation:
            n.joined_generation = self.generation
            self.joined_in_generation += 1
        n.session += 1
        self._tick += 1
        # An independent neuron: its first heartbeat at a random phase.
        heapq.heappush(self._timetable, (trio.current_time() + n.rng.random() * self.interval, self._tick,
                                         n.session, n))

    async def _close(self, n: SimNeuron) -> None:
        n.session += 1
        if n.stream is not None:
            await trio.aclose_forcefully(n.stream)
        n.sock, n.stream = None, None
        n.buf.clear()

    async def _connect_and_join(self, n: SimNeuron) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        tsock = trio.socket.from_stdlib_socket(sock)
        n.sock = sock
        with trio.move_on_after(_DEFAULTS["connect_timeout"]) as scope:
            try:
                await tsock.connect((self.host, self.port))
            except OSError as exc:
                tsock.close()
                raise JoinFailed("connect: " + errno.errorcode.get(exc.errno or 0, type(exc).__name__)) from None
        if scope.cancelled_caught:
            tsock.close()
            raise JoinFailed("connect: timed out")
        n.stream = trio.SocketStream(tsock)
        session = NeuronJoin(self.token, n.descriptor, timeout=_DEFAULTS["handshake_timeout"], models=n.models)
        with trio.move_on_after(session.timeout):
            await self._upgrade(n)
            frames = session.start()
            while session.verdict is None:
                for frame in frames:
                    await n.stream.send_all(client_frame(encode(frame)))
                frames = session.receive(await self._receive(n, "join"))
        session.expire()
        match session.verdict:
            case Welcomed(heartbeat_interval=interval):
                self.interval = interval
            case Refusal(code=code):
                raise JoinFailed(f"refused: {code}")
            case Impostor(reason=reason):
                raise JoinFailed("impostor", reason)
            case Failure(code="timeout"):
                raise JoinFailed("handshake timed out")
            case Failure(code=code):
                raise JoinFailed(f"handshake failed: {code}")

    async def _upgrade(self, n: SimNeuron) -> None:
        key = base64.b64encode(os.urandom(16)).decode()
        request = (f"GET / HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nUpgrade: websocket\r\n"
                   f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n")
        try:
            await n.stream.send_all(request.encode())  # type: ignore[union-attr]
            while b"\r\n\r\n" not in n.buf:
                data = await n.stream.receive_some(65536)  # type: ignore[union-attr]
                if not data:
                    raise JoinFailed("closed before the upgrade")
                n.buf += data
        except (trio.BrokenResourceError, OSError):
            raise JoinFailed("closed before the upgrade") from None
        head, _, rest = bytes(n.buf).partition(b"\r\n\r\n")
        n.buf[:] = rest
        status = head.split(b"\r\n", 1)[0]
        if b" 101 " not in status + b" ":
            raise JoinFailed("upgrade refused", status.decode(errors="replace"))

    async def _receive(self, n: SimNeuron, during: str) -> Any:
        """The next message from the cortex (answering websocket pings on the way)."""
        while True:
            for opcode, payload in parse_frames(n.buf):
                if opcode == 0x2:
                    try:
                        return decode(payload)
                    except ProtocolError as exc:
                        raise JoinFailed(f"bad frame during {during}", str(exc)) from None
                if opcode == 0x8:
                    raise JoinFailed(f"closed during {during}: {re.sub(r'[0-9]+s', 'Ns', _close_reason(payload))}")
                if opcode == 0x9:
                    await n.stream.send_all(client_frame(payload, 0xA))  # type: ignore[union-attr]
            try:
                data = await n.stream.receive_some(65536)  # type: ignore[union-attr]
            except (trio.BrokenResourceError, OSError):
                data = b""
            if not data:
                raise JoinFailed(f"connection lost during {during}")
            n.buf += data

    async def _stay(self, n: SimNeuron) -> None:
        """Answer the cortex until the connection ends (heartbeats go from the timetable)."""
        try:
            while True:
                msg = await self._receive(n, "session")
                if isinstance(msg, Ping):
                    frame = client_frame(encode(Pong(msg.nonce)))
                    try:
                        if n.sock.send(frame) < len(frame):  # type: ignore[union-attr]
                            raise JoinFailed("send buffer full")
                    except (BlockingIOError, OSError):
                        return
        except JoinFailed:
            return

    # --- figures --------------------------------------------------------------------------------

    def take_join_times(self) -> list[float]:
        times, self.join_times = self.join_times, []
        return times


def heartbeat_body_check(hb: Heartbeat) -> None:
    """The template's encoding must decode as the heartbeat itself (a guard for the bench)."""
    body = to_wire(hb)
    body.update(k=Heartbeat.KIND, v=1)
    if decode(msgpack.packb(body, use_bin_type=True)) != hb:
        raise AssertionError("the heartbeat template does not round-trip")
