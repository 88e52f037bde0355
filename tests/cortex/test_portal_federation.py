"""Federation per portal: a portal's routing preferences decide whether and where its
requests leave the operator; a federated request is billed to the asking key at the
asking portal's price, and its ledger row names the peer and carries the peer's signed
receipt.

Cortex A has no neurons; cortex B serves ``tiny`` from a neuron double through its own
orchestrator (the real peering glue on both sides), over the in-memory mesh.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from helexa.identity import Identity
from helexa.mesh import MemoryMesh, MemoryNetwork, peer_id_from_ed25519
from helexa.protocol import GenerateRequest, Task
from helexa.protocol.inference import OutputFormat, ResponseFormat, ToolSpec
from helexa.roles.cortex.catalogue import Catalogue, CatalogueEntry
from helexa.roles.cortex.config import CortexConfig
from helexa.roles.cortex.federation import PeerFailed
from helexa.roles.cortex.federation.ledger import CONSUMED, SERVED, Ledger
from helexa.roles.cortex.federation.service import Federation, FederationSettings
from helexa.roles.cortex.fleet import Fleet
from helexa.roles.cortex.orchestrator import Orchestrator
from helexa.roles.cortex.peering import FleetOffer, LocalServing, PeerRouter
from helexa.roles.cortex.portal.store import SqliteStore
from neuron_double import NeuronDouble
from portals import bearer, new_key, portals

PEER_CATALOGUE = Catalogue([CatalogueEntry(id="tiny", backend="synthetic", memory_mb=100, price_in=1.0,
                                           price_out=2.0)])
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "x"}]}


def keyed(**fields) -> dict:  # noqa: ANN003
    return {"listen": ["127.0.0.1:0"], "auth": "keys", "models": ["tiny"], "currency": "EUR",
            "prices": {"tiny": {"input": 500.0, "output": 500.0}}, **fields}


async def federation(nursery: trio.Nursery, net: MemoryNetwork, operator: str, orchestrator: Orchestrator,
                     catalogue: Catalogue) -> Federation:
    ident = Identity(Ed25519PrivateKey.generate())
    mesh = MemoryMesh(net, peer_id_from_ed25519(ident.public_bytes), timeout=5)
    await nursery.start(mesh.run)
    offer = FleetOffer(orchestrator.fleet, catalogue, orchestrator.provisioner)
    local = LocalServing(orchestrator)
    fed = Federation(mesh=mesh, identity=ident, operator=operator, ledger=Ledger(":memory:"), offer_fn=offer.offer,
                     spare_fn=offer.spare, serve_generate=local.generate, serve_embed=local.embed,
                     settings=FederationSettings(announce_interval=0.05))
    await nursery.start(fed.run)
    return fed


@asynccontextmanager
async def two_operators(tables: dict, store: SqliteStore) -> AsyncIterator[tuple[dict[str, str], Federation,
                                                                                  Federation, NeuronDouble]]:
    net = MemoryNetwork()
    async with trio.open_nursery() as nursery:
        b_fleet = Fleet()
        neuron = NeuronDouble("b1", b_fleet, loaded=("tiny",), tokens=3)
        config = CortexConfig()
        b_orch = Orchestrator(config, b_fleet, PEER_CATALOGUE)
        await nursery.start(b_orch.run)
        fed_b = await federation(nursery, net, "B", b_orch, PEER_CATALOGUE)
        async with portals(Fleet(), tables, store=store) as (gateway, urls):
            fed_a = await federation(nursery, net, "A", gateway.orchestrator, Catalogue())
            router = PeerRouter(fed_a)
            gateway.orchestrator.set_remote_router(router)
            gateway.metering.receipts = router.take_receipt
            with trio.fail_after(5):
                while not fed_a.can_route("tiny"):
                    await trio.sleep(0.01)
            yield urls, fed_a, fed_b, neuron
        nursery.cancel_scope.cancel()


async def test_a_federated_request_is_billed_at_the_asking_portals_price_with_the_receipt_linked() -> None:
    store = SqliteStore(":memory:")
    key = new_key(store, "acme")
    async with two_operators({"acme": keyed()}, store) as (urls, fed_a, fed_b, neuron):
        async with httpx.AsyncClient(base_url=urls["acme"], headers=bearer(key)) as http:
            r = await http.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "t0 t1 t2 "
    assert len(neuron.finished) == 1
    (row,) = store.records()
    receipt = fed_a.ledger.get(CONSUMED, row.request_id).receipt
    assert (row.node_id, row.peer_id) == ("federation", fed_b.mesh.peer_id)
    assert row.receipt_signature == receipt.signature.hex() and receipt.signature
    assert (row.prompt_tokens, row.completion_tokens) == (receipt.prompt_tokens, receipt.completion_tokens) == (5, 3)
    assert row.cost == pytest.approx(8 * 500 / 1e6) and row.currency == "EUR"  # our price, not the peer's
    assert receipt.cost == pytest.approx((5 * 1.0 + 3 * 2.0) / 1e6)


async def test_a_federated_stream_the_client_cuts_bills_the_prompt_count_the_peer_s_neuron_sent() -> None:
    # The neuron's usage never comes for a cut stream: the asking portal billed a quarter of
    # the prompt's bytes (2), and the peer's receipt 0 (it cannot tokenize a synthetic model).
    store = SqliteStore(":memory:")
    key = new_key(store, "acme")
    async with two_operators({"acme": keyed()}, store) as (urls, fed_a, fed_b, neuron):
        neuron.tokens, neuron.token_delay, neuron.prompt_count = 1000, 0.05, 42
        async with httpx.AsyncClient(base_url=urls["acme"], headers=bearer(key)) as http:
            with trio.fail_after(10):
                async with http.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as r:
                    seen = 0
                    async for line in r.aiter_lines():
                        seen += line.startswith("data: {") and '"content"' in line
                        if seen == 3:
                            break  # the client leaves mid-stream
        with trio.fail_after(10):
            while not store.records() or fed_b.ledger.get(SERVED, store.records()[0].request_id) is None:
                await trio.sleep(0.01)
        (row,) = store.records()
        await trio.sleep(0.2)  # the asker's ledger: its receipt, collected after the cancel
        consumed, served = fed_a.ledger.get(CONSUMED, row.request_id), fed_b.ledger.get(SERVED, row.request_id)
    assert row.outcome == "client_gone" and row.completion_tokens >= 2
    assert row.prompt_tokens == 42 and row.cost == pytest.approx((42 + row.completion_tokens) * 500 / 1e6)
    assert served.receipt.prompt_tokens == 42 and served.receipt.outcome == "cancelled"
    assert consumed.receipt == served.receipt and not consumed.flagged


async def test_routing_preferences_keep_a_portals_requests_home_or_with_listed_peers() -> None:
    store = SqliteStore(":memory:")
    tables = {"home": keyed(routing={"mode": "local"}),
              "listed": keyed(routing={"peers": ["12D3KooWsomeoneElse"]}),
              "cheap": keyed(routing={"max_price_output": 1.0}),
              "trusting": keyed(routing={"operators": ["B"], "max_price_output": 2.0})}
    keys = {name: new_key(store, name) for name in tables}
    async with two_operators(tables, store) as (urls, _, _, neuron):
        async with httpx.AsyncClient() as http:
            answers = {name: await http.post(urls[name] + "/v1/chat/completions", json=CHAT,
                                             headers=bearer(keys[name])) for name in tables}
    codes = {name: (r.status_code, r.json().get("error", {}).get("code")) for name, r in answers.items()}
    assert codes == {"home": (404, "model_not_found"), "listed": (403, "outbound_refused"),
                     "cheap": (403, "outbound_refused"), "trusting": (200, None)}
    assert len(neuron.generations) == 1


async def test_a_peers_prompt_count_is_not_passed_on_to_the_neurons_here() -> None:
    # The neuron skips its context check for a count it is handed: a peer must not be able
    # to make it skip it for a prompt that does not fit.
    fleet = Fleet()
    neuron = NeuronDouble("b1", fleet, loaded=("tiny",), tokens=2)
    orchestrator = Orchestrator(CortexConfig(), fleet, PEER_CATALOGUE)
    async with trio.open_nursery() as nursery:
        await nursery.start(orchestrator.run)
        request = GenerateRequest("r1", "tiny", Task.CHAT, messages=({"role": "user", "content": "x"},),
                                  prompt_tokens=1)
        async with LocalServing(orchestrator).generate(request) as frames:
            async for _ in frames:
                pass
        nursery.cancel_scope.cancel()
    assert [r.prompt_tokens for r in neuron.requests] == [None]


@pytest.mark.parametrize("fields, param", [
    ({"response_format": ResponseFormat(OutputFormat.JSON_SCHEMA, {"type": "nonsense"})},
     "response_format.json_schema.schema"),
    ({"response_format": ResponseFormat(OutputFormat.JSON_SCHEMA, {"$ref": "#/$defs/missing"})},
     "response_format.json_schema.schema"),
    ({"response_format": ResponseFormat(OutputFormat.JSON_SCHEMA, {"enum": [f"v{i}" for i in range(3000)]})},
     "response_format.json_schema.schema"),
    ({"tools": (ToolSpec("f", None, {"type": "nonsense"}),)}, "tools[0].function.parameters"),
])
async def test_a_peers_request_gets_the_edges_checks_before_any_neuron_here(fields, param) -> None:
    # A peer's request skips this cortex's API surfaces: a schema its own clients are
    # refused went on to llama.cpp, which answered in its own words (or spent seconds
    # building the grammar of a 3,000-value enum).
    store = SqliteStore(":memory:")
    async with two_operators({}, store) as (_, fed_a, _, neuron):
        request = GenerateRequest("r1", "tiny", Task.CHAT, messages=({"role": "user", "content": "x"},), **fields)
        with pytest.raises(PeerFailed) as err:
            async with fed_a.route(request) as frames:
                async for _ in frames:
                    pass
    assert err.value.code == "invalid_request" and param in str(err.value)
    assert neuron.requests == []


async def test_two_keys_of_a_portal_keep_apart_cache_scopes_on_the_peers_neurons() -> None:
    """Through both cortexes' real glue: what the serving neuron gets is one scope per key
    of the asking portal (the same for each request of a key), under the asking peer's id,
    neither key's own scope nor the one all the asking cortex's requests shared before."""
    from helexa.roles.cortex.cache_scope import peer_scope, scope_of, wire_scope

    store = SqliteStore(":memory:")
    k1, k2 = new_key(store, "acme"), new_key(store, "acme")
    async with two_operators({"acme": keyed()}, store) as (urls, fed_a, fed_b, neuron):
        async with httpx.AsyncClient(base_url=urls["acme"]) as http:
            for key in (k1, k2, k1):
                r = await http.post("/v1/chat/completions", json=CHAT, headers=bearer(key))
                assert r.status_code == 200
    s1, s2, s3 = (r.cache_scope for r in neuron.requests)
    assert s1 == s3 != s2
    local = {scope_of("acme", key.key_id) for key in store.keys()}
    assert not {s1, s2} & (local | {"", scope_of("acme"), peer_scope(fed_a.mesh.peer_id, "")})
    assert {s1, s2} == {peer_scope(fed_a.mesh.peer_id, wire_scope(fed_b.mesh.peer_id, s)) for s in local}


async def test_a_federation_ledger_that_refuses_writes_neither_fails_nor_cuts_the_served_answer(caplog) -> None:
    """Both operators' federation ledgers refuse writes (a full disk, an operator's sqlite3
    session holding the lock): the answer goes out whole and is billed once, and each side
    logs the receipt it could not keep. Before, the asker's client got a 500 (a stream was
    cut without an error event) while its usage row was written as billed, and the serving
    side's stream handler failed with a traceback."""
    store = SqliteStore(":memory:")
    key = new_key(store, "acme")
    async with two_operators({"acme": keyed()}, store) as (urls, fed_a, fed_b, neuron):
        for fed in (fed_a, fed_b):
            fed.ledger._wdb.execute("PRAGMA query_only=1")  # SQLite's own refusal of every write
        async with httpx.AsyncClient(base_url=urls["acme"], headers=bearer(key)) as http:
            r = await http.post("/v1/chat/completions", json=CHAT)
            s = await http.post("/v1/chat/completions", json=CHAT | {"stream": True})
            await trio.sleep(0.2)  # the serving side's record, after its receipt went out
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "t0 t1 t2 "
    assert s.status_code == 200 and s.text.rstrip().endswith("data: [DONE]") and '"error"' not in s.text
    assert [(row.outcome, row.completion_tokens) for row in store.records()] == [("ok", 3), ("ok", 3)]
    assert caplog.text.count("consumed receipt of") == 2 and caplog.text.count("served receipt of") == 2
    assert "Traceback" not in caplog.text and "unexpected error" not in caplog.text
