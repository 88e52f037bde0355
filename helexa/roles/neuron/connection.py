"""The neuron's one connection to its cortex: dial, join, stay, and dial again after a drop.

The join itself is :class:`helexa.protocol.join.NeuronJoin`; :class:`Connection` moves its
frames under the handshake deadline, then hands the joined channel to the caller's
``serve`` until the connection ends, and redials with exponential backoff and jitter
(reset by each successful join). On every join the neuron reports the models it holds,
so a restarted cortex rebuilds its view without reloading anything.

Exception tree::

    NeuronError
    ├── JoinRefused        the join was refused (``code``: unauthorized, version_mismatch,
    │                      identity_mismatch, not_enrolled, ...), or this neuron was pushed out by another
    │                      join under its node id (duplicate_node_id: the same key;
    │                      node_id_rebound: a new key after ``forget``); fatal, since retrying
    │                      cannot help
    └── CortexImpostor     the peer could not prove it holds our join token; fatal
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from helexa.protocol import NeuronDescriptor, ProtocolError
from helexa.protocol.compat import for_earlier
from helexa.protocol.join import IDENTITY_VERSION, JOIN_VERSIONS, Failure, Impostor, NeuronJoin, Refusal, Welcomed
from helexa.protocol.takeover import CLOSE_REPLACED, replaced_message
from helexa.transport import Channel, ChannelClosed, ConnectFailed
from helexa.transport import websocket as ws_transport
from helexa.transport.handshake import exchange

from .config import NeuronConfig, Resolved
from .registry import ModelRegistry

log = logging.getLogger(__name__)

Serve = Callable[[Channel, trio.Nursery], Awaitable[None]]
"""Reads a joined connection until it ends; the nursery lives as long as the connection."""


class NeuronError(Exception):
    pass


class JoinRefused(NeuronError):
    def __init__(self, code: str, reason: str) -> None:
        super().__init__(f"the join was refused ({code}): {reason}")
        self.code = code


class CortexImpostor(NeuronError):
    pass


def backoff_delays(initial: float, maximum: float, rng: random.Random) -> Callable[[], float]:
    """Exponential backoff with full jitter in [d/2, d]: returns a function yielding the next
    delay; the caller makes a new one after a successful join."""
    attempt = 0

    def next_delay() -> float:
        nonlocal attempt
        base = min(maximum, initial * (2**attempt))
        attempt += 1
        return base / 2 + rng.random() * base / 2

    return next_delay


class Connection:
    """Keeps this neuron joined to its cortex.

    Args:
        config: the cortex URL, timeouts and backoff.
        resolved: the node id, token and TLS context resolved at start.
        descriptor: who this neuron is, sent with every join.
        registry: the models held, reported with every join.
        connector: opens a channel to a URL (the websocket transport by default; tests pass
            an in-memory one that still goes through the codec).
        rng: the backoff's jitter.
    """

    def __init__(
        self,
        config: NeuronConfig,
        resolved: Resolved,
        descriptor: NeuronDescriptor,
        registry: ModelRegistry,
        *,
        connector: Callable[[str], Any] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self._config = config
        self._resolved = resolved
        self._descriptor = descriptor
        self._registry = registry
        self._connector = connector or self._ws_connect
        self._rng = rng or random.Random()
        self._channel: Channel | None = None
        self._nursery: trio.Nursery | None = None
        self._posts: list[object] = []  # what post() queued, sent in order by one task
        self._posting = False
        self._stop = trio.CancelScope()
        self.joined = trio.Event()
        """Set while joined; replaced by a fresh event when the connection drops."""
        self.joins = 0
        self.heartbeat_interval = 1.0
        """What the cortex asked for in its last welcome."""
        self.version = JOIN_VERSIONS[1]
        """The handshake version the cortex joined at: below the newest, an earlier release,
        what is sent to it leaves out the fields added since
        (:func:`~helexa.protocol.compat.for_earlier`), which its codec would refuse, closing
        the connection."""

    def _ws_connect(self, url: str):
        return ws_transport.connect(
            url,
            timeout=self._config.connect_timeout,
            ssl_context=self._resolved.ssl_context,
            pin=self._resolved.pin,
            max_frame=self._config.max_frame_bytes,
        )

    @property
    def earlier(self) -> bool:
        """The cortex joined at handshake version 1 (before the identity key)."""
        return self.version < IDENTITY_VERSION

    @property
    def connected(self) -> bool:
        return self._channel is not None

    # --- the connection loop --------------------------------------------------------------

    async def run(self, serve: Serve) -> None:
        """Dial, join and ``serve`` each connection, redialing after every drop, until
        cancelled or :meth:`close`\\ d.

        Raises:
            JoinRefused: the join was refused (by the cortex, or by us: no common version).
            CortexImpostor: the peer does not hold our join token.
        """
        c = self._config
        with self._stop:
            delays = backoff_delays(c.reconnect_initial, c.reconnect_max, self._rng)
            while True:
                joined_before = self.joins
                try:
                    async with self._connector(c.cortex) as channel:
                        welcomed = await self._join(channel)
                        await self._stay(channel, welcomed, serve)
                except (ConnectFailed, ChannelClosed, ProtocolError, trio.TooSlowError) as exc:
                    if isinstance(exc, ChannelClosed) and exc.code == CLOSE_REPLACED:
                        # Not our own redial (that leaves the old connection first): another
                        # neuron joined as us. Redialing would push it out, and it us, forever.
                        raise JoinRefused(*replaced_message(exc.reason, c.cortex, self._descriptor.node_id)) from None
                    if isinstance(exc, ChannelClosed) and exc.code == ws_transport.CLOSE_TRY_LATER:
                        # Turned away for now (a join storm, or a cortex that cannot store
                        # this node id's binding): the operator's to see, and worth a retry.
                        log.warning("the cortex turned this join away for now (%s); retrying",
                                    exc.reason or "try again later")
                    else:
                        log.info("connection to cortex lost: %s", exc or type(exc).__name__)
                if self.joins > joined_before:
                    delays = backoff_delays(c.reconnect_initial, c.reconnect_max, self._rng)
                delay = delays()
                log.info("reconnecting to %s in %.2fs", c.cortex, delay)
                await trio.sleep(delay)

    async def _join(self, channel: Channel) -> Welcomed:
        """Carry one :class:`NeuronJoin` under the handshake deadline."""
        session = NeuronJoin(
            self._resolved.token,
            self._descriptor,
            timeout=self._config.handshake_timeout,
            models=self._registry.statuses(),
            configs=self._registry.configs(),
            cached=self._registry.cached_sources(),
            identity=self._resolved.identity,
        )
        with trio.move_on_after(session.timeout):
            for frame in await exchange(channel, session, session.start()):
                await channel.send(frame)  # a Fault, when the cortex broke the protocol
        session.expire()
        match session.verdict:
            case Welcomed() as welcomed:
                return welcomed
            case Refusal(code=code, reason=reason):
                raise JoinRefused(code, reason)
            case Impostor(reason=reason):
                raise CortexImpostor(reason)
            case Failure(code=code, reason=reason):
                raise ProtocolError(reason, code=code)
        raise AssertionError(f"unhandled verdict {session.verdict!r}")

    async def _stay(self, channel: Channel, welcomed: Welcomed, serve: Serve) -> None:
        self.heartbeat_interval = welcomed.heartbeat_interval
        self.version = welcomed.version
        self.joins += 1
        identity = self._resolved.identity
        log.info(
            "joined cortex %s as %s (identity key %s, operator %s, %d models held)",
            self._config.cortex, self._descriptor.node_id, identity.fingerprint if identity else "none",
            welcomed.operator, len(self._registry.statuses()),
        )
        lost: Exception | None = None
        async with trio.open_nursery() as nursery:
            self._channel, self._nursery = channel, nursery
            self.joined.set()
            try:
                await serve(channel, nursery)
            except (ChannelClosed, ProtocolError) as exc:
                lost = exc  # raised below, outside the nursery, as itself
            finally:
                self._channel = self._nursery = None
                self._posts.clear()  # the next join reports the state anyway
                self.joined = trio.Event()
                nursery.cancel_scope.cancel()
        if lost is not None:
            raise lost

    async def close(self, reason: str) -> None:
        """Leave for good: close the connection ("going away") and end :meth:`run` without
        redialing."""
        if self._channel is not None:
            await self._channel.aclose(1001, reason)
        self._stop.cancel()

    # --- sending --------------------------------------------------------------------------

    async def send(self, msg: object) -> None:
        """Send ``msg`` on the current connection within ``send_timeout``.

        Raises:
            ChannelClosed: not connected, or the connection closed.
            trio.TooSlowError: the send did not finish in time.
        """
        channel = self._channel
        if channel is None:
            raise ChannelClosed("not connected")
        if self.version < JOIN_VERSIONS[1]:
            msg = for_earlier(msg, self.version)
        # The channel applies the deadline only if it has to wait (a cancel scope per
        # relayed frame was a measurable share of a neuron's CPU per request).
        await channel.send(msg, timeout=self._config.send_timeout)

    async def try_send(self, msg: object) -> None:
        """:meth:`send`, best effort: a dead or stuck connection drops ``msg``."""
        try:
            await self.send(msg)
        except (ChannelClosed, trio.TooSlowError):
            pass

    def post(self, msg: object) -> None:
        """:meth:`try_send` in the background on the current connection, in the order of
        the calls (a model's status changes must reach the cortex as they happened); dropped
        when not connected (the next join reports the state anyway)."""
        if self._nursery is None:
            return
        self._posts.append(msg)
        if not self._posting:
            self._posting = True
            self._nursery.start_soon(self._send_posts)

    async def _send_posts(self) -> None:
        try:
            while self._posts:
                await self.try_send(self._posts.pop(0))
        finally:
            self._posting = False
