"""Cache scopes: whose cached prompt prefixes a request may reuse.

A neuron's engine keeps the KV cache of what it computed and reuses the longest prefix a
new prompt shares with it, and the cortex's prefix index routes a prompt to where its
prefix is cached: shared between tenants, either would let one tenant tell from its time to
first token that another recently sent the same prefix (a system prompt, a document).
Hosted APIs never share a prompt cache between organisations, so neither does the fabric:
every request carries a scope (``GenerateRequest.cache_scope``); a backend never reuses a
prefix computed for another scope (``helexa/runtime/slot_table.py``), and the prefix index
keys what it remembers by it (:mod:`.prefix`).

The scope of a request is its API key's on a keyed portal (or the portal's, where the
portal's ``prompt_cache = "portal"`` shares the cache among its keys), the portal's on an
open one, never shared across portals; a peer's requests get scopes of their own. On the
wire it is opaque: a keyed hash (the key is this process's own, drawn at start), never the
key or its id. A cortex restart only costs the caches' next hits.

Across federation the asking cortex sends, for a peer that speaks the scoped protocol,
:func:`wire_scope` of its tenant's scope: another keyed hash, of that peer's own (two
serving peers cannot match one tenant's requests between them), which the serving cortex
puts under the asking peer's id (:func:`peer_scope`) before its neurons see it.
"""

from __future__ import annotations

import hashlib
import secrets

__all__ = ["peer_scope", "scope_of", "wire_scope"]

_SALT = secrets.token_bytes(32)


def scope_of(portal_id: str, key_id: str = "") -> str:
    """The scope of ``portal_id``'s requests made with ``key_id`` (empty: shared by the portal)."""
    return _hash(b"portal", portal_id, key_id)


def peer_scope(peer_id: str, scope: str) -> str:
    """The scope here of a request peer ``peer_id`` sent with ``scope`` (its own tenant's):
    apart from this cortex's tenants' and from every other peer's, whatever it sends."""
    return _hash(b"peer", peer_id, scope)


def wire_scope(peer_id: str, scope: str) -> str:
    """What this cortex sends peer ``peer_id`` as the scope of a request it asks with
    ``scope`` (its own tenant's): opaque to the peer, stable while this process runs, and
    another for each peer."""
    return _hash(b"wire", peer_id, scope)


def _hash(kind: bytes, *parts: str) -> str:
    h = hashlib.blake2b(kind, key=_SALT, digest_size=16)
    for part in parts:
        data = part.encode("utf-8", "surrogatepass")
        h.update(len(data).to_bytes(4, "big") + data)
    return h.hexdigest()
