"""A portal's configuration (``[portals.NAME]`` in ``cortex.toml``; see ``docs/portals.md``).

A :class:`PortalConfig` is one of the gateway's front doors: its sockets, auth, models,
prices (:class:`PriceConfig`), quotas (:class:`QuotaConfig`), routing preferences
(:class:`RoutingConfig`) and look (:class:`ThemeConfig`). The cortex's configuration
(:class:`~helexa.roles.cortex.config.CortexConfig`) holds them by portal id, the
:data:`DEFAULT_PORTAL` always among them.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from helexa.config import SocketAddr, split_socket

MAX_AMOUNT = 1e15
"""The largest price (per million tokens) or budget a portal may set: the admin API's bound
on a key's budget, what the ledger and the reports can hold and show."""


class QuotaConfig(BaseModel):
    """Limits of one API key or of a whole portal; an unset limit does not apply.

    ``rpm`` and ``tpm`` are token buckets (a minute's worth may be spent at once, refilled
    evenly); ``max_concurrent`` counts requests in flight; ``budget`` is a hard stop per
    ``period`` (a UTC ``day``, a UTC calendar ``month``, or ``total``), in the portal's
    ``currency`` (``budget_unit = "money"``) or in tokens (``"tokens"``).
    """

    model_config = ConfigDict(extra="forbid")

    rpm: int | None = Field(None, ge=1)
    tpm: int | None = Field(None, ge=1)
    max_concurrent: int | None = Field(None, ge=1)
    budget: float | None = Field(None, ge=0, le=MAX_AMOUNT, allow_inf_nan=False)
    budget_unit: Literal["money", "tokens"] = "money"
    period: Literal["day", "month", "total"] = "month"


class PriceConfig(BaseModel):
    """A model's price on a portal, per million tokens, in the portal's ``currency``."""

    model_config = ConfigDict(extra="forbid")

    # Finite and bounded as the admin API bounds a budget: an infinite price made every
    # request's cost inf (a ledger row that reports show as null, and CLI tables failed on).
    input: float = Field(0.0, ge=0, le=MAX_AMOUNT, allow_inf_nan=False)
    output: float = Field(0.0, ge=0, le=MAX_AMOUNT, allow_inf_nan=False)


class RoutingConfig(BaseModel):
    """Where a portal's requests may run (``[portals.NAME.routing]``).

    ``mode = "local"`` keeps them on this operator's fleet; ``"mesh"`` lets the ones the
    fleet cannot serve go to peers, under ``[federation]``'s outbound policy narrowed by
    ``peers`` / ``operators`` (non-empty: only those) and the price ceilings (per million
    tokens, in what peers announce).
    """

    model_config = ConfigDict(extra="forbid")

    mode: Literal["local", "mesh"] = "mesh"
    peers: list[str] = Field(default_factory=list)
    operators: list[str] = Field(default_factory=list)
    max_price_input: float | None = Field(None, ge=0)
    max_price_output: float | None = Field(None, ge=0)


class ThemeConfig(BaseModel):
    """How the portal looks (for its web pages): ``logo`` is a URL or a file path."""

    model_config = ConfigDict(extra="forbid")

    logo: str | None = None
    colors: dict[str, str] = Field(default_factory=dict)
    """Named colours, e.g. ``{ primary = "#0b5fff", background = "#ffffff" }``."""


