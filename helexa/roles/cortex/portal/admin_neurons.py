"""The admin API's neuron identity routes (``helexa neurons``): which identity key each
node id is bound to (:mod:`..neuron_keys`), and forgetting a binding. Served with the rest
of :mod:`.admin`, behind the admin token.

Routes::

    GET   /admin/neurons/keys                  every binding: node_id, fingerprint,
                                               public_key (hex), bound_at, connected
    POST  /admin/neurons/keys/NODE_ID/forget   drop NODE_ID's binding (a new machine under
                                               an old node id): 200 with the binding
                                               dropped, 404 when there is none. The neuron
                                               joined under it stays connected; the next
                                               join of NODE_ID binds its key again.

A node id holding ``/`` or other reserved characters is percent-encoded in the path.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from ..asgi import Exchange, Route
from ..errors import NoCapacity, NotFound
from ..fleet import Fleet
from ..neuron_keys import NeuronKeys

log = logging.getLogger(__name__)


def key_path_methods(rest: str) -> tuple[str, ...]:
    """The methods of ``/admin/neurons/keys/<rest>``: ``NODE_ID/forget`` takes POST; else none (404)."""
    node_id, _, action = rest.rpartition("/")
    return ("POST",) if node_id and action == "forget" else ()


class NeuronsAdmin:
    """The identity routes (see the module docstring) over ``keys``; ``fleet`` says which
    node ids are connected."""

    def __init__(self, keys: NeuronKeys, fleet: Fleet) -> None:
        self.keys = keys
        self.fleet = fleet

    def routes(self, guard: Callable[[Callable[[Exchange], Awaitable[None]]], Any]) -> list[Route]:
        return [
            Route("GET", "/admin/neurons/keys", guard(self.list_keys), keyed=False),
            Route("POST", "/admin/neurons/keys/", guard(self.forget), keyed=False, prefix=True,
                  allow=key_path_methods),
        ]

    def view(self) -> list[dict[str, Any]]:
        out = []
        for binding in self.keys.list():
            link = self.fleet.get(binding.node_id)
            out.append({**binding.as_dict(), "connected": bool(link is not None and getattr(link, "connected", False))})
        return out

    async def list_keys(self, ex: Exchange) -> None:
        await ex.out.json({"object": "list", "data": self.view()})

    async def forget(self, ex: Exchange) -> None:
        node_id = ex.path_rest.rpartition("/")[0]
        try:
            binding = await self.keys.forget(node_id)
        except OSError as exc:
            log.error("admin: cannot record forgetting node id %s: %s", node_id, exc)
            raise NoCapacity(f"the cortex could not write its bindings file: {exc.strerror or exc}",
                             code="store_unavailable") from None
        if binding is None:
            raise NotFound(f"node id {node_id!r} is bound to no identity key", param="node_id",
                           code="binding_not_found")
        log.info("admin: forgot the binding of node id %s to identity key %s; its next join binds again",
                 node_id, binding.fingerprint)
        await ex.out.json({**binding.as_dict(), "forgotten": True})
