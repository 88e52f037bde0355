"""The cortex's control-plane endpoint: neurons dial it, prove the join token, and stay.

For each connection: the handshake (under one deadline), then a :class:`~.neuron_link.NeuronLink`
registered in the :class:`~.fleet.Fleet`, whose reader runs until the connection ends. A
watchdog marks neurons unhealthy after missed heartbeats (closing a silent connection so
its requests fail fast) and removes them from the fleet later.

Admission (:mod:`helexa.transport.admission`): at most ``max_pending_handshakes`` (or the
control plane's share of the open-file limit, :mod:`.open_files`, when lower)
connections between accept and join verdict, fewer while handshakes finish late (more are
answered ``503`` and closed at once;
a neuron redials on its own backoff with jitter, so a join storm spreads out); an address whose
join proofs were refused ``failed_joins_burst`` times has its joins screened until its allowance
drains back (:mod:`helexa.protocol.join_screen`): a small hello, then the join's proof checked
from the frame's first bytes; a join without the token is refused unread (code 1013, "try again
later", counted as one more failure), one with it is decoded and judged as any other, so a
neuron behind the same address (a NAT, a shared host) still joins at once. Until its join is admitted a
connection's frames are held to :data:`HANDSHAKE_MAX_FRAME` (1009 past it).

Identity (:mod:`.neuron_keys`): the first join of a node id with an identity key binds the
id to that key, before the welcome goes out; a join of the id with another key is refused
in the handshake (the neuron joined under it is not disturbed). A join with the same key
(a restart, a redial, a cloned data directory), or with a new key once the operator forgot
the old one, takes the id's old connection over (4001, the reason saying which:
:mod:`helexa.protocol.takeover`). With ``enrolment = "strict"`` no join binds: a node id the
operator has not enrolled (``helexa neurons enrol``) is refused (``not_enrolled``). A binding
the cortex cannot write to its data directory is not made: the join is closed with 1013
(try again later, :data:`BINDING_UNSAVED`) and the neuron redials on its backoff, since a
binding held in memory only would let another key take the id after a restart.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable
from typing import TYPE_CHECKING

import trio

from helexa.identity import fingerprint
from helexa.protocol import ProtocolError
from helexa.protocol.join import IDENTITY_VERSION, Admitted, CortexJoin, Failure, RecentNonces, Refusal
from helexa.protocol.takeover import CLOSE_REPLACED, replaced_reason
from helexa.transport import Channel, ChannelClosed, Screened
from helexa.transport import websocket as ws_transport
from helexa.transport.admission import FailedJoins, PendingHandshakes, ReadBudget, host_of
from helexa.transport.handshake import exchange

from helexa.config import split_socket
from helexa.watchdog import excuse_stall

from .fleet import Fleet
from .neuron_keys import NeuronKeys
from .neuron_link import NeuronLink

if TYPE_CHECKING:
    from .config import CortexConfig

log = logging.getLogger(__name__)

BINDING_UNSAVED = "the cortex cannot store this node id's identity key binding: retry later"
"""The reason of the close (1013, try again later) of a join whose binding the cortex could not write."""
HANDSHAKE_MAX_FRAME = 1 << 20
"""The largest frame a connection may send before its join is admitted (a neuron's join,
with every model it holds, is a few KiB); ``max_frame_bytes`` applies from then on. Until
then nobody knows who sent it: with ``max_pending_handshakes`` connections each sending
``max_frame_bytes`` (16 MiB), a stranger could make the cortex hold gigabytes (and with
1 MiB each, a gigabyte: so what they read all together is held to ``max_handshake_bytes``)."""
_FAILED_PROOF = frozenset({"unauthorized", "replayed_nonce", "bad_request"})
"""Refusals that count against an address: a wrong proof, a replay, a malformed join."""
_OURS_TO_MEND = frozenset({"unavailable"})
"""Refusals for a fault of the cortex's own: the neuron is told to retry, not refused."""


