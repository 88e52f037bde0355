"""The cortex's control-plane endpoint: neurons dial it, prove the join token, and stay.

For each connection: the handshake (under one deadline), then a :class:`~.neuron_link.NeuronLink`
registered in the :class:`~.fleet.Fleet`, whose reader runs until the connection ends. A
watchdog marks neurons unhealthy after missed heartbeats (closing a silent connection so
its requests fail fast) and removes them from the fleet later.
"""

from __future__ import annotations

import logging
import secrets
import ssl
from collections.abc import Callable
from dataclasses import dataclass

import trio

from helexa.protocol import (
    MIN_PROTOCOL_VERSION,
    PROTOCOL_VERSION,
    Challenge,
    Hello,
    Join,
    ProtocolError,
    Refused,
    Welcome,
)
from helexa.protocol import auth
from helexa.transport import Channel, ChannelClosed
from helexa.transport import websocket as ws_transport

from .fleet import Fleet
from .neuron_link import NeuronLink

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
        try:
            with trio.fail_after(self.settings.handshake_timeout):
                link = await self._handshake(channel)
        except trio.TooSlowError:
            log.warning("neuron at %s did not finish the handshake in time", channel.remote)
            await channel.aclose(1008, "handshake timeout")
            return
        except (ProtocolError, ChannelClosed) as exc:
            log.info("handshake with %s failed: %s", channel.remote, exc)
            return
        if link is None:
            return
        try:
            await link.serve()
        finally:
            log.info("neuron %s disconnected", link.node_id)

    async def _refuse(self, channel: Channel, code: str, reason: str) -> None:
        self.refusals += 1
        log.warning("refused neuron at %s: %s", channel.remote, reason)
        try:
            await channel.send(Refused(code, reason))
        except ChannelClosed:
            pass
        await channel.aclose(ws_transport.CLOSE_POLICY, code)

    async def _handshake(self, channel: Channel) -> NeuronLink | None:
        hello = await channel.receive()
        if not isinstance(hello, Hello):
            raise ProtocolError(f"expected hello, got {type(hello).__name__}")
        version = min(PROTOCOL_VERSION, hello.max_version)
        if version < max(MIN_PROTOCOL_VERSION, hello.min_version):
            await self._refuse(
                channel,
                "version_mismatch",
                f"neuron {hello.node_id!r} speaks protocol versions {hello.min_version}..{hello.max_version}; "
                f"this cortex speaks {MIN_PROTOCOL_VERSION}..{PROTOCOL_VERSION}",
            )
            return None
        cortex_nonce = auth.new_nonce()
        await channel.send(Challenge(cortex_nonce, version, self.settings.cortex_id))
        join = await channel.receive()
        if not isinstance(join, Join):
            raise ProtocolError(f"expected join, got {type(join).__name__}")
        if join.descriptor.node_id != hello.node_id:
            await self._refuse(channel, "bad_request", "the join descriptor names another node id than hello")
            return None
        try:
            token = self._token()
        except (OSError, ValueError) as exc:
            log.error("cannot read the join token: %s", exc)
            await self._refuse(channel, "unavailable", "the cortex cannot read its join token")
            return None
        expected = auth.join_proof(token, cortex_nonce, hello.nonce, hello.node_id)
        if not auth.verify(expected, join.proof):
            await self._refuse(
                channel,
                "unauthorized",
                f"neuron {hello.node_id!r}: the join proof does not match this cortex's join token",
            )
            return None
        link = NeuronLink(
            channel,
            join.descriptor,
            models=join.models,
            configs=join.configs,
            on_change=self.fleet.notify,
            send_timeout=self.settings.send_timeout,
        )
        # Registered before the welcome goes out: once a neuron is welcomed, it is counted.
        old = self.fleet.add(link)
        if old is not None and old.connected:
            log.info("neuron %s reconnected; closing its previous connection", link.node_id)
            await old.close(1000, "replaced by a new connection")
        await channel.send(
            Welcome(
                auth.welcome_proof(token, cortex_nonce, hello.nonce, hello.node_id),
                session_id=secrets.token_hex(8),
                heartbeat_interval=self.settings.heartbeat_interval,
                operator=self.settings.operator,
            )
        )
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
            for link in self.fleet:
                if not isinstance(link, NeuronLink):
                    continue
                allowed = max(silence, s.busy_silence) if link.provisioning else silence
                if link.connected and now - link.last_seen > allowed:
                    log.warning("neuron %s missed %d heartbeats: unhealthy", link.node_id, s.missed_heartbeats)
                    await link.drop_silent("missed heartbeats")
                if (
                    not link.connected
                    and link.disconnected_at is not None
                    and now - link.disconnected_at >= s.remove_after
                    and self.fleet.remove(link)
                ):
                    log.info("neuron %s removed after %.0fs without a connection", link.node_id, s.remove_after)

    async def shutdown_neurons(self, reason: str, grace: float) -> None:
        """Tell every connected neuron the cortex is going away (best effort, bounded)."""
        links = [l for l in self.fleet if isinstance(l, NeuronLink) and l.connected]
        with trio.move_on_after(2) as scope:
            scope.shield = True
            async with trio.open_nursery() as nursery:
                for link in links:
                    nursery.start_soon(link.part, reason, grace)
