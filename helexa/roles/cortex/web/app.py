"""The web pages' app: one quart-trio app in the cortex's trio process, mounted beside the
lean API path.

Each socket's :class:`~..gateway.PortalApp` hands the paths under ``/console``,
``/portal`` and ``/static`` (and ``/`` itself) to this app as plain ASGI
(:meth:`WebApp.routes`); everything else stays on the lean path. The scope it forwards
carries which socket asked (``helexa.portal``: the portal whose socket it is, or None on
the admin socket alone; ``helexa.admin``: whether the socket serves the admin routes), so
the console answers only on the admin socket and a portal's pages only on that portal's
sockets. Templates and static files are package data, served from the installed package;
nothing is fetched from elsewhere.

Every response carries a strict Content-Security-Policy (scripts and styles from this
origin only; no inline script), ``X-Frame-Options: DENY``, ``nosniff`` and
``Referrer-Policy: same-origin`` (no address leaves for another site; under ``no-referrer`` a
browser's form POST says ``Origin: null``, which :mod:`..browser_guard` refuses as another
site's); an error is a plain page, never a traceback.

A failed build (a broken template folder, a missing dependency, an error in a page's
module) does not take the cortex down: :meth:`WebApp.run` logs one error line, the API
keeps serving, and every web page answers ``503`` with a plain page saying the console
failed to start and to see the log.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from ..asgi import Exchange, Route
from .fleet_feed import FleetFeed
from .page_context import socket_admin, socket_portal
from .sessions import Sessions
from .traffic import Traffic

if TYPE_CHECKING:
    from quart import Response
    from quart_trio import QuartTrio
    from werkzeug.exceptions import HTTPException

    from ..gateway import Gateway

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
PREFIXES = ("/console", "/portal", "/static")
_METHODS = ("GET", "POST", "HEAD")
FAILED_PAGE = b"The web console failed to start; the cortex's log says why. The API is unaffected.\n"
"""What every web page answers (503) when the pages could not be built."""
_SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: https:; style-src 'self'; "
                               "script-src 'self'; connect-src 'self'; frame-ancestors 'none'; "
                               "base-uri 'none'; form-action 'self'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}


class WebApp:
    """The console and the portals' pages (see the module docstring).

    Args:
        gateway: the gateway whose portals, keys, ledger, metering and orchestrator the
            pages show and act on.
    """

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.sessions = Sessions()
        self.traffic = Traffic(gateway.clock)
        self.feed = FleetFeed(gateway.fleet, gateway.orchestrator.provisioner)
        self.mesh: Any = None
        """Set by the cortex when the mesh is on: ``(federation, ledger)``."""
        self.app: QuartTrio | None = None
        """The quart-trio app, once :meth:`run` built it."""
        self._built = trio.Event()
        self.failure: str | None = None
        """Why the pages could not be built (None while building and once built)."""

    def build(self) -> QuartTrio:
        """The quart-trio app with the console's and the portals' pages. Blocking (importing
        Quart takes about a second): :meth:`run` calls it on a worker thread, so the cortex
        is serving its API meanwhile."""
        from quart_trio import QuartTrio
        from werkzeug.exceptions import HTTPException

        from . import console, portal_site

        app = QuartTrio(__name__, template_folder=str(HERE / "templates"), static_folder=str(HERE / "static"),
                        static_url_path="/static")
        app.config.update(RESPONSE_TIMEOUT=None, BODY_TIMEOUT=self.gateway.config.body_timeout,
                          MAX_CONTENT_LENGTH=64 * 1024, PROPAGATE_EXCEPTIONS=False,
                          SEND_FILE_MAX_AGE_DEFAULT=3600)
        app.extensions["helexa"] = self
        app.register_blueprint(console.blueprint)
        app.register_blueprint(portal_site.blueprint)
        app.add_url_rule("/", "root", _root)
        app.after_request(_secure)
        app.register_error_handler(HTTPException, _http_error)
        app.register_error_handler(Exception, _server_error)
        return app

    def routes(self, portal_id: str | None, *, admin: bool) -> list[Route]:
        """The routes a socket hands to this app (``portal_id``: whose socket, None for
        the admin socket alone)."""
        async def forward(ex: Exchange) -> None:
            scope = dict(ex.scope)
            scope["helexa.portal"] = portal_id
            scope["helexa.admin"] = admin
            if self.app is None:
                with trio.move_on_after(30):
                    await self._built.wait()
                if self.failure is not None:
                    await ex.out.full(503, [(b"content-type", b"text/plain; charset=utf-8")], FAILED_PAGE)
                    return
                if self.app is None:
                    await ex.out.full(503, [(b"content-type", b"text/plain; charset=utf-8"), (b"retry-after", b"5")],
                                      b"The web pages are starting; try again in a moment.\n")
                    return
            ex.out.started = True  # the app answers for itself, its errors included
            await self.app(scope, ex.receive, ex.out.send)

        routes = [Route(m, "/", forward, keyed=False) for m in ("GET", "HEAD")]
        for prefix in PREFIXES:
            for method in _METHODS:
                routes.append(Route(method, prefix, forward, keyed=False))
                routes.append(Route(method, prefix + "/", forward, keyed=False))
                routes.append(Route(method, prefix + "/", forward, keyed=False, prefix=True))
        return routes

    def stop(self) -> None:
        """The cortex is stopping: end the console's event streams (endless otherwise, they
        would hold the graceful stop for all of ``shutdown_grace``)."""
        self.feed.close()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the fleet feed, build the app (on a worker thread) and run its startup, until
        cancelled. Reports started at once: the API does not wait for the pages."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self.feed.run)
            task_status.started()
            # Jinja2 first, on this thread: the chat templates import it here too, and two
            # threads importing one package at once can meet it half initialised (seen:
            # ImportError from a partially initialised jinja2.environment).
            import jinja2.ext  # noqa: F401
            import jinja2.sandbox  # noqa: F401

            try:
                app = await trio.to_thread.run_sync(self.build, abandon_on_cancel=True)
                app.nursery = nursery
                await app.startup()
            except Exception as exc:
                # The pages are an extra: the API, the control plane and the mesh run on.
                self.failure = f"{type(exc).__name__}: {exc}"
                log.error("the web console failed to start (%s); the API keeps serving and the web pages "
                          "answer 503", self.failure)
                log.debug("the web console's failure", exc_info=True)
                self._built.set()
                await trio.sleep_forever()
            self.app = app
            self._built.set()
            try:
                await trio.sleep_forever()
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(2):
                    await app.shutdown()


async def _root() -> Response:
    from quart import redirect

    return redirect("/console/" if socket_admin() and socket_portal() is None else "/portal/", 303)


async def _secure(response: Response) -> Response:
    from quart import request

    for name, value in _SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    if request.path.startswith("/console"):
        response.headers.setdefault("Cache-Control", "no-store")
    return response


async def _http_error(exc: HTTPException) -> Any:
    from quart import render_template

    code = exc.code or 500
    return await render_template("error.html", code=code, title=exc.name, message=exc.description), code


async def _server_error(exc: Exception) -> Any:
    from quart import render_template, request

    log.exception("web page %s failed", request.path)
    return await render_template("error.html", code=500, title="Something went wrong",
                                 message="The page failed; the cortex's log says why."), 500