class ControlServer:
    """Serves the websocket control plane and keeps ``fleet`` current.

    Args:
        config: the cortex's config (``control_socket``, the heartbeat policy, the
            handshake and send deadlines, ``max_frame_bytes``, ``operator``).
        fleet: the fleet view to maintain.
        token: returns the current join token (read per handshake, so rotation applies).
        cortex_id: this cortex's identity fingerprint, told to joining neurons.
        ssl_context: serve ``wss://`` when given.
        keys: the node id -> identity key bindings (default: in memory only).
    """

    def __init__(
        self,
        config: CortexConfig,
        fleet: Fleet,
        token: Callable[[], str],
        *,
        cortex_id: str = "",
        ssl_context: ssl.SSLContext | None = None,
        keys: NeuronKeys | None = None,
    ) -> None:
        self.settings = config
        self.host, self.port = split_socket(config.control_socket)
        self.cortex_id = cortex_id
        self.fleet = fleet
        self._token = token
        self._ssl = ssl_context
        self.keys = keys if keys is not None else NeuronKeys()
        self.refusals = 0
        self.throttled = 0
        self._recent_nonces = RecentNonces()
        self.pending = PendingHandshakes(config.max_pending_handshakes, stale_after=config.handshake_timeout)
        self.failed_joins = FailedJoins(config.failed_joins_burst, config.failed_joins_per_minute)
        self.read_budget = ReadBudget(config.max_handshake_bytes)
        """Bytes read from connections not yet joined, all together (``max_handshake_bytes``)."""

    def cap_pending(self, limit: int) -> None:
        """Admit at most ``limit`` pending handshakes (the control plane's share of the
        open-file limit, :mod:`.open_files`) when that is below ``max_pending_handshakes``;
        0: no open-file limit. Before :meth:`run`."""
        if 0 < limit < self.pending.limit:
            self.pending = PendingHandshakes(limit, stale_after=self.settings.handshake_timeout)

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; ``started`` reports the bound port."""
        async with trio.open_nursery() as nursery:
            port = await nursery.start(self._serve)
            nursery.start_soon(self._watchdog)
            log.info("control plane listening on %s://%s:%d", "wss" if self._ssl else "ws", self.host, port)
            task_status.started(port)

    async def _serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        await ws_transport.serve(
            self.handle,
            self.host,
            self.port,
            ssl_context=self._ssl,
            max_frame=self.settings.max_frame_bytes,
            first_max_frame=HANDSHAKE_MAX_FRAME,
            handshake_timeout=self.settings.handshake_timeout,
            pending=self.pending,
            budget=self.read_budget,
            task_status=task_status,
        )

    async def handle(self, channel: Channel) -> None:
        """Run one neuron connection from handshake to disconnect."""

        def token() -> str:
            try:
                return self._token()
            except (OSError, ValueError) as exc:
                log.error("cannot read the join token: %s", exc)
                raise

        host = host_of(channel.remote)
        s = self.settings
        session = CortexJoin(
            token,
            recent=self._recent_nonces,
            bound=self.keys.bound,
            strict=s.enrolment == "strict",
            heartbeat_interval=s.heartbeat_interval,
            timeout=s.handshake_timeout,
            operator=s.operator,
            cortex_id=self.cortex_id,
        )
        if self.failed_joins.retry_after(host, trio.current_time()) > 0:
            # Heard, but screened: its join's proof is checked from the frame's first bytes
            # before the rest is decoded, so a join with the token is never kept out by what
            # wrong ones from its address earned, and a wrong one costs an HMAC.
            channel.screen = session.screen
        link: NeuronLink | None = None
        try:
            with trio.move_on_after(session.timeout):
                link = await self._handshake(channel, session)
        except Screened as exc:
            await self._throttle(channel, host, exc.reason)
            return
        except (ProtocolError, ChannelClosed) as exc:
            log.info("handshake with %s failed: %s", channel.remote, exc)
            return
        finally:
            channel.screen = None
            self.pending.finished(channel.remote, trio.current_time())
        session.expire()
        if link is None:
            if isinstance(session.verdict, Failure) and session.verdict.code == "timeout":
                log.warning("neuron at %s did not finish the handshake in time", channel.remote)
                await channel.aclose(1008, "handshake timeout")
            return
        try:
            await link.serve()
        finally:
            log.info("neuron %s disconnected", link.node_id)

    async def _throttle(self, channel: Channel, host: str, why: str) -> None:
        """Refuse a screened join unread ("try again later"): it counts as a failed proof."""
        self.throttled += 1
        now = trio.current_time()
        self.failed_joins.failed(host, now)
        wait = self.failed_joins.retry_after(host, now)
        log.info("refused a join from %s unread (its address failed to join too often): %s", channel.remote, why)
        await channel.aclose(ws_transport.CLOSE_TRY_LATER, f"too many failed joins: retry in {wait:.1f}s")

    async def _refuse(self, channel: Channel, refusal: Refusal, frames: list[object]) -> None:
        self.refusals += 1
        if refusal.code in _OURS_TO_MEND:
            # The cortex's own fault (its join token file unreadable, mid-rotation say), not
            # the neuron's: a Refused frame would make the neuron exit for good. A close
            # with "try again later" makes any neuron, of this release or before, redial.
            log.warning("turned a neuron at %s away to retry: %s", channel.remote, refusal.reason)
            await channel.aclose(ws_transport.CLOSE_TRY_LATER, f"{refusal.reason}: retry later")
            return
        log.warning("refused neuron at %s: %s", channel.remote, refusal.reason)
        if refusal.code in _FAILED_PROOF:
            host, now = host_of(channel.remote), trio.current_time()
            self.failed_joins.failed(host, now)
            wait = self.failed_joins.retry_after(host, now)
            if wait > 0:
                log.warning("%s failed to join too often: its joins without the token are refused unread for %.1fs",
                            host, wait)
        try:
            for frame in frames:
                await channel.send(frame)
        except ChannelClosed:
            pass
        await channel.aclose(ws_transport.CLOSE_POLICY, refusal.code)

    async def _handshake(self, channel: Channel, session: CortexJoin) -> NeuronLink | None:
        """Move ``session``'s frames until it has a verdict (the caller holds the deadline).
        Returns the link registered in the fleet, or None when the neuron was refused or
        broke the protocol (its connection closed)."""
        frames = await exchange(channel, session)
        match session.verdict:
            case Refusal() as refusal:
                await self._refuse(channel, refusal, frames)
                return None
            case Failure(code=code, reason=reason):
                log.info("handshake with %s failed: %s", channel.remote, reason)
                for frame in frames:
                    await channel.send(frame)
                await channel.aclose(ws_transport.CLOSE_PROTOCOL_ERROR, code)
                return None
        join = session.verdict
        assert isinstance(join, Admitted)
        channel.set_max_frame(self.settings.max_frame_bytes)  # it proved the join token
        # No checkpoint since the session looked the binding up: no other join came between.
        if join.public_key:
            key = f"identity key {fingerprint(join.public_key)}"
            try:
                if await self.keys.bind(join.node_id, join.public_key):
                    log.info("node id %s bound to %s (its first join)", join.node_id, key)
            except OSError as exc:
                # Fail closed: a binding held in memory only would let another key take the
                # id after a restart. The neuron redials on its backoff until the file is writable.
                self.refusals += 1
                log.error("cannot record the binding of node id %s to %s in %s: %s; its join is turned away "
                          "(the neuron retries) until the cortex can write that file", join.node_id, key,
                          self.keys.path, exc.strerror or exc)
                await channel.aclose(ws_transport.CLOSE_TRY_LATER, BINDING_UNSAVED)
                return None
        else:
            key = "no identity key"
            log.warning("neuron %s joined without an identity key (an older neuron): its node id stays unbound",
                        join.node_id)
        link = NeuronLink(
            channel,
            join.descriptor,
            models=join.models,
            configs=join.configs,
            cached=join.cached,
            on_change=self.fleet.notify,
            send_timeout=self.settings.send_timeout,
        )
        link.scopes_cache = join.version >= IDENTITY_VERSION
        link.public_key = join.public_key
        # Registered before the welcome goes out: once a neuron is welcomed, it is counted.
        old = self.fleet.add(link)
        if old is not None and old.connected:
            why = replaced_reason(old.public_key, link.public_key)
            log.info("neuron %s joined again from %s; closing its previous connection (%s)", link.node_id,
                     channel.remote, why)
            await old.close(CLOSE_REPLACED, why)
        for frame in frames:  # the welcome
            await channel.send(frame)
        log.info("neuron %s joined from %s with %s, running %.80r (%d models reported)", link.node_id, channel.remote,
                 key, link.descriptor.software or "an unnamed build", len(join.models))
        return link

    async def _watchdog(self) -> None:
        s = self.settings
        silence = s.heartbeat_interval * s.missed_heartbeats
        checked = trio.current_time()
        while True:
            await trio.sleep(s.heartbeat_interval / 2)
            now = trio.current_time()
            silent: list[NeuronLink] = []
            for link in list(self.fleet):
                if not isinstance(link, NeuronLink):
                    continue
                # A stall of the cortex itself (SIGSTOP, a paused VM) is not the neurons'
                # silence: their heartbeats wait unread in the sockets meanwhile.
                link.last_seen = excuse_stall(link.last_seen, now, checked, s.heartbeat_interval / 2)
                link.expire(now)  # whole answers past their first-token deadline (dispatch.py)
                # Loading or not, a neuron heartbeats: its models load in worker processes.
                if link.connected and now - link.last_seen > silence:
                    log.warning("neuron %s missed %d heartbeats: unhealthy", link.node_id, s.missed_heartbeats)
                    silent.append(link)
                if (
                    not link.connected
                    and link.disconnected_at is not None
                    and now - link.disconnected_at >= s.remove_after
                    and self.fleet.remove(link)
                ):
                    log.info("neuron %s removed after %.0fs without a connection", link.node_id, s.remove_after)
            if silent:
                # All at once: a close waits up to its own deadline for a peer that reads
                # nothing, and one after another, silent neurons held up the watch on the rest.
                async with trio.open_nursery() as nursery:
                    for link in silent:
                        nursery.start_soon(link.drop_silent, "missed heartbeats")
            checked = trio.current_time()

    async def shutdown_neurons(self, reason: str, grace: float) -> None:
        """Tell every connected neuron the cortex is going away (best effort, bounded)."""
        links = [l for l in self.fleet if isinstance(l, NeuronLink) and l.connected]
        with trio.move_on_after(2) as scope:
            scope.shield = True
            async with trio.open_nursery() as nursery:
                for link in links:
                    nursery.start_soon(link.part, reason, grace)
