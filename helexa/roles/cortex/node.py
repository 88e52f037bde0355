"""The cortex process: identity, join and admin tokens, control plane, orchestrator, the
gateway's portals (with their keys and usage ledger in ``DATA_DIR/usage.sqlite``) and
(when ``mesh.enabled``) the libp2p mesh and the federation, in one trio nursery; stopped
by :mod:`.shutdown` on SIGINT/SIGTERM.

With the mesh, the orchestrator asks peers (:mod:`.peering`) for models its own fleet
cannot serve (as each portal's routing preferences allow), peers' requests run through
this cortex's own orchestrator (never out again), and receipts go to
``DATA_DIR/ledger.sqlite`` (``helexa ledger``), each linked to the usage ledger's row of
the request it paid for."""

from __future__ import annotations

import logging
import signal
import ssl
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio

from helexa import identity as identity_mod
from helexa.config import ConfigError

from . import admin_token, join_token
from .catalogue import Catalogue, CatalogueError, default_catalogue
from .config import CortexConfig
from .control_server import ControlServer
from .fleet import Fleet
from .gateway import Gateway
from .metrics import Metrics
from .orchestrator import Orchestrator
from .shutdown import drain

if TYPE_CHECKING:
    from helexa.mesh import Mesh

    from .federation.ledger import Ledger
    from .federation.service import Federation

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CortexAddresses:
    control_url: str
    gateway_url: str
    mesh_addrs: tuple[str, ...] = field(default=())
    """The mesh multiaddrs (``.../p2p/<peer id>``) when the mesh is enabled."""
    admin_url: str = ""
    """Where the admin API is served (``admin_socket``, else the default portal's socket)."""
    portals: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """Each portal's URLs."""


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
        admin_token.load_or_create(data)
        self.fleet = Fleet()
        self.control = ControlServer(config, self.fleet, lambda: join_token.read(join_token.path_in(data)),
                                     cortex_id=self.identity.fingerprint, ssl_context=self._ssl())
        try:
            self.catalogue = Catalogue.load(config.models_file) if config.models_file else default_catalogue()
        except CatalogueError as exc:
            raise ConfigError(f"models_file: {exc}") from None
        self.orchestrator = Orchestrator(config, self.fleet, self.catalogue, Metrics())
        self.gateway = Gateway(config, self.orchestrator,
                               admin_token=lambda: admin_token.read(admin_token.path_in(data)))
        self.mesh: Mesh | None = None
        self.federation: Federation | None = None
        self.ledger: Ledger | None = None
        if config.mesh.enabled:
            self._join_mesh()
        self._stop = trio.Event()

    def _join_mesh(self) -> None:
        """Build the mesh host and the federation, and wire the gateway to ask peers."""
        from helexa.mesh import MeshSettings, open_libp2p_mesh

        from .federation.ledger import Ledger
        from .federation.policy import AskPolicy, Outbound, ServePolicy
        from .federation.service import Federation, FederationSettings
        from .peering import FleetOffer, LocalServing, PeerRouter

        mesh_cfg, fed_cfg = self.config.mesh, self.config.federation
        self.mesh = open_libp2p_mesh(self.identity.seed, MeshSettings(
            listen=mesh_cfg.listen, bootstrap=tuple(mesh_cfg.bootstrap), mdns=mesh_cfg.mdns,
            max_frame=self.config.max_frame_bytes))
        self.ledger = Ledger(self.config.data_dir / "ledger.sqlite")
        offer = FleetOffer(self.fleet, self.catalogue, self.orchestrator.provisioner,
                           slots_per_neuron=fed_cfg.spare_slots_per_neuron)
        local = LocalServing(self.orchestrator)
        self.federation = Federation(
            mesh=self.mesh, identity=self.identity, operator=self.config.operator, ledger=self.ledger,
            offer_fn=offer.offer, spare_fn=offer.spare, serve_generate=local.generate, serve_embed=local.embed,
            serve_policy=ServePolicy(
                serve_peers=fed_cfg.serve_peers, allow_peers=frozenset(fed_cfg.allow_peers),
                allow_operators=frozenset(fed_cfg.allow_operators), deny_peers=frozenset(fed_cfg.deny_peers),
                deny_operators=frozenset(fed_cfg.deny_operators), rate_per_second=fed_cfg.rate_per_second,
                burst=fed_cfg.burst, max_concurrent_per_peer=fed_cfg.max_concurrent_per_peer,
                models=None if fed_cfg.models is None else frozenset(fed_cfg.models)),
            ask_policy=AskPolicy(
                outbound=Outbound(fed_cfg.outbound), peers=frozenset(fed_cfg.peers),
                operators=frozenset(fed_cfg.operators), max_price_input=fed_cfg.max_price_input,
                max_price_output=fed_cfg.max_price_output),
            settings=FederationSettings(announce_interval=mesh_cfg.announce_interval,
                                        idle_streams=fed_cfg.idle_streams))
        router = PeerRouter(self.federation)
        self.orchestrator.set_remote_router(router)
        self.gateway.metering.receipts = router.take_receipt
        self.gateway.web.mesh = (self.federation, self.ledger)

    def _ssl(self) -> ssl.SSLContext | None:
        if self.config.tls_cert_file is None:
            return None
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(str(self.config.tls_cert_file), str(self.config.tls_key_file))
        return ctx

    async def run(self, *, task_status: trio.TaskStatus[CortexAddresses] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                control_port = await nursery.start(self.control.run)
                await nursery.start(self.orchestrator.run)
                binds = await nursery.start(self.gateway.run)
                mesh_addrs: list[str] = []
                if self.mesh is not None and self.federation is not None:
                    from helexa.mesh import record_addrs

                    mesh_addrs = await nursery.start(self.mesh.run)
                    record_addrs(self.config.data_dir, self.mesh.peer_id, mesh_addrs)
                    await nursery.start(self.federation.run)
                    log.info("mesh: operator %r, peer %s, listening on %s", self.config.operator,
                             self.mesh.peer_id, ", ".join(mesh_addrs))
                scheme = "wss" if self.config.tls_cert_file else "ws"
                addrs = CortexAddresses(
                    control_url=f"{scheme}://{self.control.host}:{control_port}",
                    gateway_url=binds[0],
                    mesh_addrs=tuple(mesh_addrs),
                    admin_url=self.gateway.admin_urls[0],
                    portals={pid: tuple(urls) for pid, urls in self.gateway.addresses.items()},
                )
                log.info("cortex ready: control=%s gateway=%s admin=%s", addrs.control_url, addrs.gateway_url,
                         addrs.admin_url)
                task_status.started(addrs)
                await self._stop.wait()
                await drain(self.gateway, self.control, grace=self.config.shutdown_grace)
                nursery.cancel_scope.cancel()
        finally:
            if self.ledger is not None:
                self.ledger.close()
            self.gateway.store.close()
            self.gateway.responses.store.close()

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
