"""The gateway: the portals' HTTP front doors over one orchestrator, as raw ASGI on trio.

Each portal (``[portals.NAME]``; :mod:`.portal`) listens on its own sockets and serves its
API surfaces there; all of them share one orchestrator, one metered path
(:class:`~.portal.metering.Metering`: authorisation of the model, quotas, the usage
ledger) and one key ring. A :class:`PortalApp` is the ASGI app of one socket: it finds the
route, authenticates the caller (a keyed portal's API key: ``Authorization: Bearer`` or
``x-api-key``), runs the handler, and turns every error into the route's surface's error
shape (``Route.errors``; OpenAI's envelope, :mod:`.errors`, by default; where no route
takes the path, the shape of the API whose prefix it is under, :data:`AREAS`); every
answer to a caller with rate limits carries the ``x-ratelimit-*`` headers.

Routes on every portal socket::

    POST /v1/chat/completions, /v1/completions, /v1/embeddings    (metered; :mod:`.openai_surface`)
    GET  /v1/models, /v1/models/{id}, /v1/usage
    POST /v1/responses (metered), GET and DELETE /v1/responses/{id}  (:mod:`.responses_surface`)
    /api/chat, /api/generate, /api/embed(dings) (metered), /api/tags, show, ps, version
                                                                  (Ollama's; :mod:`.ollama_surface`)
    POST /v1/messages (metered), /v1/messages/count_tokens   (:mod:`.anthropic_surface`)
    GET  /health                200 while serving

and on the admin socket (``admin_socket``, else the default portal's)::

    GET  /metrics               Prometheus (needs the admin token unless
                                gateway.metrics_public)
    /admin/*                    the admin API (:mod:`.portal.admin`, :mod:`.portal.admin_models`;
                                needs the admin token)

The web pages (:mod:`.web`: the console on the admin socket, each portal's own pages on
its sockets) are a quart-trio app that every socket hands ``/``, ``/console``, ``/portal``
and ``/static`` to.

The app is plain ASGI rather than a Quart app (measured: Quart's request cycle cost as
much as the rest of the hot path; figures in ``docs/benchmarks.md``), served by
:class:`~.http.HttpServer` (a sans-IO HTTP/1.1 connection in a trio shell) by default, and by hypercorn on request
(``gateway.server``) and for sockets with TLS.

A client that disconnects cancels its request: each inference request runs in its own
cancel scope, which :class:`.disconnect_watch.DisconnectWatch` cancels when the client
leaves, and the cancellation leaves the neuron link's context, which sends ``Cancel``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import trio
from opentelemetry import trace
from opentelemetry.trace import SpanKind

from helexa import logs, telemetry
from helexa.config import split_socket

from .anthropic_surface import AnthropicSurface
from .anthropic_api import error_shape as anthropic_error_shape
from .browser_guard import BrowserGuard, cors_headers, preflight_headers
from .asgi import BodyReads, ErrorShape, Exchange, Limits, Receive, Responder, Route, Router, Scope, Send
from .portal.config import DEFAULT_PORTAL, PortalConfig, is_loopback
from .disconnect_watch import DisconnectWatch
from .errors import BadRequest, ClientGone, GatewayError, NoCapacity, RequestTimeout, client_gone, envelope
from .fleet_metrics import FleetCollector
from .http import HttpServer
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .ollama_models import OllamaModels
from .ollama_surface import OllamaSurface, ollama_errors
from . import open_files
from .openai_surface import OpenAISurface, model_listing
from .orchestrator import Orchestrator
from .portal.admin import AdminApi
from .portal.admin_models import ModelsAdmin
from .portal.admin_neurons import NeuronsAdmin
from .portal.keys import Keyring
from .portal.metering import Caller, Metering
from .portal.portal import Portal
from .portal.response_store import ResponseStore
from .portal.store import SqliteStore, Store
from .portal.writer import LedgerWriter
from .request_limits import RequestLimits
from .responses_surface import ResponsesSurface
from .shutdown import CUT_WAIT, InFlight

if TYPE_CHECKING:
    from .config import CortexConfig
    from .federation.service import Federation
    from .neuron_keys import NeuronKeys

log = logging.getLogger(__name__)


def _operator_envelope(exc: BaseException) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """The admin API's errors: the operator's, so a failed load keeps its detail."""
    return envelope(exc, operator=True)


def server_error_body(status: int, message: str, target: bytes = b"") -> tuple[bytes, bytes]:
    """What the HTTP server says itself (malformed HTTP, a body too slow, a failed app), in
    the error shape of the API ``target``'s path is under (OpenAI's envelope by default)."""
    error = RequestTimeout(message) if status == 408 else BadRequest(message) if status < 500 else GatewayError(message)
    path = target.split(b"?", 1)[0].decode("latin-1")
    _, headers, body = (unrouted_errors(path) or envelope)(error)
    return dict(headers)[b"content-type"], body


AREAS: tuple[tuple[str, ErrorShape], ...] = (("/api", ollama_errors), ("/v1/messages", anthropic_error_shape))
"""Path prefixes another API than OpenAI's owns: a request under one that no route takes
(``POST /api/tags``, ``/api/nosuch``, ``/v1/messages/batches``) is answered in that API's
error shape, which its client reads, whether or not this portal serves that surface."""


def unrouted_errors(path: str) -> ErrorShape | None:
    """The error shape for a path no route takes (None: OpenAI's envelope); see :data:`AREAS`."""
    for prefix, shape in AREAS:
        if path.startswith(prefix) and (len(path) == len(prefix) or path[len(prefix)] == "/"):
            return shape
    return None


def _presented_key(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == b"authorization":
            if value[:7].lower() == b"bearer ":
                return value[7:].decode("latin-1").strip()
        elif name == b"x-api-key":
            return value.decode("latin-1").strip()
    return None


class PortalApp:
    """The ASGI app of one socket: a portal's routes (and the admin routes on the admin
    socket). See the module docstring."""

    def __init__(self, gateway: Gateway, portal: Portal | None, routes: list[Route], *, loopback: bool = True) -> None:
        self.gateway = gateway
        c = gateway.config
        self.guard = BrowserGuard(c.allowed_origins, c.allowed_hosts, loopback=loopback)
        """Other sites' pages and DNS rebinding refused (:mod:`.browser_guard`)."""
        self.portal = portal
        self.router = Router(routes)
        self.routes = self.router.routes
        self._anonymous = Caller(portal) if portal is not None else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # An HTTP request is handled here rather than in a method of its own: every frame on
        # a request's await chain is entered again each time its task resumes (measured:
        # docs/benchmarks.md, issue 17 item 2).
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                await self._lifespan(receive, send)
            return
        request_id = os.urandom(16).hex()  # as random as uuid4().hex, without a UUID object per request
        portal = self.portal.id if self.portal is not None else "admin"
        fields = logs.push(request_id=request_id, portal=portal)  # not logs.bound: no generator per request
        try:
            if not telemetry.enabled():
                await self._handle(scope, receive, send, request_id)
                return
            parent = None
            for name, value in scope["headers"]:
                if name == b"traceparent":
                    parent = telemetry.parent_context(value)
            # Named by its route once one matches; the path is the client's: masked and cut.
            span = telemetry.tracer().start_span(
                scope["method"], context=parent, kind=SpanKind.SERVER,
                attributes={"http.request.method": scope["method"], "url.path": telemetry.text(scope["path"]),
                            "helexa.request_id": request_id, "helexa.portal": portal})
            with trace.use_span(span, end_on_exit=True):
                await self._handle(scope, receive, send, request_id, traced=True)
        finally:
            logs.pop(fields)

    @staticmethod
    async def _lifespan(receive: Receive, send: Send) -> None:
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _handle(self, scope: Scope, receive: Receive, send: Send, request_id: str, *,
                      traced: bool = False) -> None:
        g = self.gateway
        out = Responder(send, [(b"x-request-id", request_id.encode())])
        scope["helexa.request_id"] = request_id
        ex = Exchange(scope, receive, out, request_id, g.edge_limits, g.watch)
        g.in_flight.enter()
        route: Route | None = None
        try:
            other_origin = self.guard.check(scope["headers"])  # before any work
            if other_origin is not None:  # an origin the operator allowed
                out.headers = out.headers + cors_headers(other_origin)
                if scope["method"] == "OPTIONS":
                    await out.full(204, preflight_headers(scope["headers"]), b"")
                    return
            route, ex.path_rest = self.router.find(scope["method"], scope["path"])
            if traced:
                trace.get_current_span().update_name(f"{route.method} {route.path}")
            portal = self.portal
            if portal is not None:
                if portal.keyed and route.keyed:
                    try:
                        key = g.keyring.authenticate(portal.id, _presented_key(scope), g.clock())
                    except GatewayError:
                        g.metrics.portal_refused(portal.id, "unauthorized")
                        raise
                    ex.caller = caller = Caller(portal, key)
                    out.late = lambda: g.metering.rate_headers(caller)
                else:
                    ex.caller = self._anonymous
                    if not portal.limits.unlimited:
                        out.late = lambda: g.metering.rate_headers(self._anonymous)  # type: ignore[arg-type]
            await route.handler(ex)
        except ClientGone:
            pass
        except Exception as exc:
            if client_gone(exc):  # a ClientGone in a nursery's group
                return
            if out.started:
                log.warning("request %s failed after its response began: %s", request_id, exc)
                return
            if route is not None:
                shape = (route.errors_by(scope) if route.errors_by is not None else None) or route.errors
            else:  # no route (404) or not this method (405): the shape of the API the path is under
                shape = unrouted_errors(scope["path"])
            operator = route is not None and route.path.startswith("/admin/")
            shape = shape or (_operator_envelope if operator else envelope)
            status, headers, body = shape(exc)
            try:
                await out.full(status, headers, body)
            except ClientGone:
                pass
        finally:
            g.in_flight.exit()
            if log.isEnabledFor(logging.DEBUG):
                log.debug("%s %s -> %s", scope["method"], scope["path"], out.status or "no response")


class Gateway:
    """Every portal's sockets over one orchestrator (see the module docstring).

    Args:
        config: the cortex's config (``portals``, ``gateway_socket``, ``admin_socket``,
            ``[gateway]``, ``shutdown_grace``, ``usage_store``).
        orchestrator: decides where requests run and runs them (its ``run`` must be
            running too).
        store: keys and the usage ledger (default: SQLite at ``config.usage_store_path``).
        admin_token: returns the operator's admin token (None: the admin API refuses all).
        clock: Unix time, for quotas and the ledger.
        inline_ledger: write ledger records on the trio thread (tests under the autojump
            clock only; see :class:`~.portal.writer.LedgerWriter`).
        reload: re-reads the cortex's config (``POST /admin/reload``; None: not offered).
        neuron_keys: the control plane's node id -> identity key bindings (``/admin/neurons/keys``;
            None: not served).
    """

    def __init__(self, config: CortexConfig, orchestrator: Orchestrator, *, store: Store | None = None,
                 admin_token: Callable[[], str | None] = lambda: None, clock: Callable[[], float] = time.time,
                 inline_ledger: bool = False, reload: Callable[[], Any] | None = None,
                 neuron_keys: NeuronKeys | None = None) -> None:
        self.cortex_config = config
        self.config = config.gateway
        self.shutdown_grace = config.shutdown_grace
        self.orchestrator = orchestrator
        self.fleet = orchestrator.fleet
        self.metrics = orchestrator.metrics
        self.clock = clock
        self.portals = {pid: Portal(pid, pc) for pid, pc in config.portals.items()}
        self.store: Store = store if store is not None else SqliteStore(
            config.usage_store_path, synchronous=self.config.ledger_sync.upper(), exclusive=True)
        self.writer = LedgerWriter(self.store, timeout=self.config.ledger_timeout, inline=inline_ledger)
        self.limits = RequestLimits(orchestrator.catalogue, orchestrator.fleet)
        self.metering = Metering(orchestrator, self.writer, self.store, self.metrics, limits=self.limits, clock=clock)
        self.keyring = Keyring()
        self.metering.keyring = self.keyring  # requests are admitted under their key as it is then
        self.watch = DisconnectWatch()
        self.edge_limits = Limits(self.config.max_body_bytes, self.config.body_timeout, BodyReads())
        self.in_flight = InFlight()
        """HTTP requests being handled right now, on every socket (a drain waits for none)."""
        self.metrics.add_collector(FleetCollector(orchestrator, lambda: self.in_flight.count,
                                                  lambda: self.federation))
        self.federation: Federation | None = None
        """The mesh federation, when the cortex joined one (its peers and traffic on ``/metrics``)."""
        self._created = int(time.time())
        self.openai = OpenAISurface(self.metering, self._fabric_models)
        # Stored responses live in the ledger's SQLite file (their own table and connection).
        self.responses = ResponsesSurface(self.metering, ResponseStore(getattr(self.store, "path", ":memory:")))
        self.ollama = OllamaSurface(self.metering, self._fabric_models)
        self.anthropic = AnthropicSurface(self.metering)
        self.admin = AdminApi(portals=self.portals, keyring=self.keyring, store=self.store, metering=self.metering,
                              fleet=self.fleet, token=admin_token, admin_clients=self.config.admin_clients,
                              clock=clock, reload=reload, models=ModelsAdmin(orchestrator),
                              neurons=NeuronsAdmin(neuron_keys, self.fleet) if neuron_keys is not None else None)
        self.ollama_models = OllamaModels(orchestrator, self.admin.authorize)
        self.addresses: dict[str, list[str]] = {}
        """Each portal's bound URLs, once :meth:`run` reported them."""
        self.admin_urls: list[str] = []
        self.apps: dict[str, PortalApp] = {}
        """The app served at each URL."""
        self._stop = trio.Event()
        self._servers: list[HttpServer] = []
        from .web.app import WebApp

        self.web = WebApp(self)
        """The console (admin socket) and each portal's pages, mounted beside the API."""
        self.metering.traffic = self.web.traffic

    def set_federation(self, federation: Federation) -> None:
        """The cortex joined the mesh: its peers and federated traffic go on ``/metrics``."""
        self.federation = federation

    # --- apps ------------------------------------------------------------------------------

    def _fabric_models(self) -> list[dict[str, Any]]:
        return model_listing(self.orchestrator.models(), self.config.owned_by, self._created)

    def models(self) -> list[dict[str, Any]]:
        """The default portal's ``/v1/models`` entries."""
        return self.portals[DEFAULT_PORTAL].listing(self._fabric_models(), full=True)

    def _common_routes(self) -> list[Route]:
        return [Route("GET", "/health", self._health, keyed=False)]

    def _admin_routes(self) -> list[Route]:
        metrics = self._metrics if self.config.metrics_public else self._guarded_metrics
        return [Route("GET", "/metrics", metrics, keyed=False), *self.admin.routes()]

    def app(self, portal_id: str, *, admin: bool = False, loopback: bool = True) -> PortalApp:
        """The ASGI app of a socket of ``portal_id`` (with the admin routes when ``admin``;
        ``loopback``: the socket binds loopback, so ``Host`` is checked, :mod:`.browser_guard`)."""
        portal = self.portals[portal_id]
        routes = self._common_routes()
        if "openai" in portal.config.surfaces:
            routes += self.openai.routes()
        if "responses" in portal.config.surfaces:
            routes += self.responses.routes()
        if "ollama" in portal.config.surfaces:
            routes += self.ollama.routes() + self.ollama_models.routes()
        if "anthropic" in portal.config.surfaces:
            routes += self.anthropic.routes()
            if "openai" not in portal.config.surfaces:  # the anthropic SDK's models.list() / .retrieve()
                routes += self.openai.model_routes()
        if admin:
            routes += self._admin_routes()
        taken = {(r.method, r.path, r.prefix) for r in routes}  # a surface's own route wins over a page
        routes += [r for r in self.web.routes(portal_id, admin=admin) if (r.method, r.path, r.prefix) not in taken]
        return PortalApp(self, portal, routes, loopback=loopback)

    def admin_app(self, *, loopback: bool = True) -> PortalApp:
        """The ASGI app of the admin socket alone."""
        return PortalApp(self, None, self._common_routes() + self._admin_routes() + self.web.routes(None, admin=True),
                         loopback=loopback)

    # --- serving -------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve every portal until :meth:`stop`; reports the default portal's URLs
        (``["http://127.0.0.1:8080"]``); :attr:`addresses` has every portal's.

        Keys and the budgets' spending are loaded from the store first. Stopping lets
        in-flight requests finish for ``shutdown_grace`` seconds; records still being
        written are written.
        """
        async with trio.open_nursery() as services:
            await services.start(self.watch.run)
            await services.start(self.writer.run)
            await services.start(self.web.run)
            services.start_soon(self.limits.counter.warm)
            keys = await self.metering.blocking(self.store.keys)
            for key in keys:
                self.keyring.put(key)
            await self.metering.restore(keys, list(self.portals.values()))
            admin_socket = self.cortex_config.admin_socket
            async with trio.open_nursery() as servers:
                for pid, portal in self.portals.items():
                    urls: list[str] = []
                    for i, addr in enumerate(portal.config.listen):
                        app = self.app(pid, admin=admin_socket is None and pid == DEFAULT_PORTAL and i == 0,
                                       loopback=is_loopback(addr))
                        bound = await servers.start(self._serve, app, addr, portal.config)
                        self.apps.update(dict.fromkeys(bound, app))
                        urls += bound
                    self.addresses[pid] = urls
                    log.info("portal %s (%s) listening on %s", pid, portal.config.auth or "open", ", ".join(urls))
                if admin_socket is not None:
                    admin_app = self.admin_app(loopback=is_loopback(admin_socket))
                    self.admin_urls = await servers.start(self._serve, admin_app, admin_socket, None)
                    self.apps.update(dict.fromkeys(self.admin_urls, admin_app))
                    log.info("admin API listening on %s", ", ".join(self.admin_urls))
                else:
                    self.admin_urls = self.addresses[DEFAULT_PORTAL][:1]
                task_status.started(self.addresses[DEFAULT_PORTAL])
            # Every server returned (their graceful stop is over): stop the services too.
            services.cancel_scope.cancel()

    def stop(self) -> None:
        self._stop.set()
        self.web.stop()
        for server in self._servers:
            server.stop()

    def cut(self) -> None:
        """The stop's grace is over: every model request still waiting or running ends now
        with a 503 ``shutting_down`` (an error event on a stream already under way), which
        its surface writes before the servers close the connections (:data:`CUT_WAIT`)."""
        error = NoCapacity("the cortex is stopping: retry shortly", code="shutting_down",
                           retry_after=self.orchestrator.config.retry_after)
        self.orchestrator.cut(error)
        if self.edge_limits.reads is not None:  # a client still sending its body
            self.edge_limits.reads.cut(error)
        if self.admin.models is not None:  # an operator's load or pull streaming its progress
            self.admin.models.cut(error)

    async def _serve(self, app: PortalApp, addr: str, portal: PortalConfig | None,
                     task_status: trio.TaskStatus[list[str]]) -> None:
        host, port = split_socket(addr)
        tls = portal is not None and portal.tls_cert_file is not None
        if tls or self.config.server == "hypercorn":
            await self._hypercorn(app, host, port, portal if tls else None, task_status)
            return
        c = self.config
        server = HttpServer(app, host=host, port=port, keep_alive_timeout=c.keep_alive_timeout,
                            keep_alive_max_requests=c.keep_alive_max_requests, read_timeout=c.body_timeout,
                            send_timeout=c.send_timeout, shutdown_grace=self.shutdown_grace + CUT_WAIT,
                            error_body=server_error_body, max_connections=self._max_connections())
        self._servers.append(server)
        if self._stop.is_set():
            server.stop()
        await server.run(task_status=task_status)

    def _max_connections(self) -> int:
        """Connections one socket may hold (``gateway.max_connections``, else its even share
        of the open-file limit with the control plane's pending handshakes:
        :mod:`.open_files`)."""
        if self.config.max_connections:
            return self.config.max_connections
        return self.connection_share()

    def connection_share(self) -> int:
        """Each socket's even share of the open-file limit (0: unlimited): the gateway's
        listening sockets and the control plane's pending handshakes, one share each."""
        sockets = sum(len(p.config.listen) for p in self.portals.values())
        sockets += self.cortex_config.admin_socket is not None
        return open_files.share(open_files.soft_limit(), sockets + 1)

    async def _hypercorn(self, app: PortalApp, host: str, port: int, tls: PortalConfig | None,
                         task_status: trio.TaskStatus[list[str]]) -> None:
        import hypercorn.config

        from .hypercorn_server import serve

        cfg = hypercorn.config.Config()
        cfg.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
        cfg.keep_alive_timeout = self.config.keep_alive_timeout
        cfg.keep_alive_max_requests = self.config.keep_alive_max_requests
        cfg.graceful_timeout = self.shutdown_grace + CUT_WAIT
        cfg.accesslog = None
        cfg.errorlog = logging.getLogger("helexa.gateway.http")
        if tls is not None:
            cfg.certfile, cfg.keyfile = str(tls.tls_cert_file), str(tls.tls_key_file)
        await serve(app, cfg, max_connections=self._max_connections(), head_timeout=self.config.body_timeout,
                    send_timeout=self.config.send_timeout, shutdown_trigger=self._stop.wait, task_status=task_status)

    # --- reads ---------------------------------------------------------------------------

    async def _guarded_metrics(self, ex: Exchange) -> None:
        self.admin.authorize(ex)  # the admin token, from an address in admin_clients
        await self._metrics(ex)

    async def _metrics(self, ex: Exchange) -> None:
        await ex.out.full(200, [(b"content-type", METRICS_CONTENT_TYPE.encode())], self.metrics.render())

    async def _health(self, ex: Exchange) -> None:
        await ex.out.json({"status": "ok", "neurons": len(self.fleet.usable())})

