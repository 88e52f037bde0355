"""The operator's console, on the admin socket, behind the admin token.

Pages: Fleet (live), Models (load, unload, pin on a chosen neuron), Traffic (the last hour),
Portals and keys (create: the key shown once; revoke; rotate), Usage (from the ledger, with
CSV), Mesh. Updates arrive pushed over one SSE stream (``/console/events``): the fleet
document (:mod:`.fleet_feed`) whenever it changes and at least every second, the traffic
every 10 seconds.

Access: the socket must be the admin socket, the client's address in
``gateway.admin_clients``, and the browser must hold a session (:mod:`.sessions`) opened
with the current admin token; a page without one redirects to the login page, and every
action and the event stream refuse it (401). Every action is a POST carrying the
session's CSRF token (a form field, or the ``X-CSRF-Token`` header). The actions go through
the same code as the admin API and the CLI (:class:`~..portal.admin.AdminApi`,
:class:`~..provisioner.Provisioner`).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timezone
from typing import Any

import trio
from quart import Blueprint, Response, abort, redirect, render_template, request

from ..admin_token import matches
from ..errors import GatewayError, NotFound
from ..fleet import CACHED, cached_only
from ..portal.admin import to_csv
from ..portal.admin_fields import parse_time
from ..portal.usage import GROUPS, OPEN_KEY
from .page_context import socket_admin, web
from .sessions import COOKIE, Session

log = logging.getLogger(__name__)

blueprint = Blueprint("console", __name__, url_prefix="/console")

TRAFFIC_EVERY = 10.0
"""Seconds between traffic documents on the event stream."""
_KEY_FIELDS = ("rpm", "tpm", "max_concurrent", "budget")


# --- access ----------------------------------------------------------------------------------


def _admin_token() -> str | None:
    try:
        return web().gateway.admin.token()
    except (OSError, ValueError) as exc:
        log.error("console: cannot read the admin token: %s", exc)
        return None


def _address_allowed() -> bool:
    allowed = web().gateway.admin.admin_clients
    client = (request.scope.get("client") or ("", 0))[0]
    return "*" in allowed or client in allowed


def _check_socket() -> None:
    if not socket_admin():
        abort(404)
    if not _address_allowed():
        abort(403, "The console is not served to this address (see gateway.admin_clients).")


def _session() -> Session | None:
    return web().sessions.find(request.cookies.get(COOKIE), _admin_token())


def page(handler: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """A page: without a session, the login page instead."""
    @functools.wraps(handler)
    async def guarded(*args: Any, **kwargs: Any) -> Any:
        _check_socket()
        session = _session()
        if session is None:
            return redirect("/console/login", 303)
        return await handler(session, *args, **kwargs)

    return guarded


def action(handler: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """An action or a feed: refused (401) without a session, (403) without its CSRF token."""
    @functools.wraps(handler)
    async def guarded(*args: Any, **kwargs: Any) -> Any:
        _check_socket()
        session = _session()
        if session is None:
            abort(401, "This needs the operator's admin token: sign in on the console's login page.")
        if request.method == "POST":
            form = await request.form
            if not session.csrf_ok(request.headers.get("X-CSRF-Token") or form.get("csrf")):
                abort(403, "The form's CSRF token is missing or stale: reload the page and try again.")
        return await handler(session, *args, **kwargs)

    return guarded


async def _render(template: str, session: Session, **context: Any) -> str:
    return await render_template(template, csrf=session.csrf, section=template.split(".")[0], **context)


# --- login -----------------------------------------------------------------------------------


@blueprint.get("/login")
async def login_page() -> Any:
    _check_socket()
    return await render_template("login.html", error=None)


@blueprint.post("/login")
async def login() -> Any:
    _check_socket()
    form = await request.form
    expected = _admin_token()
    if not matches(expected, (form.get("token") or "").strip() or None):
        log.info("console: a login with a wrong admin token from %s", (request.scope.get("client") or ("?",))[0])
        return await render_template("login.html", error="That is not the operator's admin token."), 401
    assert expected is not None
    secret, _ = web().sessions.open(expected)
    response = redirect("/console/fleet", 303)
    host = (request.host or "").rsplit(":", 1)[0].strip("[]")
    secure = request.scheme == "https" or host in ("localhost", "127.0.0.1", "::1")
    response.set_cookie(COOKIE, secret, httponly=True, samesite="Strict", secure=secure, path="/console",
                        max_age=int(web().sessions.ttl))
    return response


@blueprint.post("/logout")
@action
async def logout(session: Session) -> Any:
    web().sessions.close(request.cookies.get(COOKIE))
    response = redirect("/console/login", 303)
    response.delete_cookie(COOKIE, path="/console")
    return response


@blueprint.get("/")
@blueprint.get("")
@page
async def home(session: Session) -> Any:
    return redirect("/console/fleet", 303)


# --- fleet and the event stream -----------------------------------------------------------------


@blueprint.get("/fleet")
@page
async def fleet(session: Session) -> Any:
    return await _render("fleet.html", session, initial=web().feed.document().decode())


@blueprint.get("/events")
@action
async def events(session: Session) -> Any:
    """SSE: ``fleet`` documents as they change, ``traffic`` every 10 s; until the session
    ends (a sign-out, its expiry, a rotated admin token: checked at every fleet document, at
    least once a second) or the cortex stops. The browser then reconnects, is refused (401)
    and the page goes to the login page."""
    w = web()
    headers = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
    if request.method == "HEAD":  # the stream's headers only: a HEAD never gets an endless body
        return Response(b"", mimetype="text/event-stream", headers=headers)
    secret = request.cookies.get(COOKIE)

    def still_open() -> bool:
        try:
            token = w.gateway.admin.token()
        except (OSError, ValueError):
            token = None
        return w.sessions.find(secret, token) is session

    async def stream() -> AsyncIterator[bytes]:
        with w.feed.subscribe() as sub:
            yield b"retry: 2000\n\n"
            next_traffic = 0.0
            while True:
                doc = None
                with trio.move_on_after(max(0.0, next_traffic - trio.current_time())):
                    doc = await sub.next()
                    if doc is None:  # the feed is closed: the cortex is stopping
                        return
                if not still_open():
                    return
                if doc is not None:
                    yield b"event: fleet\ndata: " + doc + b"\n\n"
                if trio.current_time() >= next_traffic:
                    next_traffic = trio.current_time() + TRAFFIC_EVERY
                    yield b"event: traffic\ndata: " + json.dumps(w.traffic.view(), separators=(",", ":")).encode() + b"\n\n"

    response = Response(stream(), mimetype="text/event-stream", headers=headers)
    response.timeout = None
    return response


# --- models ----------------------------------------------------------------------------------


def _models_view() -> dict[str, Any]:
    gw = web().gateway
    orch = gw.orchestrator
    prov = orch.provisioner
    usable = gw.fleet.usable()
    now = trio.current_time()
    rows = []
    for entry in orch.catalogue:
        where = []
        for link in gw.fleet:
            st = link.models.get(entry.id)
            if st is None:
                if entry.id in cached_only(link, (entry,)):  # in its model cache only: a load there uses it
                    where.append({"node": link.node_id, "state": CACHED, "progress": None, "idle": None,
                                  "pinned": link.node_id in prov.operator.pins().get(entry.id, ())})
                continue
            last = orch.live.last_used.get((link.node_id, entry.id))
            where.append({"node": link.node_id, "state": st.state.value, "progress": st.progress,
                          "idle": None if last is None else round(now - last),
                          "pinned": link.node_id in prov.operator.pins().get(entry.id, ())})
        rows.append({"id": entry.id, "backend": entry.backend, "memory_mb": entry.memory_mb,
                     "keep_warm": entry.keep_warm, "idle_ttl": entry.idle_ttl,
                     "feasible": sorted(l.node_id for l in usable
                                        if entry.is_feasible_on(l.descriptor.hardware, prov.settings.memory_headroom)),
                     "where": where, "loading": prov.load_progress.get(entry.id)})
    return {"models": rows, "neurons": sorted(l.node_id for l in usable), "decisions": orch.routing_log.view()}


_NOTICES = {
    "load": "Loading {model} on {node}: the fleet shows it as it happens.",
    "unload": "Unloading {model} from {node}.",
    "pin": "{model} is pinned on {node}.",
    "unpin": "{model} is no longer pinned on {node}.",
}
"""What the Models page says after an action. The redirect names the action, the model and
the neuron, and the page says it in its own words, for a model in the catalogue and a neuron
in the fleet only: a link cannot make the console say what it likes."""


def _notice(what: str, model: str, node: str) -> str | None:
    gw = web().gateway
    if what not in _NOTICES or model not in {e.id for e in gw.orchestrator.catalogue} \
            or node not in {l.node_id for l in gw.fleet}:
        return None
    return _NOTICES[what].format(model=model, node=node)


@blueprint.get("/models")
@page
async def models(session: Session) -> Any:
    args = request.args
    notice = _notice(args.get("done", ""), args.get("model", ""), args.get("node", ""))
    return await _render("models.html", session, **_models_view(), notice=notice)


@blueprint.post("/models")
@action
async def model_action(session: Session) -> Any:
    form = await request.form
    what, model, node = form.get("action", ""), form.get("model", ""), form.get("node", "")
    gw = web().gateway
    prov = gw.orchestrator.provisioner
    try:
        if node not in gw.fleet and not (what == "unpin" and node in prov.operator.pins().get(model, ())):
            # as the admin API: a neuron not in the fleet (it left since the page was drawn)
            # is said to be unknown, not reported done (a pin it still has may be dropped)
            raise NotFound(f"no neuron {node!r} in the fleet", param="neuron", code="neuron_not_found")
        if what == "load":
            prov.operator.begin_load_on(model, node)
        elif what == "unload":
            prov.operator.begin_unload_from(model, node)
        elif what == "pin":
            prov.operator.pin(model, node)
        elif what == "unpin":
            prov.operator.unpin(model, node)
        else:
            abort(400, "action: one of load, unload, pin, unpin")
    except GatewayError as exc:
        return await _render("models.html", session, **_models_view(), error=exc.message), 400
    log.info("console: %s %s on %s", what, model, node)
    if request.headers.get("X-CSRF-Token"):  # a fetch from the page: no redirect
        return {"ok": True, "notice": _NOTICES[what].format(model=model, node=node)}
    return redirect("/console/models?" + _query(done=what, model=model, node=node), 303)


def _query(**params: str) -> str:
    from urllib.parse import urlencode

    return urlencode(params)


# --- traffic ---------------------------------------------------------------------------------


@blueprint.get("/traffic")
@page
async def traffic(session: Session) -> Any:
    return await _render("traffic.html", session, initial=json.dumps(web().traffic.view()))


# --- portals and keys ------------------------------------------------------------------------


async def _keys_context() -> dict[str, Any]:
    w = web()
    gw = w.gateway
    portals = []
    for p in gw.portals.values():
        portals.append({**p.describe(), "urls": gw.addresses.get(p.id, p.config.listen),
                        "state": gw.metering.account_state("portal:" + p.id)})
    keys = gw.admin.key_views()
    # One report row per key and currency: a key spent in two where its portal's currency
    # changed (a reload); each amount is shown in its own (never added), the counts summed.
    spent: dict[str, dict[str, Any]] = {}
    for r in await gw.metering.blocking(lambda: gw.store.report(by="key")):
        s = spent.setdefault(r["key"], {"costs": [], "total_tokens": 0, "requests": 0})
        s["costs"].append((r["cost"], r["currency"]))
        s["total_tokens"] += r["total_tokens"]
        s["requests"] += r["requests"]
    for k in keys:
        k["spent"] = spent.get(k["key_id"])
        k["last_used"] = w.traffic.key_seen.get(k["key_id"])
    return {"portals": portals, "keys": keys}


@blueprint.get("/keys")
@page
async def keys(session: Session) -> Any:
    created = session.hand_over(time.time())  # shown this once
    return await _render("keys.html", session, **(await _keys_context()), created=created, error=None)


@blueprint.post("/keys")
@action
async def create_key(session: Session) -> Any:
    form = await request.form
    body: dict[str, Any] = {"portal": form.get("portal", ""), "name": form.get("name", "").strip()}
    for field in _KEY_FIELDS:
        value = (form.get(field) or "").strip()
        if value:
            try:
                body[field] = float(value) if field == "budget" else int(value)
            except ValueError:
                return await _render("keys.html", session, **(await _keys_context()), created=None,
                                     error=f"{field}: a number"), 400
    for field in ("period", "budget_unit"):
        if form.get(field):
            body[field] = form[field]
    if (form.get("models") or "").strip():
        body["models"] = [m.strip() for m in form["models"].split(",") if m.strip()]
    if (form.get("expires_at") or "").strip():
        body["expires_at"] = form["expires_at"].strip()
    try:
        created = await web().gateway.admin.create(json.dumps(body).encode())
    except GatewayError as exc:
        return await _render("keys.html", session, **(await _keys_context()), created=None, error=exc.message), 400
    session.keep_for_showing(created, time.time())
    return redirect("/console/keys", 303)  # shown there: a reload shows the page, it creates nothing


@blueprint.post("/keys/<key_id>/<verb>")
@action
async def key_action(session: Session, key_id: str, verb: str) -> Any:
    admin = web().gateway.admin
    try:
        if verb == "revoke":
            await admin.revoke(key_id)
            return redirect("/console/keys", 303)
        if verb == "rotate":
            session.keep_for_showing(await admin.rotate(key_id), time.time())
            return redirect("/console/keys", 303)  # a reload of what shows the key does not rotate again
    except GatewayError as exc:
        return await _render("keys.html", session, **(await _keys_context()), created=None, error=exc.message), 400
    abort(404)


# --- usage -----------------------------------------------------------------------------------


def _billed_portals() -> list[str]:
    """The portals a usage report may be filtered by: those configured, then those removed
    from the config whose keys remain (their ledger rows too: the operator still bills them,
    as ``helexa usage --portal`` and ``GET /admin/usage`` do)."""
    gw = web().gateway
    configured = list(gw.portals)
    return configured + sorted({k.portal for k in gw.keyring.list()} - set(configured))


async def _usage_rows() -> tuple[str, dict[str, Any], list[dict[str, Any]]]:
    gw = web().gateway
    args = request.args
    by = args.get("by", "day")
    if by not in GROUPS:
        abort(400, f"by: one of {', '.join(GROUPS)}")
    portal = args.get("portal") or None
    if portal is not None and portal not in _billed_portals():
        abort(400, f"portal: no portal {portal!r}")
    try:
        since, until = parse_time(args.get("since"), "since"), parse_time(args.get("until"), "until")
    except GatewayError as exc:
        abort(400, exc.message)
    filters = {"portal": portal, "key_id": args.get("key") or None, "since": since, "until": until}
    rows = await gw.metering.blocking(lambda: gw.store.report(by=by, **filters))
    return by, {"by": by, "portal": portal or "", "key": args.get("key", ""), "since": args.get("since", ""),
                "until": args.get("until", "")}, rows


@blueprint.get("/usage")
@page
async def usage(session: Session) -> Any:
    by, filters, rows = await _usage_rows()
    top = max((r["total_tokens"] for r in rows), default=0)
    return await _render("usage.html", session, rows=rows, top=top, filters=filters, groups=GROUPS,
                         open_key=OPEN_KEY,
                         portals=_billed_portals(), csv_query=_query(**{**filters, "format": "csv"}))


@blueprint.get("/usage.csv")
@action
async def usage_csv(session: Session) -> Any:
    by, _, rows = await _usage_rows()
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d")
    return Response(to_csv(rows), mimetype="text/csv",
                    headers={"Content-Disposition": f'attachment; filename="helexa-usage-{by}-{stamp}.csv"'})


# --- mesh ------------------------------------------------------------------------------------


@blueprint.get("/mesh")
@page
async def mesh(session: Session) -> Any:
    from .mesh_view import mesh_context

    return await _render("mesh.html", session, **(await mesh_context(web().mesh)))


def _ago(ts: float | None) -> str:
    if not ts:
        return ""
    seconds = time.time() - ts
    if not math.isfinite(seconds):  # a time no clock gives (NaN, infinite): shown as it is, the page stays up
        return f"at {ts}"
    return f"{max(0, int(seconds))} s ago"


@blueprint.app_template_filter("ago")
def ago_filter(ts: float | None) -> str:
    return _ago(ts)


@blueprint.app_template_filter("money")
def money_filter(amount: float | None) -> str:
    """An amount as ``helexa usage`` prints it (six decimals, never an exponent): the page
    and the CLI show the same figure for the same ledger."""
    return "" if amount is None else f"{amount:.6f}"


@blueprint.app_template_filter("utc")
def utc_filter(ts: float | None) -> str:
    if not ts:
        return ""
    try:
        return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    except (OverflowError, ValueError, OSError):
        # A time no date can show: a peer's signed receipt says what it likes (1e300, NaN),
        # and one such receipt in the ledger made the Mesh page a 500 for good.
        return f"{ts} (not a date)"


