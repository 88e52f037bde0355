"""The admin API's neuron identity routes (``helexa neurons``): which identity key each
node id is bound to (:mod:`..neuron_keys`), enrolling a key before its neuron joins, and
forgetting a binding. Served with the rest of :mod:`.admin`, behind the admin token.

Routes::

    GET   /admin/neurons/keys                  every binding: node_id, fingerprint,
                                               public_key (hex), bound_at, connected
    POST  /admin/neurons/keys/NODE_ID/enrol    bind NODE_ID to the key of the JSON body
                                               {"public_key": "<64 hex>"} (what
                                               ``helexa neuron-key`` prints) before it
                                               joins: 200 with the binding ("enrolled":
                                               true, or false when it was bound to that
                                               key already); 400 naming ``public_key``
                                               when it is not one; 409 when NODE_ID is
                                               bound to another key (forget it first)
    POST  /admin/neurons/keys/NODE_ID/forget   drop NODE_ID's binding (a new machine under
                                               an old node id): 200 with the binding
                                               dropped, 404 when there is none. The neuron
                                               joined under it stays connected; the next
                                               join of NODE_ID binds its key again (under
                                               strict enrolment: is refused until enrolled).

A node id holding ``/`` or other reserved characters is percent-encoded in the path.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from helexa.identity import fingerprint
from helexa.protocol.join_identity import PUBLIC_KEY_BYTES, node_id_problem
from helexa.protocol.takeover import forget_command

from ..asgi import Exchange, Route
from ..errors import BadRequest, Conflict, NoCapacity, NotFound
from ..fleet import Fleet
from ..neuron_keys import NeuronKeys

log = logging.getLogger(__name__)

ACTIONS = ("enrol", "forget")


def key_path_methods(rest: str) -> tuple[str, ...]:
    """The methods of ``/admin/neurons/keys/<rest>``: ``NODE_ID/enrol`` and ``NODE_ID/forget``
    take POST; else none (404)."""
    node_id, _, action = rest.rpartition("/")
    return ("POST",) if node_id and action in ACTIONS else ()


def parse_public_key(value: object) -> bytes:
    """The 32 raw bytes of a public key given as 64 hex digits (spaces around them allowed).
    Raises :class:`BadRequest` naming ``public_key``."""
    if not isinstance(value, str):
        raise BadRequest("public_key: give the neuron's identity key as 64 hex digits (`helexa neuron-key` prints "
                         "it)", param="public_key")
    text = value.strip()
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) != PUBLIC_KEY_BYTES:
        raise BadRequest(f"public_key: {text[:80]!r} is not an Ed25519 public key of {PUBLIC_KEY_BYTES * 2} hex "
                         "digits (`helexa neuron-key` prints it)", param="public_key")
    return key


class NeuronsAdmin:
    """The identity routes (see the module docstring) over ``keys``; ``fleet`` says which
    node ids are connected."""

    def __init__(self, keys: NeuronKeys, fleet: Fleet) -> None:
        self.keys = keys
        self.fleet = fleet

    def routes(self, guard: Callable[[Callable[[Exchange], Awaitable[None]]], Any]) -> list[Route]:
        return [
            Route("GET", "/admin/neurons/keys", guard(self.list_keys), keyed=False),
            Route("POST", "/admin/neurons/keys/", guard(self.action), keyed=False, prefix=True,
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

    async def action(self, ex: Exchange) -> None:
        node_id, _, action = ex.path_rest.rpartition("/")
        if action == "enrol":
            await self.enrol(ex, node_id)
        else:
            await self.forget(ex, node_id)

    async def enrol(self, ex: Exchange, node_id: str) -> None:
        if (problem := node_id_problem(node_id)) is not None:
            raise BadRequest(f"node_id: {problem}", param="node_id")
        try:
            body = json.loads(await ex.body() or b"{}")
        except (ValueError, UnicodeDecodeError):
            raise BadRequest("the body is not JSON: send {\"public_key\": \"<64 hex digits>\"}", param="body") from None
        if not isinstance(body, dict):
            raise BadRequest("the body must be a JSON object: {\"public_key\": \"<64 hex digits>\"}", param="body")
        key = parse_public_key(body.get("public_key"))
        current = self.keys.bound(node_id)
        if current is not None and current != key:
            raise Conflict(f"node id {node_id!r} is bound to another identity key ({fingerprint(current)}); if this "
                           f"is a new machine, run `{forget_command(node_id)}` first", param="node_id",
                           code="bound_to_another_key")
        try:
            enrolled = await self.keys.bind(node_id, key)
        except OSError as exc:
            log.error("admin: cannot record enrolling node id %s: %s", node_id, exc)
            raise NoCapacity(f"the cortex could not write its bindings file: {exc.strerror or exc}",
                             code="store_unavailable") from None
        binding = self.keys.get(node_id)
        assert binding is not None
        if enrolled:
            log.info("admin: enrolled node id %s with identity key %s", node_id, binding.fingerprint)
        await ex.out.json({**binding.as_dict(), "enrolled": enrolled})

    async def forget(self, ex: Exchange, node_id: str) -> None:
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
