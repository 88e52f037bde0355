"""The admin API: everything ``helexa keys``, ``helexa usage`` and ``helexa status`` do,
for a billing or account system to integrate with. Served on the admin socket (the
default portal's, or ``admin_socket``); every route needs the operator's admin token
(``Authorization: Bearer``; :mod:`..admin_token`), from an address in
``gateway.admin_clients`` (loopback only by default; ``["*"]`` for any).

Routes::

    GET   /admin/fleet                   the fleet (neurons, health, models)
    GET   /admin/portals                 each portal's settings, limits and their state
    GET   /admin/keys[?portal=P]         key records (never a key)
    POST  /admin/keys                    {portal, name, rpm, tpm, max_concurrent, budget,
                                         budget_unit, period, models, expires_at} -> 201,
                                         with "key": the key, shown this once
    GET   /admin/keys/ID                 one key, its quota state and this period's usage
    PATCH /admin/keys/ID                 change limits, models, expiry or name
    POST  /admin/keys/ID/revoke          stop it at once
    POST  /admin/keys/ID/rotate          a new key for the same id (usage and budget go on)
    GET   /admin/usage?by=key|model|day|portal&portal=&key=&since=&until=[&format=csv]
    GET   /admin/usage/records?portal=&key=&since=&until=&limit=   ledger rows
    GET   /admin/models[/ID], POST /admin/models/ID/pull|load|unload|pin|unpin
                                         the catalogue against the fleet (:mod:`.admin_models`)
    GET   /admin/neurons/keys, POST /admin/neurons/keys/NODE_ID/{enrol,forget}
                                         node ids' identity keys (:mod:`.admin_neurons`)
    POST  /admin/reload                  re-read cortex.toml and models.toml (as SIGHUP does):
                                         what applied and what needs a restart; 400 naming
                                         the key when the new file is invalid

Times (``since``, ``until``, ``expires_at``) are Unix seconds or ISO 8601 (a date is its
midnight UTC). Unset limits of a new key are its portal's ``quotas``. A key's numbers are
refused (400 naming the field) outside what can be stored and shown: ``rpm``, ``tpm`` and
``max_concurrent`` up to 2**63 - 1, ``budget`` up to 1e15, ``expires_at`` before the end of
the year 9999 (and, for a new key, in the future); a key's ``name`` has no control characters.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
from collections.abc import Callable
from typing import Any

import trio

from helexa import build
from helexa.config import ConfigError

from ..admin_token import matches
from ..asgi import Exchange, Route
from ..errors import BadRequest, Forbidden, NotFound, Unauthorized
from ..fleet import Fleet
from . import keys as keys_mod
from .admin_fields import LIMIT_FIELDS, KeyCreate, KeyFields, check_name, expiry, parse_body, parse_time
from .admin_models import ModelsAdmin
from .admin_neurons import NeuronsAdmin
from .keys import ApiKey, Keyring
from .metering import Metering
from .portal import Portal
from .quota import Limits, period_bounds
from .store import Store
from .usage import GROUPS

log = logging.getLogger(__name__)

KEY_ACTIONS = ("revoke", "rotate")
"""``POST /admin/keys/ID/<action>``."""


def key_path_methods(rest: str) -> tuple[str, ...]:
    """The methods of ``/admin/keys/<rest>``: a key (``ID``: GET, PATCH), a key's action
    (``ID/revoke``, ``ID/rotate``: POST), else none (404)."""
    key_id, _, action = rest.partition("/")
    if not key_id:
        return ()
    if not action:
        return ("GET", "PATCH")
    return ("POST",) if action in KEY_ACTIONS else ()


class AdminApi:
    """The admin routes (see the module docstring).

    Args:
        portals: every portal, by id.
        keyring: the keys in memory (kept in step with ``store``).
        store: keys and the ledger.
        metering: quota state (and its changes when a key's limits change).
        fleet: the live fleet.
        token: returns the current admin token (None: the admin API refuses everyone).
        admin_clients: addresses allowed (``*``: any).
        clock: Unix time.
        reload: the cortex's reload (returns a report with ``as_dict()``; raises
            ``ConfigError``); None when the cortex offers none.
        models: the model routes (None: not served).
        neurons: the neuron identity routes (None: not served).
    """

    def __init__(self, *, portals: dict[str, Portal], keyring: Keyring, store: Store, metering: Metering,
                 fleet: Fleet, token: Callable[[], str | None], admin_clients: list[str],
                 clock: Callable[[], float], reload: Callable[[], Any] | None = None,
                 models: ModelsAdmin | None = None, neurons: NeuronsAdmin | None = None) -> None:
        self.portals = portals
        self.keyring = keyring
        self.store = store
        self.metering = metering
        self.fleet = fleet
        self.token = token
        self.admin_clients = frozenset(admin_clients)
        self.clock = clock
        self.reload = reload
        self.models = models
        self.neurons = neurons
        self._changing = trio.Lock()
        """Held while a key's record is read, changed and saved (update, revoke, rotate): two
        changes at once each wrote back what it read, and the later undid the earlier."""

    def set_admin_clients(self, admin_clients: list[str]) -> None:
        """Allow these addresses from now on (a live reload)."""
        self.admin_clients = frozenset(admin_clients)

    def routes(self) -> list[Route]:
        guard = self._guarded
        return [
            Route("GET", "/admin/fleet", guard(self.fleet_view), keyed=False),
            Route("GET", "/admin/portals", guard(self.portals_view), keyed=False),
            Route("GET", "/admin/keys", guard(self.list_keys), keyed=False),
            Route("POST", "/admin/keys", guard(self.create_key), keyed=False),
            Route("GET", "/admin/keys/", guard(self.show_key), keyed=False, prefix=True, allow=key_path_methods),
            Route("PATCH", "/admin/keys/", guard(self.update_key), keyed=False, prefix=True, allow=key_path_methods),
            Route("POST", "/admin/keys/", guard(self.key_action), keyed=False, prefix=True, allow=key_path_methods),
            Route("GET", "/admin/usage", guard(self.usage), keyed=False),
            Route("GET", "/admin/usage/records", guard(self.records), keyed=False),
            Route("POST", "/admin/reload", guard(self.reload_config), keyed=False),
            *(self.models.routes(guard) if self.models is not None else []),
            *(self.neurons.routes(guard) if self.neurons is not None else []),
        ]

    def _guarded(self, handler: Callable[[Exchange], Any]) -> Callable[[Exchange], Any]:
        async def guarded(ex: Exchange) -> None:
            self.authorize(ex)
            await handler(ex)

        guarded.__name__ = handler.__name__
        return guarded

    def authorize(self, ex: Exchange) -> None:
        """Raises Forbidden (an address not allowed) or Unauthorized (no or a wrong token)."""
        client = ex.client
        if "*" not in self.admin_clients and client not in self.admin_clients:
            raise Forbidden(f"the admin API is not served to {client or 'this client'} (see gateway.admin_clients)")
        auth = ex.header(b"authorization") or b""
        presented = auth[7:].decode("latin-1").strip() if auth[:7].lower() == b"bearer " else None
        try:
            expected = self.token()
        except (OSError, ValueError) as exc:
            log.error("admin API: cannot read the admin token: %s", exc)
            expected = None
        if not matches(expected, presented):
            raise Unauthorized("the admin API needs the operator's admin token ('Authorization: Bearer <token>'; "
                               "helexa admin-token prints it)", code="invalid_admin_token")

    # --- reload ----------------------------------------------------------------------------

    async def reload_config(self, ex: Exchange) -> None:
        if self.reload is None:
            raise NotFound("this cortex has no config to reload", code="reload_unavailable")
        try:
            report = self.reload()
        except ConfigError as exc:
            raise BadRequest(f"reload refused, the running config stays: {exc}", code="invalid_config") from None
        await ex.out.json(report.as_dict())

    # --- fleet and portals -----------------------------------------------------------------

    async def fleet_view(self, ex: Exchange) -> None:
        # The cortex's own build beside each neuron's (its descriptor's "software"): what an
        # upgrade has reached.
        await ex.out.json({"cortex": {"version": build.version()}, **self.fleet.snapshot()})

    async def portals_view(self, ex: Exchange) -> None:
        data = []
        for portal in self.portals.values():
            data.append({**portal.describe(), "keys": len(self.keyring.list(portal.id)),
                         "state": self.metering.account_state("portal:" + portal.id)})
        await ex.out.json({"object": "list", "data": data})

    # --- keys ------------------------------------------------------------------------------

    def _portal(self, portal_id: str) -> Portal:
        portal = self.portals.get(portal_id)
        if portal is None:
            raise NotFound(f"no portal {portal_id!r}", param="portal", code="portal_not_found")
        return portal

    def _key(self, key_id: str) -> ApiKey:
        key = self.keyring.get(key_id)
        if key is None:
            raise NotFound(f"no key {key_id!r}", code="key_not_found")
        return key

    def _view(self, key: ApiKey) -> dict[str, Any]:
        return {**key.public(self.clock()), "quota": self.metering.account_state("key:" + key.key_id)}

    async def _save(self, key: ApiKey) -> None:
        await self.metering.blocking(self.store.put_key, key)
        self.keyring.put(key)
        await self.metering.key_changed(key)

    def _limits(self, base: Limits, fields: KeyFields) -> Limits:
        given = fields.model_fields_set
        values = {name: getattr(fields, name) if name in given else getattr(base, name) for name in LIMIT_FIELDS}
        values["budget_unit"] = values["budget_unit"] or base.budget_unit
        values["period"] = values["period"] or base.period
        return Limits(**values)

    def _models(self, portal: Portal, models: list[str] | None) -> tuple[str, ...] | None:
        if models is None:
            return None
        for m in models:
            if portal.serves(m) is None:
                raise BadRequest(f"models: portal {portal.id!r} does not serve {m!r}", param="models")
        return tuple(models)

    async def list_keys(self, ex: Exchange) -> None:
        portal = ex.query().get("portal")
        views = self.key_views(portal)
        if portal is not None and not views:
            self._portal(portal)  # a typo is 404; a portal removed from the config still has its keys
        await ex.out.json({"object": "list", "data": views})

    async def create_key(self, ex: Exchange) -> None:
        await ex.out.json(await self.create(await ex.body()), status=201)

    async def create(self, raw: bytes) -> dict[str, Any]:
        """Create a key from a JSON body (the fields of ``POST /admin/keys``): its view, with
        ``"key"``, the key itself, shown this once. Raises BadRequest, NotFound."""
        body = parse_body(KeyCreate, raw)
        assert isinstance(body, KeyCreate)
        check_name(body.name)
        portal = self._portal(body.portal)
        now = self.clock()
        secret, key = keys_mod.create(
            portal.id, body.name, limits=self._limits(portal.key_defaults, body),
            models=self._models(portal, body.models), now=now, expires_at=expiry(body.expires_at, now, new=True))
        await self._save(key)
        log.info("admin: created key %s (%r) on portal %s", key.key_id, key.name, portal.id)
        view: dict[str, Any] = {"key": secret, **self._view(key)}
        if not portal.keyed:
            view["warning"] = f"portal {portal.id!r} is open (auth is not \"keys\"): its requests need no key"
        return view

    async def show_key(self, ex: Exchange) -> None:
        key = self._key(ex.path_rest)
        now = self.clock()
        start = period_bounds(key.limits.period, now)[0]
        rows = await self.metering.blocking(
            lambda: self.store.report(by="model", key_id=key.key_id, since=start or None))
        await ex.out.json({**self._view(key), "period_usage": rows})

    async def update_key(self, ex: Exchange) -> None:
        self._key(ex.path_rest)  # 404 before the body is read
        body = parse_body(KeyFields, await ex.body())
        assert isinstance(body, KeyFields)
        check_name(body.name)
        given = body.model_fields_set
        async with self._changing:
            # The record as it is now, not as it was before the body came (a revoke or a
            # rotation meanwhile would be undone by writing back the record read then).
            key = self._key(ex.path_rest)
            changes: dict[str, Any] = {"limits": self._limits(key.limits, body)}
            if "name" in given and body.name:
                changes["name"] = body.name
            if "models" in given:
                changes["models"] = self._models(self._portal(key.portal), body.models)
            if "expires_at" in given:
                changes["expires_at"] = expiry(body.expires_at, self.clock(), new=False)
            key = dataclasses.replace(key, **changes)
            await self._save(key)
        log.info("admin: updated key %s", key.key_id)
        await ex.out.json(self._view(key))

    async def key_action(self, ex: Exchange) -> None:
        key_id, _, action = ex.path_rest.partition("/")
        if action == "revoke":
            await ex.out.json(await self.revoke(key_id))
        elif action == "rotate":
            await ex.out.json(await self.rotate(key_id))
        else:
            self._key(key_id)
            raise NotFound(f"no route /admin/keys/{ex.path_rest}")

    async def revoke(self, key_id: str) -> dict[str, Any]:
        """Revoke a key at once (again: no change); its view. Raises NotFound."""
        async with self._changing:
            key = self._key(key_id)
            if key.revoked_at is None:
                key = dataclasses.replace(key, revoked_at=self.clock())
                await self._save(key)
                if (portal := self.portals.get(key.portal)) is not None:
                    portal.key_revoked(key.key_id)
                log.info("admin: revoked key %s", key.key_id)
        return self._view(key)

    async def rotate(self, key_id: str) -> dict[str, Any]:
        """A new secret for the same key id: its view with ``"key"``, shown this once.
        Raises NotFound, BadRequest (a revoked key)."""
        async with self._changing:
            key = self._key(key_id)
            if key.revoked_at is not None:
                raise BadRequest(f"key {key.key_id} is revoked; create a new one", code="key_revoked")
            secret, key = keys_mod.rotate(key)
            await self._save(key)
        log.info("admin: rotated key %s", key.key_id)
        return {"key": secret, **self._view(key)}

    def key_views(self, portal: str | None = None) -> list[dict[str, Any]]:
        """Every key's record (of ``portal``, when given) and quota state; never a key."""
        return [self._view(k) for k in self.keyring.list(portal)]

    # --- usage -----------------------------------------------------------------------------

    def _known(self, portal: str | None, rows: list[Any]) -> None:
        """A usage filter's ``portal`` that is neither configured nor in the ledger nor has
        keys is a typo (404). A portal removed from the config keeps its ledger and its
        keys, and the operator still bills it."""
        if portal is not None and not rows and portal not in self.portals and not self.keyring.list(portal):
            self._portal(portal)

    def _filters(self, ex: Exchange) -> dict[str, Any]:
        q = ex.query()
        return {"portal": q.get("portal"), "key_id": q.get("key"), "since": parse_time(q.get("since"), "since"),
                "until": parse_time(q.get("until"), "until")}

    async def usage(self, ex: Exchange) -> None:
        q = ex.query()
        by = q.get("by", "key")
        if by not in GROUPS:
            raise BadRequest(f"by: one of {', '.join(GROUPS)}", param="by")
        fmt = q.get("format", "json")
        if fmt not in ("json", "csv"):  # format=xml was answered in JSON, as if it had been understood
            raise BadRequest("format: json or csv", param="format")
        filters = self._filters(ex)
        rows = await self.metering.blocking(lambda: self.store.report(by=by, **filters))
        self._known(filters["portal"], rows)
        if fmt == "csv":
            await ex.out.full(200, [(b"content-type", b"text/csv; charset=utf-8")], to_csv(rows).encode())
            return
        await ex.out.json({"object": "list", "by": by, "data": rows})

    async def records(self, ex: Exchange) -> None:
        q = ex.query()
        try:
            limit = int(q.get("limit", "1000"))
        except ValueError:
            limit = 0
        if not 1 <= limit <= MAX_RECORDS:  # limit=-1 answered one row, limit=10**6 a tenth: both as if understood
            raise BadRequest(f"limit: an integer from 1 to {MAX_RECORDS}", param="limit")
        filters = self._filters(ex)
        rows = await self.metering.blocking(lambda: self.store.records(limit=limit, **filters))
        self._known(filters["portal"], rows)
        await ex.out.full(200, [(b"content-type", b"application/json")],
                          json.dumps({"object": "list", "data": [r.as_dict() for r in rows]}).encode())


MAX_RECORDS = 100_000
"""The most ledger rows one ``GET /admin/usage/records`` answers."""


def to_csv(rows: list[dict[str, Any]]) -> str:
    """Rows of a usage report as CSV (a header line first)."""
    if not rows:
        return ""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()
