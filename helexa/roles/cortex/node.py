"""The cortex process: identity, join token, control plane, gateway and mesh in one trio
nursery; drained on SIGINT/SIGTERM."""

from __future__ import annotations

import logging
import signal
import ssl
from dataclasses import dataclass

import trio

from helexa import identity as identity_mod
from helexa.config import ConfigError, split_socket

from . import join_token
from .catalogue import Catalogue, CatalogueError, default_catalogue
from .config import CortexConfig
from .control_server import ControlServer, ControlSettings
from .fleet import Fleet
from .gateway import Gateway

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CortexAddresses:
    control_url: str
    gateway_url: str


class Cortex:
    """Everything a cortex runs, composed.

    ``run`` reports :class:`CortexAddresses` through ``task_status.started`` once every
    listener is bound.
    """

    def __init__(self, config: CortexConfig) -> None:
        self.config = config
        data = config.data_dir
        data.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.identity = identity_mod.load_or_create(data / "identity.key")
        join_token.load_or_create(data)
        self.fleet = Fleet()
        host, port = split_socket(config.control_socket)
        self.control = ControlServer(
            ControlSettings(
                host=host,
                port=port,
                heartbeat_interval=config.heartbeat_interval,
                missed_heartbeats=config.missed_heartbeats,
                remove_after=config.remove_after,
                handshake_timeout=config.handshake_timeout,
                send_timeout=config.send_timeout,
                max_frame=config.max_frame_bytes,
                operator=config.operator,
                cortex_id=self.identity.fingerprint,
            ),
            self.fleet,
            lambda: join_token.read(join_token.path_in(data)),
            ssl_context=self._ssl(),
        )
        try:
            self.catalogue = Catalogue.load(config.models_file) if config.models_file else default_catalogue()
        except CatalogueError as exc:
            raise ConfigError(f"models_file: {exc}") from None
        gw_host, gw_port = split_socket(config.gateway_socket)
        self.gateway = Gateway(
            self.fleet,
            self.catalogue,
            config.gateway.model_copy(
                update={"host": gw_host, "port": gw_port, "shutdown_grace": config.shutdown_grace}
            ),
        )
        self._stop = trio.Event()

    def _ssl(self) -> ssl.SSLContext | None:
        if self.config.tls_cert_file is None:
            return None
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(str(self.config.tls_cert_file), str(self.config.tls_key_file))
        return ctx

    async def run(self, *, task_status: trio.TaskStatus[CortexAddresses] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            control_port = await nursery.start(self.control.run)
            gateway_done = trio.Event()

            async def gateway(task_status: trio.TaskStatus[list[str]]) -> None:
                try:
                    await self.gateway.run(task_status=task_status)
                finally:
                    gateway_done.set()

            binds = await nursery.start(gateway)
            scheme = "wss" if self.config.tls_cert_file else "ws"
            host = self.control.settings.host
            addrs = CortexAddresses(
                control_url=f"{scheme}://{host}:{control_port}",
                gateway_url=binds[0],
            )
            log.info("cortex ready: control=%s gateway=%s", addrs.control_url, addrs.gateway_url)
            task_status.started(addrs)
            await self._stop.wait()
            with trio.CancelScope(shield=True):
                # Stop accepting HTTP; in-flight requests get shutdown_grace to finish.
                self.gateway.stop()
                with trio.move_on_after(self.config.shutdown_grace + 2):
                    await gateway_done.wait()
                await self.control.shutdown_neurons("cortex stopping", self.config.shutdown_grace)
            nursery.cancel_scope.cancel()

    def stop(self) -> None:
        """Begin a graceful stop (drain within ``shutdown_grace``, then return from run)."""
        self._stop.set()


async def serve(config: CortexConfig) -> None:
    cortex = Cortex(config)
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(cortex.run)

            async def on_signal() -> None:
                async for sig in signals:
                    log.info("received %s: stopping", signal.Signals(sig).name)
                    cortex.stop()
                    return

            nursery.start_soon(on_signal)


def run(config: CortexConfig) -> int:
    """Entry point of ``helexa cortex``: returns the process exit code."""
    trio.run(serve, config)
    log.info("cortex stopped")
    return 0
