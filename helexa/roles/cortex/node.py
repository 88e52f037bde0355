"""The cortex process: identity, join and admin tokens, control plane, orchestrator, the
gateway's portals (with their keys and usage ledger in ``DATA_DIR/usage.sqlite``) and
(when ``mesh.enabled``) the libp2p mesh and the federation, in one trio nursery; stopped
by :mod:`.shutdown` on SIGINT/SIGTERM; ``SIGHUP`` re-reads the config and the catalogue
and applies what can change live (:mod:`.reload`).

With the mesh, the orchestrator asks peers (:mod:`.peering`) for models its own fleet
cannot serve (as each portal's routing preferences allow), peers' requests run through
this cortex's own orchestrator (never out again), and receipts go to
``DATA_DIR/ledger.sqlite`` (``helexa ledger``), each linked to the usage ledger's row of
the request it paid for."""

from __future__ import annotations

import logging
import signal
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio

from helexa import identity as identity_mod
from helexa import build, secret_files, telemetry
from helexa.config import ConfigError

from . import admin_token, collector, join_token, neuron_keys
from .config import CortexConfig
from .config_files import check_key_files, check_tls_files, load_catalogue
from .control_server import ControlServer
from .data_files import check_writable, data_file, unusable
from .fleet import Fleet
from .gateway import Gateway
from .metrics import Metrics
from .orchestrator import Orchestrator
from .portal.portal import Portal
from .reload import PORTAL_RESTART_FIELDS, ReloadReport, plan_reload, stranded_keys
from .shutdown import drain

