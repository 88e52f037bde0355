"""A portal as the request path sees it: which models it serves under which names, what
they cost, where its requests may run, and who they are for (pure, built from its
:class:`~.config.PortalConfig`)."""

from __future__ import annotations

from typing import Any

from ..cache_scope import scope_of
from ..errors import ModelNotFound
from ..federation.policy import AskPolicy, Outbound
from ..orchestrator import Tenant
from .config import PortalConfig, QuotaConfig
from .keys import ApiKey
from .quota import Limits

_PUBLIC_FIELDS = ("id", "object", "created", "owned_by", "loaded")


def limits_of(quota: QuotaConfig) -> Limits:
    return Limits(rpm=quota.rpm, tpm=quota.tpm, max_concurrent=quota.max_concurrent, budget=quota.budget,
                  budget_unit=quota.budget_unit, period=quota.period)


class Portal:
    """One front door (see ``docs/portals.md``).

    Model names: a client asks for a *public* name, which is an alias (mapped to a
    catalogue model) or a model the portal lists under its own name (every model when the
    portal lists none and has no aliases). A name the portal does not serve is unknown
    here (404), so a portal never reveals another's models; nor does a key learn of a model
    it may not use: that name is unknown to it too (404, as its listing leaves it out).
    """

    def __init__(self, portal_id: str, config: PortalConfig) -> None:
        self.id = portal_id
        self.reconfigure(config)

    def reconfigure(self, config: PortalConfig) -> None:
        """Serve under ``config`` from now on (a live reload; its sockets are not this
        object's business). Requests already admitted finish under what they were given."""
        portal_id = self.id
        self.config = config
        self.name = config.name or portal_id
        self.keyed = config.keyed
        self.records_usage = config.records_usage
        self.currency = config.currency
        self.limits = limits_of(config.limits)
        self.key_defaults = limits_of(config.quotas)
        self.allow_peers = config.routing.mode == "mesh"
        self.ask_policy = _ask_policy(config) if self.allow_peers else None
        self.open_listing = config.models is None and not config.aliases
        self._listed = frozenset(config.models or ())
        self._prices = {name: (p.input, p.output) for name, p in config.prices.items()}
        self._tenants: dict[str, Tenant] = {}
        self._anonymous = Tenant(portal_id, "", config.priority, config.weight)
        self._per_key = config.prompt_cache == "per_key"
        self._scopes: dict[str, str] = {}

    def serves(self, public: str) -> str | None:
        """The catalogue model behind ``public``, or None when this portal does not serve it."""
        target = self.config.aliases.get(public)
        if target is not None:
            return target
        if self.open_listing or public in self._listed:
            return public
        return None

    def resolve(self, public: str, key: ApiKey | None) -> str:
        """The catalogue model to run for ``public``.

        Raises:
            ModelNotFound: the portal does not serve ``public``, or ``key`` may not use it
                (404 either way, word for word: a 403 would tell a key what its listing
                hides, that the model exists here). A name the key's own ``models`` list
                and the portal no longer serves (a reload renamed or removed its alias)
                is a 404 that says so: the key holder knows its list, and the name's new
                alias stays closed to it until the operator updates the key.
        """
        served = self.serves(public)
        if served is None or (key is not None and not key.allows(public)):
            if served is None and key is not None and key.models is not None and public in key.models:
                raise ModelNotFound(public, f"The model '{public}' is one this key may use, but this portal no "
                                            "longer serves it under that name (its operator renamed or removed it): "
                                            "ask the operator to update the key's models")
            raise ModelNotFound(public)
        return served

    def price(self, public: str) -> tuple[float, float]:
        """``(input, output)`` per million tokens of ``public`` on this portal."""
        return self._prices.get(public, (0.0, 0.0))

    def cost(self, public: str, prompt_tokens: int, completion_tokens: int) -> float:
        p_in, p_out = self._prices.get(public, (0.0, 0.0))
        return (prompt_tokens * p_in + completion_tokens * p_out) / 1_000_000

    def tenant(self, key: ApiKey | None) -> Tenant:
        if key is None:
            return self._anonymous
        tenant = self._tenants.get(key.key_id)
        if tenant is None:
            tenant = self._tenants[key.key_id] = Tenant(self.id, key.key_id, self.config.priority, self.config.weight)
        return tenant

    def key_revoked(self, key_id: str) -> None:
        """Forget what was kept for ``key_id`` (it never comes back)."""
        self._tenants.pop(key_id, None)
        self._scopes.pop(key_id, None)

    def cache_scope(self, key: ApiKey | None) -> str:
        """The cache scope of ``key``'s requests (see :mod:`..cache_scope`): the key's own,
        or the portal's (an open portal, or ``prompt_cache = "portal"``)."""
        key_id = key.key_id if key is not None and self._per_key else ""
        scope = self._scopes.get(key_id)
        if scope is None:
            scope = self._scopes[key_id] = scope_of(self.id, key_id)
        return scope

    def listing(self, models: list[dict[str, Any]], *, full: bool) -> list[dict[str, Any]]:
        """This portal's ``/v1/models`` entries from the fabric's listing: the models it
        lists, under their public names (aliases included when their model is available).
        ``full`` keeps the placement fields (``feasible_on``, ``locations``, peers);
        otherwise only OpenAI's fields and ``loaded`` are shown."""
        by_id = {m["id"]: m for m in models}
        out: list[dict[str, Any]] = []
        if self.open_listing:
            chosen = [(m["id"], m) for m in models]
        else:
            chosen = [(name, by_id[name]) for name in self.config.models or () if name in by_id]
            chosen += [(alias, by_id[target]) for alias, target in self.config.aliases.items() if target in by_id]
        owned_by = self.config.owned_by or self.id
        for public, entry in chosen:
            if full:
                out.append({**entry, "id": public})
            else:
                out.append({k: entry[k] for k in _PUBLIC_FIELDS if k in entry} | {"id": public, "owned_by": owned_by})
        return out

    def describe(self) -> dict[str, Any]:
        """The portal's settings as the admin API and the web pages show them."""
        c = self.config
        return {"id": self.id, "name": self.name, "auth": c.auth or "none", "listen": list(c.listen),
                "tls": c.tls_cert_file is not None, "surfaces": list(c.surfaces),
                "models": None if c.models is None else list(c.models), "aliases": dict(c.aliases),
                "currency": c.currency, "prices": {k: {"input": v[0], "output": v[1]} for k, v in self._prices.items()},
                "key_defaults": self.key_defaults.as_dict(), "limits": self.limits.as_dict(),
                "routing": c.routing.model_dump(), "priority": c.priority, "records_usage": self.records_usage,
                "theme": {"name": self.name, **c.theme.model_dump()}}


def _ask_policy(config: PortalConfig) -> AskPolicy | None:
    """The portal's narrowing of the operator's outbound policy (None: it adds nothing)."""
    r = config.routing
    listed = bool(r.peers or r.operators)
    if not listed and r.max_price_input is None and r.max_price_output is None:
        return None
    return AskPolicy(outbound=Outbound.LISTED if listed else Outbound.ANY, peers=frozenset(r.peers),
                     operators=frozenset(r.operators), max_price_input=r.max_price_input,
                     max_price_output=r.max_price_output)
