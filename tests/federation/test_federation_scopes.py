"""Tenants' cache scopes across the federated hop, over the in-memory mesh: each tenant of
an asking cortex gets a scope of its own on the serving side, put under the asking peer's
id there; with a peer of the release before (which speaks only ``/helexa/federation/1``
and refuses a request's ``cache_scope``) nothing changes. (Over real hosts:
``tests/mesh/test_mesh_federation_scope.py``.)"""

from dataclasses import replace

from helexa.mesh import MemoryNetwork
from helexa.protocol import GenerateResult, encode
from helexa.protocol.federation import COUNTED_FEDERATION_PROTOCOL, FEDERATION_PROTOCOL
from helexa.roles.cortex.cache_scope import peer_scope, scope_of, wire_scope

from conftest import FakeFleet
from test_federation_service import cortex, request, settle


def arrived(fed):
    """Every request the serving cortex ``fed`` decoded from its peers' streams, as it
    came (before it puts the scope under the asking peer's id)."""
    got = []
    admit = fed.inbound._admit_and_serve

    async def recording(stream, reader, exchange, hello, request):
        got.append((stream.protocol, request))
        return await admit(stream, reader, exchange, hello, request)

    fed.inbound._admit_and_serve = recording
    return got


async def ask(fed, rid, scope):
    async with fed.route(replace(request(rid), cache_scope=scope)) as frames:
        return [f async for f in frames][-1]


TENANT_1, TENANT_2 = "1" * 32, "2" * 32


async def test_each_tenant_of_an_asking_cortex_has_a_cache_scope_of_its_own_on_the_serving_side(
        nursery, autojump_clock):
    """What reaches the serving cortex's fleet: one scope per tenant of the asking cortex
    (the same each time), under the asking peer's id, never one of the serving cortex's
    own tenants' (nor the asking side's scopes themselves: they do not cross)."""
    net = MemoryNetwork()
    b_fleet = FakeFleet()
    a = await cortex(nursery, net, "A", offer=())
    b = await cortex(nursery, net, "B", fleet=b_fleet)
    wire = arrived(b)
    await settle()
    for rid, scope in (("r1", TENANT_1), ("r2", TENANT_2), ("r3", TENANT_1)):
        assert isinstance(await ask(a, rid, scope), GenerateResult)
    s1, s2, s3 = (r.cache_scope for r in b_fleet.requests)
    assert s1 == s3 != s2
    assert not {s1, s2} & {"", TENANT_1, TENANT_2, peer_scope(a.mesh.peer_id, ""), scope_of("B"), scope_of("A")}
    assert s1 == peer_scope(a.mesh.peer_id, wire_scope(b.mesh.peer_id, TENANT_1))
    assert [(p, r.cache_scope) for p, r in wire] == [(COUNTED_FEDERATION_PROTOCOL, wire_scope(b.mesh.peer_id, t))
                                                     for t in (TENANT_1, TENANT_2, TENANT_1)]


async def test_a_tenants_scope_is_another_for_each_peer_asked(nursery, autojump_clock):
    """Two serving operators cannot match one tenant's requests between them."""
    net = MemoryNetwork()
    fleets = FakeFleet(), FakeFleet()
    a = await cortex(nursery, net, "A", offer=())
    b, c = [await cortex(nursery, net, op, fleet=f) for op, f in zip("BC", fleets)]
    wires = arrived(b), arrived(c)
    await settle()
    assert isinstance(await ask(a, "r1", TENANT_1), GenerateResult)
    first = b if fleets[0].requests else c
    async with a.route(replace(request("r2"), cache_scope=TENANT_1), exclude=frozenset({first.mesh.peer_id})) as frames:
        assert isinstance([f async for f in frames][-1], GenerateResult)
    (_, r1), (_, r2) = wires[0][0], wires[1][0]
    assert r1.cache_scope and r2.cache_scope and r1.cache_scope != r2.cache_scope


async def test_an_asking_cortex_sends_no_scope_to_a_peer_of_an_older_release(nursery, autojump_clock):
    """A peer that serves only the unscoped protocol (it would refuse the field and drop
    the stream) is asked without scopes and serves as before: one scope for the peer."""
    net = MemoryNetwork()
    b_fleet = FakeFleet()
    a = await cortex(nursery, net, "A", offer=())
    b = await cortex(nursery, net, "B", fleet=b_fleet, protocols=(FEDERATION_PROTOCOL,))
    wire = arrived(b)
    await settle()
    for rid, scope in (("r1", TENANT_1), ("r2", TENANT_2)):
        route = a.route(replace(request(rid), cache_scope=scope))
        async with route as frames:
            assert isinstance([f async for f in frames][-1], GenerateResult)
    assert [(p, r.cache_scope) for p, r in wire] == [(FEDERATION_PROTOCOL, "")] * 2
    assert b"cache_scope" not in encode(a.streams.for_peer(replace(request(), cache_scope=TENANT_1), route._stream))
    assert [r.cache_scope for r in b_fleet.requests] == [peer_scope(a.mesh.peer_id, "")] * 2


async def test_an_asking_cortex_of_an_older_release_is_served_as_before(nursery, autojump_clock):
    net = MemoryNetwork()
    b_fleet = FakeFleet()
    a = await cortex(nursery, net, "A", offer=(), protocols=(FEDERATION_PROTOCOL,))
    b = await cortex(nursery, net, "B", fleet=b_fleet)
    wire = arrived(b)
    await settle()
    for rid, scope in (("r1", TENANT_1), ("r2", TENANT_2)):
        assert isinstance(await ask(a, rid, scope), GenerateResult)
    assert [(p, r.cache_scope) for p, r in wire] == [(FEDERATION_PROTOCOL, "")] * 2
    assert [r.cache_scope for r in b_fleet.requests] == [peer_scope(a.mesh.peer_id, "")] * 2