if TYPE_CHECKING:
    from helexa.protocol import GenerateRequest
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

    Args:
        config: the configuration to start with.
        loader: reads the configuration again, as it was first built (file, environment,
            flags), for :meth:`reload`; by default ``config`` itself (only the catalogue
            file is re-read).
    """

    def __init__(self, config: CortexConfig, *, loader: Callable[[], CortexConfig] | None = None) -> None:
        self.config = config
        self._loader = loader or (lambda: config.model_copy(deep=True))
        data = config.data_dir
        data.mkdir(parents=True, exist_ok=True, mode=0o700)
        check_writable("the data directory", data)
        store_dir = config.usage_store_path.parent
        if str(config.usage_store_path) != ":memory:" and store_dir != data:
            store_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            check_writable("the usage store's folder", store_dir)
        self._check_secrets()
        check_tls_files(config)
        with data_file("the node key", data / "identity.key",
                        "restore it from a backup, or remove it to start as a new peer"):
            self.identity = identity_mod.load_or_create(data / "identity.key")
        with data_file("the join token", join_token.path_in(data),
                        "run 'helexa join-token --rotate' and give neurons the new token"):
            join_token.load_or_create(data)
        pin = data / join_token.FINGERPRINT
        try:
            join_token.record_fingerprint(data, config.tls_cert_file)
        except OSError as exc:
            if exc.filename == str(pin):  # the data directory's pin file, not the certificate
                raise unusable("the certificate pin", pin, exc) from None
            raise ConfigError(f"tls_cert_file: {exc}") from None
        except ValueError as exc:
            raise ConfigError(f"tls_cert_file: {exc}") from None
        with data_file("the admin token", admin_token.path_in(data), "run 'helexa admin-token --rotate'"):
            admin_token.load_or_create(data)
        with data_file("the neurons' key bindings", neuron_keys.path_in(data),
                        "restore it from a backup, or remove it: each node id binds the key of its next join"):
            self.neuron_keys = neuron_keys.NeuronKeys(neuron_keys.path_in(data))
        self.fleet = Fleet()
        self.control = ControlServer(config, self.fleet, lambda: join_token.read(join_token.path_in(data)),
                                     cortex_id=self.identity.fingerprint, ssl_context=self._ssl(),
                                     keys=self.neuron_keys)
        self.catalogue = load_catalogue(config)
        self.orchestrator = Orchestrator(config, self.fleet, self.catalogue, Metrics())
        with data_file("the usage store", config.usage_store_path,
                        "it holds the API keys and the usage ledger: restore it from a backup"):
            self.gateway = Gateway(config, self.orchestrator,
                                   admin_token=lambda: admin_token.read(admin_token.path_in(data)),
                                   reload=self.reload, neuron_keys=self.neuron_keys)
        # Strangers' connections to the control socket, and each gateway socket's, hold at
        # most an even share of the open-file limit each (:mod:`.open_files`).
        self.control.cap_pending(self.gateway.connection_share())
        self.mesh: Mesh | None = None
        self.federation: Federation | None = None
        self.ledger: Ledger | None = None
        if config.mesh.enabled:
            self._join_mesh()
        self._stop = trio.Event()

    def _check_secrets(self) -> None:
        """Refuse to start on a secrets file that other users may read (one clear line)."""
        data = self.config.data_dir
        secret_files.check(data / "identity.key", "the node key")
        secret_files.check(join_token.path_in(data), "the join token")
        secret_files.check(admin_token.path_in(data), "the admin token")
        check_key_files(self.config)

    def _join_mesh(self) -> None:
        """Build the mesh host and the federation, and wire the gateway to ask peers."""
        from helexa.mesh import MeshSettings, open_libp2p_mesh

        from .federation.ledger import Ledger
        from .federation.service import Federation, FederationSettings
        from .peering import FleetOffer, LocalServing, PeerRouter

        mesh_cfg = self.config.mesh
        self.mesh = open_libp2p_mesh(self.identity.seed, MeshSettings(
            listen=mesh_cfg.listen, bootstrap=tuple(mesh_cfg.bootstrap), mdns=mesh_cfg.mdns,
            max_frame=self.config.max_frame_bytes, liveness_timeout=mesh_cfg.liveness_timeout,
            direct=mesh_cfg.direct, direct_port=mesh_cfg.direct_port))
        with data_file("the federation ledger", self.config.data_dir / "ledger.sqlite",
                        "it holds the peers' signed receipts: restore it from a backup"):
            self.ledger = Ledger(self.config.data_dir / "ledger.sqlite")
        offer = FleetOffer(self.fleet, self.catalogue, self.orchestrator.provisioner,
                           slots_per_neuron=self.config.federation.spare_slots_per_neuron)
        local = LocalServing(self.orchestrator)
        serve_policy, ask_policy = _federation_policies(self.config)
        self.federation = Federation(
            mesh=self.mesh, identity=self.identity, operator=self.config.operator, ledger=self.ledger,
            offer_fn=offer.offer, offered_fn=offer.offered, spare_fn=offer.spare,
            serve_generate=local.generate, serve_embed=local.embed,
            serve_policy=serve_policy, ask_policy=ask_policy, count_prompt=self._exact_prompt,
            settings=FederationSettings(announce_interval=mesh_cfg.announce_interval,
                                        unavailable_grace=mesh_cfg.unavailable_grace,
                                        idle_streams=self.config.federation.idle_streams))
        router = PeerRouter(self.federation)
        self.orchestrator.set_remote_router(router)
        self.gateway.metering.receipts = router.take_receipt
        self.gateway.web.mesh = (self.federation, self.ledger)
        self.gateway.set_federation(self.federation)

    async def _exact_prompt(self, request: GenerateRequest) -> int | None:
        """``request``'s exact prompt count by the edge's tokenizer, or None (a model it
        cannot tokenize): what a peer's receipt bills for a generation cut short."""
        limits = self.gateway.metering.limits
        count = await limits.counter.count(request) if limits is not None else None
        return count.tokens if count is not None and count.exact else None

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
                log.info("cortex ready: control=%s gateway=%s admin=%s version=%s", addrs.control_url,
                         addrs.gateway_url, addrs.admin_url, build.version())
                task_status.started(addrs)
                await self._stop.wait()
                await drain(self.gateway, self.control, grace=self.config.shutdown_grace, federation=self.federation)
                nursery.cancel_scope.cancel()
        finally:
            if self.ledger is not None:
                self.ledger.close()
            self.gateway.store.close()
            self.gateway.responses.store.close()

    def stop(self) -> None:
        """Begin a graceful stop (drain within ``shutdown_grace``, then return from run)."""
        self._stop.set()

    def reload(self) -> ReloadReport:
        """Re-read the config and the catalogue and apply what can change live (see
        :mod:`.reload`); logs one line saying what changed and what needs a restart.

        Raises:
            ConfigError: the new config or catalogue is invalid (one line naming the key);
                nothing was changed.
        """
        try:
            new = self._loader()
            catalogue = load_catalogue(new)
        except ConfigError as exc:
            log.error("reload refused, the running config stays: %s", exc)
            raise
        plan = plan_reload(self.config, new)
        report = ReloadReport(live=list(plan.live), restart=list(plan.restart))
        added, removed, changed = self.catalogue.replace(catalogue)
        report.catalogue = {"added": added, "removed": removed, "changed": changed}
        self.orchestrator.provisioner.catalogue_changed(changed + removed)
        if removed:
            dropped = self.orchestrator.provisioner.operator.drop_pins_outside(self.catalogue)
            report.pins_dropped = [f"{model_id} on {node_id}" for node_id, model_id in dropped]
            if dropped:
                log.warning("reload: dropped the pins of models no longer in the catalogue: %s (a copy loaded "
                            "stays until `helexa models unload MODEL`)", ", ".join(report.pins_dropped))
        live = self.config
        for pid in plan.portals:
            kept = {name: getattr(live.portals[pid], name) for name in PORTAL_RESTART_FIELDS}
            portal_config = new.portals[pid].model_copy(update=kept)
            live.portals[pid] = portal_config
            portal: Portal = self.gateway.portals[pid]
            after = Portal(pid, portal_config)
            report.warnings += stranded_keys(pid, self.gateway.keyring.list(pid), portal.serves, after.serves,
                                             portal_config.aliases)
            portal.reconfigure(portal_config)
            self.gateway.metering.portal_changed(portal)
        for name in type(live.orchestrator).model_fields:
            setattr(live.orchestrator, name, getattr(new.orchestrator, name))
        spare = live.federation.spare_slots_per_neuron
        live.federation = new.federation.model_copy(update={"spare_slots_per_neuron": spare})
        if self.federation is not None:
            self.federation.set_policies(*_federation_policies(live))
        live.gateway.admin_clients = list(new.gateway.admin_clients)
        self.gateway.admin.set_admin_clients(new.gateway.admin_clients)
        live.models_file = new.models_file
        live.enrolment = new.enrolment  # the control server reads it at each join
        if new.log_level != live.log_level:
            live.log_level = new.log_level
            logging.getLogger().setLevel(getattr(logging, new.log_level.upper(), logging.INFO))
        self.orchestrator.provisioner.wake()
        self.fleet.notify()
        (log.warning if report.warnings else log.info)("%s", report.line())  # warnings: the operator must act
        return report