class PortalConfig(BaseModel):
    """One front door of the gateway (``[portals.NAME]``; see ``docs/portals.md``)."""

    model_config = ConfigDict(extra="forbid")

    name: str = ""
    """Display name (default: the portal's id)."""
    listen: list[SocketAddr] = Field(default_factory=list)
    """``HOST:PORT`` sockets (the ``default`` portal always listens on ``gateway_socket``
    too, first)."""
    tls_cert_file: Path | None = None
    """Serve HTTPS on this portal's sockets with this certificate (PEM)."""
    tls_key_file: Path | None = None
    auth: Literal["keys", "none"] | None = None
    """``keys``: every request needs one of this portal's API keys. ``none``: open. Unset
    is open, and allowed only on loopback sockets."""
    surfaces: list[Literal["openai", "anthropic", "responses", "ollama"]] = Field(
        default_factory=lambda: ["openai", "anthropic", "responses", "ollama"])
    """API surfaces served: ``openai`` (Chat Completions, completions, embeddings, models),
    ``anthropic`` (Anthropic's ``/v1/messages``), ``responses`` (OpenAI's ``/v1/responses``),
    ``ollama`` (Ollama's ``/api/*``)."""
    responses_retention: float = Field(30 * 86400.0, gt=0)
    """Seconds a stored ``/v1/responses`` answer (``store: true``) is kept for ``GET`` and
    ``previous_response_id``; older ones are deleted."""
    models: list[str] | None = None
    """Catalogue models served under their own names (unset: every model, unless
    ``aliases`` are given, then only those)."""
    aliases: dict[str, str] = Field(default_factory=dict)
    """Public name -> catalogue model (``fast = "smollm2-135m-instruct"``)."""
    currency: str = "USD"
    prices: dict[str, PriceConfig] = Field(default_factory=dict)
    """Per public model name (an alias or a model id); unlisted models are free."""
    quotas: QuotaConfig = Field(default_factory=QuotaConfig)
    """Defaults for keys created on this portal."""
    limits: QuotaConfig = Field(default_factory=QuotaConfig)
    """Limits of the portal as a whole (all its keys together)."""
    routing: RoutingConfig = Field(default_factory=RoutingConfig)
    priority: Literal["interactive", "normal", "bulk"] = "normal"
    """The orchestrator's priority class for this portal's requests."""
    weight: float = Field(1.0, gt=0)
    """Share of this portal's keys in fair queueing."""
    record_usage: bool | None = None
    """Write a ledger row per request (default: on for ``auth = "keys"``, off when open)."""
    prompt_cache: Literal["per_key", "portal"] = "per_key"
    """Whose cached prompt prefixes a request may reuse (on a neuron, and in the cortex's
    routing by prefix): its own key's (``per_key``), or any of this portal's keys'
    (``portal``: one organisation's keys). An open portal's requests share one cache;
    portals never share (see ``docs/portals.md``)."""
    default_max_tokens: int = Field(4096, ge=1)
    """The completion tokens reserved for a request that sets no ``max_tokens`` and whose
    model has no ``max_output`` (and passed to the neuron as its limit, so the reservation
    holds)."""
    owned_by: str | None = None
    """``owned_by`` of this portal's models in ``/v1/models`` (default: the portal id)."""
    theme: ThemeConfig = Field(default_factory=ThemeConfig)

    @model_validator(mode="after")
    def _consistent(self) -> "PortalConfig":
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file must be given together")
        if self.models is not None:
            clash = sorted(set(self.models) & set(self.aliases))
            if clash:
                raise ValueError(f"{clash[0]!r} is both a model and an alias")
        if self.models is not None or self.aliases:
            # A price under a name the portal does not serve (a typo of an alias) applies to
            # nothing, and leaves the model it meant free. (A portal serving every model may
            # price a peer's, which no list here names.)
            served = set(self.aliases) | set(self.models or ())
            stray = sorted(set(self.prices) - served)
            if stray:
                raise ValueError(f"prices.{stray[0]}: this portal serves no model of that name "
                                 f"(it serves {', '.join(sorted(served)) or 'none'}): the price would apply to nothing")
        return self

    @property
    def keyed(self) -> bool:
        return self.auth == "keys"

    @property
    def records_usage(self) -> bool:
        return self.keyed if self.record_usage is None else self.record_usage


DEFAULT_PORTAL = "default"


def is_loopback(socket_addr: str) -> bool:
    """Whether ``HOST:PORT`` binds only the loopback interface."""
    host, _ = split_socket(socket_addr)
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: whatever it resolves to is not known to be loopback
