"""A cortex's orchestrator and gateway over a given fleet, served on 127.0.0.1:0 (tests only)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio

from helexa.roles.cortex.catalogue import Catalogue
from helexa.roles.cortex.config import CortexConfig
from helexa.roles.cortex.fleet import Fleet
from helexa.roles.cortex.gateway import Gateway
from helexa.roles.cortex.orchestrator import Orchestrator


ADMIN_TOKEN = "hlx-admin-test-token"
"""The admin token of every gateway built here."""


def cortex_config(**fields: Any) -> CortexConfig:
    """A :class:`CortexConfig` with the gateway on a free port and the usage store in
    memory; ``fields`` as in cortex.toml (tables as dicts: ``orchestrator={"idle_timeout": 0.2}``)."""
    return CortexConfig.model_validate({"gateway_socket": "127.0.0.1:0", "usage_store": ":memory:", **fields})


def build(fleet: Fleet, catalogue: Catalogue, *, gateway_args: dict[str, Any] | None = None,
          **fields: Any) -> Gateway:
    """A gateway (and its orchestrator); ``gateway_args`` go to :class:`Gateway` (``store``,
    ``clock``, ``inline_ledger``)."""
    config = cortex_config(**fields)
    return Gateway(config, Orchestrator(config, fleet, catalogue), admin_token=lambda: ADMIN_TOKEN,
                   **(gateway_args or {}))


def admin_headers() -> dict[str, str]:
    return {"authorization": f"Bearer {ADMIN_TOKEN}"}


@asynccontextmanager
async def serving(fleet: Fleet, catalogue: Catalogue, *, gateway_args: dict[str, Any] | None = None,
                  **fields: Any) -> AsyncIterator[tuple[Gateway, str]]:
    """Run the orchestrator and the gateway; yields the gateway and its base URL (the
    default portal's; ``gateway.addresses`` has every portal's)."""
    gateway = build(fleet, catalogue, gateway_args=gateway_args, **fields)
    async with trio.open_nursery() as nursery:
        await nursery.start(gateway.orchestrator.run)
        binds = await nursery.start(gateway.run)
        yield gateway, binds[0]
        nursery.cancel_scope.cancel()
