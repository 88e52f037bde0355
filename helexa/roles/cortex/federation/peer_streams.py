"""The request streams a cortex keeps to its peers (:class:`PeerStreams`, owned by
:class:`~.service.Federation`): a stream whose exchange ended clean is kept idle for the
next request to that peer (a new libp2p stream per request cost most of a federated hop);
a new one is opened in the newest protocol both sides speak, and a peer that chose an
older one is offered only that one for a while; a request crosses with what its stream's
protocol carries (its tenant's scope as a scope of the peer's own, or nothing)."""

from __future__ import annotations

import math
from dataclasses import replace

import trio

from helexa.mesh import DialFailed, Mesh, MessageStream
from helexa.protocol import EmbedRequest, GenerateRequest
from helexa.protocol.compat import for_earlier
from helexa.protocol.federation import (
    COUNTED_FEDERATION_PROTOCOL,
    FEDERATION_PROTOCOL,
    FEDERATION_VERSIONS,
    SCOPED_FEDERATION_PROTOCOL,
)

from ..cache_scope import wire_scope
from .errors import PeerUnreachable
from .settings import FederationSettings

SCOPED_VERSION = FEDERATION_VERSIONS[SCOPED_FEDERATION_PROTOCOL]

_WIRE_SCOPES = 4096
"""Scopes sent to peers kept (per peer and local scope), not hashed again per request."""

OLDER_RECHECK = 600.0
"""How long a peer that chose an older protocol is offered only that one and those before
it (asking it again costs a connection over the direct channel), before it is asked again:
it may have been upgraded."""


class PeerStreams:
    """See the module docstring. ``settings``: the pool's size and age
    (``idle_streams``, ``stream_max_idle``) and the open deadline (``ask.open``)."""

    def __init__(self, mesh: Mesh, settings: FederationSettings) -> None:
        self.mesh = mesh
        self.settings = settings
        self.protocols: tuple[str, ...] = (COUNTED_FEDERATION_PROTOCOL, SCOPED_FEDERATION_PROTOCOL,
                                           FEDERATION_PROTOCOL)
        """The request-stream protocols this cortex serves and asks with, newest first.
        A request goes out with its tenant's scope on a scoped stream only; over the
        last, all a peer of an older release speaks, it goes without. What each side sends
        leaves out what the stream's protocol does not carry (:data:`FEDERATION_VERSIONS`)."""
        self.idle: dict[str, list[tuple[MessageStream, float]]] = {}
        """Idle streams by peer, each with when it went idle (newest last)."""
        self.older_until: dict[str, tuple[str, float]] = {}
        """Peers that chose an older protocol: that protocol, and until when it is offered
        first (:data:`OLDER_RECHECK`)."""
        self._wire_scopes: dict[tuple[str, str], str] = {}

    async def take(self, peer_id: str) -> MessageStream | None:
        """An idle stream to ``peer_id`` young enough to reuse (the newest), if any."""
        pool = self.idle.get(peer_id)
        now = trio.current_time()
        while pool:
            stream, since = pool.pop()
            if now - since < self.settings.stream_max_idle:
                return stream
            await stream.aclose()
        return None

    async def release(self, peer_id: str, stream: MessageStream, *, clean: bool) -> None:
        """Keep ``stream`` for the next request to ``peer_id`` if its exchange ended clean
        and the pool has room; close it otherwise."""
        pool = self.idle.setdefault(peer_id, [])
        if clean and len(pool) < self.settings.idle_streams:
            pool.append((stream, trio.current_time()))
        else:
            await stream.aclose()

    async def new_stream(self, peer_id: str) -> MessageStream:
        """A new request stream to ``peer_id``, in the newest protocol both speak."""
        protocols = self.protocols
        chose, until = self.older_until.get(peer_id, ("", -math.inf))
        if until > trio.current_time() and chose in protocols:
            protocols = protocols[protocols.index(chose):]
        try:
            stream = await self.mesh.open_stream(peer_id, protocols, timeout=self.settings.ask.open)
        except DialFailed as exc:
            raise PeerUnreachable(str(exc), peer_id=peer_id) from None
        if stream.protocol == self.protocols[0]:
            self.older_until.pop(peer_id, None)
        elif protocols is self.protocols:
            self.older_until[peer_id] = (stream.protocol, trio.current_time() + OLDER_RECHECK)
        return stream

    def for_peer(self, request: GenerateRequest | EmbedRequest,
                  stream: MessageStream) -> GenerateRequest | EmbedRequest:
        """``request`` as it crosses to the peer: its tenant's scope as :func:`wire_scope`
        makes it for that peer, on a stream that carries one; none otherwise (a peer of an
        older release refuses the field, and keeps one scope for all our tenants). Over
        the older protocol, the fields its releases may not know are left out
        (:func:`~helexa.protocol.compat.for_earlier`: an embedding's ``truncate`` too)."""
        if FEDERATION_VERSIONS.get(stream.protocol, 1) < SCOPED_VERSION:
            return for_earlier(request)
        if not isinstance(request, GenerateRequest) or not request.cache_scope:
            return request
        key = (stream.remote_peer, request.cache_scope)
        scope = self._wire_scopes.get(key, "")
        if not scope:
            if len(self._wire_scopes) >= _WIRE_SCOPES:
                self._wire_scopes.clear()
            scope = self._wire_scopes[key] = wire_scope(*key)
        return replace(request, cache_scope=scope)
