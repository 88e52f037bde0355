"""The cortex's control-plane endpoint: neurons dial it, prove the join token, and stay.

For each connection: the handshake (under one deadline), then a :class:`~.neuron_link.Link`
registered in the :class:`~.fleet.Fleet`, whose reader runs until the connection ends. A
watchdog marks neurons unhealthy after missed heartbeats (closing a silent connection so
its requests fail fast) and removes them from the fleet later.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass

import trio

from helexa.protocol import ProtocolError, Shutdown
from helexa.protocol.join import Admitted, CortexJoin, Failure, RecentNonces, Refusal
from helexa.transport import Channel, ChannelClosed
from helexa.transport import websocket as ws_transport
from helexa.transport.handshake import exchange

from .fleet import Fleet, Health
from .neuron_link import Link

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ControlSettings:
    host: str = "127.0.0.1"
    port: int = 7070
    heartbeat_interval: float = 1.0
    missed_heartbeats: int = 3
    remove_after: float = 30.0
    busy_silence: float = 120.0
    """Silence tolerated while a provisioning command is outstanding: some engines
    (llama.cpp through xllamacpp) hold the interpreter lock for a whole model load, so a
    loading neuron cannot heartbeat. A dead process still shows at once (its socket closes)."""
    handshake_timeout: float = 10.0
    send_timeout: float = 10.0
    max_frame: int = 16 * 1024 * 1024
    operator: str = "local"
    cortex_id: str = ""


class ControlServer:
    """Serves the websocket control plane and keeps ``fleet`` current.

    Args:
        settings: addresses, timeouts and heartbeat policy.
        fleet: the fleet view to maintain.
        token: returns the current join token (read per handshake, so rotation applies).
        ssl_context: serve ``wss://`` when given.
    """

    def __init__(
        self,
        settings: ControlSettings,
        fleet: Fleet,
        token: Callable[[], str],
        *,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.settings = settings
        self.fleet = fleet
        self._token = token
        self._ssl = ssl_context
        self.refusals = 0
        self._recent_nonces = RecentNonces()

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; ``started`` reports the bound port."""
        async with trio.open_nursery() as nursery:
            port = await nursery.start(self._serve)
            nursery.start_soon(self._watchdog)
            log.info("control plane listening on %s://%s:%d", "wss" if self._ssl else "ws", self.settings.host, port)
            task_status.started(port)

    async def _serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        await ws_transport.serve(
            self.handle,
            self.settings.host,
            self.settings.port,
            ssl_context=self._ssl,
            max_frame=self.settings.max_frame,
            handshake_timeout=self.settings.handshake_timeout,
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

        s = self.settings
        session = CortexJoin(
            token,
            recent=self._recent_nonces,
            heartbeat_interval=s.heartbeat_interval,
            timeout=s.handshake_timeout,
            operator=s.operator,
            cortex_id=s.cortex_id,
        )
        link: Link | None = None
        try:
            with trio.move_on_after(session.timeout):
                link = await self._handshake(channel, session)
        except (ProtocolError, ChannelClosed) as exc:
            log.info("handshake with %s failed: %s", channel.remote, exc)
            return
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

    async def _refuse(self, channel: Channel, refusal: Refusal, frames: list[object]) -> None:
        self.refusals += 1
        log.warning("refused neuron at %s: %s", channel.remote, refusal.reason)
        try:
            for frame in frames:
                await channel.send(frame)
        except ChannelClosed:
            pass
        await channel.aclose(ws_transport.CLOSE_POLICY, refusal.code)

    async def _handshake(self, channel: Channel, session: CortexJoin) -> Link | None:
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
        link = Link(
            channel,
            join.descriptor,
            models=join.models,
            configs=join.configs,
            on_change=self.fleet.notify,
            send_timeout=self.settings.send_timeout,
        )
        old = self.fleet.links.get(link.node_id)
        if old is not None and old.connected:
            log.info("neuron %s reconnected; closing its previous connection", link.node_id)
            await old.close(1000, "replaced by a new connection")
        # Registered before the welcome goes out: once a neuron is welcomed, it is counted.
        self.fleet.links[link.node_id] = link
        self.fleet.notify()
        for frame in frames:  # the welcome
            await channel.send(frame)
        log.info(
            "neuron %s joined from %s (%d models reported)", link.node_id, channel.remote, len(join.models)
        )
        return link

    async def _watchdog(self) -> None:
        s = self.settings
        silence = s.heartbeat_interval * s.missed_heartbeats
        while True:
            await trio.sleep(s.heartbeat_interval / 2)
            now = trio.current_time()
            for link in list(self.fleet.links.values()):
                if not isinstance(link, Link):
                    continue
                allowed = max(silence, s.busy_silence) if link.provisioning else silence
                if link.connected and now - link.last_seen > allowed:
                    log.warning("neuron %s missed %d heartbeats: unhealthy", link.node_id, s.missed_heartbeats)
                    link.health = Health.UNHEALTHY
                    link.disconnected_at = now
                    self.fleet.notify()
                    await link.close(1001, "missed heartbeats")
                if (
                    not link.connected
                    and link.disconnected_at is not None
                    and now - link.disconnected_at >= s.remove_after
                    and self.fleet.links.get(link.node_id) is link
                ):
                    log.info("neuron %s removed after %.0fs without a connection", link.node_id, s.remove_after)
                    del self.fleet.links[link.node_id]
                    self.fleet.notify()

    async def shutdown_neurons(self, reason: str, grace: float) -> None:
        """Tell every connected neuron the cortex is going away (best effort, bounded)."""
        links = [l for l in self.fleet.links.values() if isinstance(l, Link) and l.connected]

        async def tell(link: Link) -> None:
            try:
                await link.channel.send(Shutdown(reason, grace))
            except ChannelClosed:
                pass
            # Closed while the connection's reader still runs, so the close handshake
            # completes instead of waiting out its timeout.
            await link.close(1001, "cortex stopping")

        with trio.move_on_after(2) as scope:
            scope.shield = True
            async with trio.open_nursery() as nursery:
                for link in links:
                    nursery.start_soon(tell, link)
