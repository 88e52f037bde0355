"""Tenants' cache scopes across the federated hop, between real libp2p hosts on
127.0.0.1 (over the direct channel and over libp2p's own streams), with cortexes of this
release and of the release before scoped federation (which speaks only
``/helexa/federation/1`` and refuses a request's ``cache_scope``)."""

from contextlib import asynccontextmanager

import pytest
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from helexa.identity import Identity
from helexa.mesh import MeshSettings
from helexa.mesh.direct_channel import DirectStream
from helexa.mesh.libp2p_mesh import Libp2pMesh
from helexa.protocol import GenerateRequest, GenerateResult, Task, TokenChunk, Usage
from helexa.protocol.federation import COUNTED_FEDERATION_PROTOCOL, FEDERATION_PROTOCOL, OfferedModel
from helexa.roles.cortex.cache_scope import peer_scope, scope_of, wire_scope
from helexa.roles.cortex.federation.ledger import Ledger
from helexa.roles.cortex.federation.service import Federation, FederationSettings

pytestmark = pytest.mark.slow

CHANNELS = {"direct": MeshSettings(), "libp2p": MeshSettings(direct=False)}
OLD = (FEDERATION_PROTOCOL,)
TENANT_1, TENANT_2 = scope_of("acme", "key-1"), scope_of("acme", "key-2")


class Fleet:
    """The serving cortex's local generation: records each request as it reaches it."""

    def __init__(self):
        self.requests = []

    @asynccontextmanager
    async def serve(self, request):
        self.requests.append(request)

        async def frames():
            yield TokenChunk(request.request_id, "tok ")
            yield GenerateResult(request.request_id, "stop", Usage(5, 1))

        yield frames()


def arrived(fed):
    """What the serving cortex decoded from the asker's stream: (protocol, request)."""
    got = []
    admit = fed.inbound._admit_and_serve

    async def recording(stream, reader, exchange, hello, request):
        got.append((stream.protocol, request))
        return await admit(stream, reader, exchange, hello, request)

    fed.inbound._admit_and_serve = recording
    return got


async def federated(nursery, tmp_path, fleet, settings, *, asker=None, server=None):
    """A's federation asking B's over real hosts (``asker``/``server``: the request-stream
    protocols each speaks, default this release's); waits until A can route."""
    ids = [Identity(Ed25519PrivateKey.generate()) for _ in range(2)]
    a, b = Libp2pMesh(ids[0].seed, settings), Libp2pMesh(ids[1].seed, settings)
    fa = Federation(mesh=a, identity=ids[0], operator="A", ledger=Ledger(tmp_path / "a.sqlite"),
                    offer_fn=lambda: [], settings=FederationSettings(announce_interval=0.2))
    fb = Federation(mesh=b, identity=ids[1], operator="B", ledger=Ledger(tmp_path / "b.sqlite"),
                    offer_fn=lambda: [OfferedModel("tiny", True, price_input=1.0, price_output=2.0)],
                    serve_generate=fleet.serve, settings=FederationSettings(announce_interval=0.2))
    for fed, protocols in ((fa, asker), (fb, server)):
        if protocols is not None:
            fed.protocols = protocols
    addrs = await nursery.start(b.run)
    await nursery.start(a.run)
    await nursery.start(fb.run)
    await nursery.start(fa.run)
    await a.connect(addrs[0], timeout=10)
    with trio.fail_after(20):
        while not fa.can_route("tiny"):
            await trio.sleep(0.05)
    return fa, fb


async def ask(fed, rid, scope):
    request = GenerateRequest(rid, "tiny", Task.CHAT, messages=({"role": "user", "content": "hi"},),
                              cache_scope=scope)
    async with fed.route(request) as frames:
        return [f async for f in frames][-1]


@pytest.mark.parametrize("channel", CHANNELS)
async def test_each_tenant_has_a_scope_of_its_own_on_the_serving_peer(nursery, tmp_path, channel):
    fleet = Fleet()
    fa, fb = await federated(nursery, tmp_path, fleet, CHANNELS[channel])
    wire = arrived(fb)
    for rid, scope in (("r1", TENANT_1), ("r2", TENANT_2), ("r3", TENANT_1), ("r4", TENANT_2)):
        assert isinstance(await ask(fa, rid, scope), GenerateResult)
    s1, s2, s3, s4 = (r.cache_scope for r in fleet.requests)
    assert s1 == s3 != s2 == s4  # two tenants apart, each the same every time
    # Under the asking peer's id: none of the serving side's tenants' scopes, nor the
    # one scope all of A's tenants shared before; A's own scopes never crossed.
    assert not {s1, s2} & {"", TENANT_1, TENANT_2, scope_of("B"), peer_scope(fa.mesh.peer_id, "")}
    assert s1 == peer_scope(fa.mesh.peer_id, wire_scope(fb.mesh.peer_id, TENANT_1))
    assert {p for p, _ in wire} == {COUNTED_FEDERATION_PROTOCOL}
    assert {r.cache_scope for _, r in wire} == {wire_scope(fb.mesh.peer_id, t) for t in (TENANT_1, TENANT_2)}
    assert isinstance(fa.streams.idle[fb.mesh.peer_id][0][0], DirectStream) == (channel == "direct")


@pytest.mark.parametrize("channel", CHANNELS)
async def test_a_peer_of_the_older_release_is_asked_without_scopes(nursery, tmp_path, channel):
    """It serves only ``/helexa/federation/1``: the stream is negotiated down to it (over
    the direct channel, a connection for each newer protocol, once), and the requests carry
    no scope."""
    fleet = Fleet()
    fa, fb = await federated(nursery, tmp_path, fleet, CHANNELS[channel], server=OLD)
    wire = arrived(fb)
    for rid, scope in (("r1", TENANT_1), ("r2", TENANT_2), ("r3", TENANT_1)):
        assert isinstance(await ask(fa, rid, scope), GenerateResult)
    assert [(p, r.cache_scope) for p, r in wire] == [(FEDERATION_PROTOCOL, "")] * 3
    assert [r.cache_scope for r in fleet.requests] == [peer_scope(fa.mesh.peer_id, "")] * 3
    if channel == "direct":
        assert fa.mesh.direct.stats.fallbacks == 0 and fb.mesh.direct.stats.refused == 2  # the /3 and /2 connections
    # A stream opened later goes straight to the protocol the peer chose.
    await fa.streams.idle[fb.mesh.peer_id].pop()[0].aclose()
    assert isinstance(await ask(fa, "r4", TENANT_2), GenerateResult)
    assert wire[-1][0] == FEDERATION_PROTOCOL
    if channel == "direct":
        assert fb.mesh.direct.stats.refused == 2


@pytest.mark.parametrize("channel", CHANNELS)
async def test_an_asking_cortex_of_the_older_release_is_served_as_before(nursery, tmp_path, channel):
    fleet = Fleet()
    fa, fb = await federated(nursery, tmp_path, fleet, CHANNELS[channel], asker=OLD)
    wire = arrived(fb)
    for rid, scope in (("r1", TENANT_1), ("r2", TENANT_2)):
        assert isinstance(await ask(fa, rid, scope), GenerateResult)
    assert [(p, r.cache_scope) for p, r in wire] == [(FEDERATION_PROTOCOL, "")] * 2
    assert [r.cache_scope for r in fleet.requests] == [peer_scope(fa.mesh.peer_id, "")] * 2