def _federation_policies(config: CortexConfig):  # type: ignore[no-untyped-def]
    """The serve and ask policies of ``config.federation``."""
    from .federation.policy import AskPolicy, Outbound, ServePolicy

    f = config.federation
    serve = ServePolicy(
        serve_peers=f.serve_peers, allow_peers=frozenset(f.allow_peers), allow_operators=frozenset(f.allow_operators),
        deny_peers=frozenset(f.deny_peers), deny_operators=frozenset(f.deny_operators),
        rate_per_second=f.rate_per_second, burst=f.burst, max_concurrent_per_peer=f.max_concurrent_per_peer,
        models=None if f.models is None else frozenset(f.models))
    ask = AskPolicy(outbound=Outbound(f.outbound), peers=frozenset(f.peers), operators=frozenset(f.operators),
                    max_price_input=f.max_price_input, max_price_output=f.max_price_output)
    return serve, ask


async def serve(config: CortexConfig, *, loader: Callable[[], CortexConfig] | None = None) -> None:
    """Run a cortex until SIGINT or SIGTERM; SIGHUP reloads (:meth:`Cortex.reload`)."""
    cortex = Cortex(config, loader=loader)
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:

            async def run_cortex(task_status: trio.TaskStatus[CortexAddresses] = trio.TASK_STATUS_IGNORED) -> None:
                await cortex.run(task_status=task_status)
                nursery.cancel_scope.cancel()  # stopped: no more signals to wait for

            await nursery.start(run_cortex)

            async def on_signal() -> None:
                # Signals are read until the cortex has stopped: one left unread when the
                # receiver closes is delivered again, and a second SIGTERM (or a Ctrl-C) during
                # the drain then killed the process at its end (exit 143, or 1 "Aborted!").
                stopping = False
                async for sig in signals:
                    if stopping:
                        log.info("received %s: already stopping", signal.Signals(sig).name)
                        continue
                    if sig == signal.SIGHUP:
                        log.info("received SIGHUP: reloading")
                        try:
                            cortex.reload()
                        except ConfigError:
                            pass  # logged by reload; the running config stays
                        except Exception:  # a reload's failure never stops the cortex serving
                            log.exception("reload failed, the running config stays")
                        continue
                    log.info("received %s: stopping", signal.Signals(sig).name)
                    cortex.stop()
                    stopping = True

            nursery.start_soon(on_signal)


def run(config: CortexConfig, *, loader: Callable[[], CortexConfig] | None = None) -> int:
    """Entry point of ``helexa cortex``: returns the process exit code."""
    collector.tune()
    try:
        trio.run(lambda: serve(config, loader=loader))
    finally:
        telemetry.shutdown()  # the spans still batched
    log.info("cortex stopped")
    return 0
