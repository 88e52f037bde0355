"""Cache scopes: each request tells its neuron whose cached prefixes it may reuse, as an
opaque hash (never the key or its id), per key on a keyed portal, per portal where it
shares its cache or is open, never across portals; a peer's scopes are its own."""

from __future__ import annotations

import httpx
import trio

from helexa.protocol import GenerateRequest, Task
from helexa.protocol.codec import decode, encode
from helexa.roles.cortex.cache_scope import peer_scope, scope_of
from helexa.roles.cortex.fleet import Fleet
from helexa.roles.cortex.portal.keys import key_id_of
from helexa.roles.cortex.portal.store import SqliteStore
from neuron_double import NeuronDouble
from portals import acme, bearer, new_key, portals

ASK = {"model": "fast", "messages": [{"role": "user", "content": "hi"}]}


async def test_each_key_sends_its_own_opaque_scope_and_a_sharing_portal_one_for_all_its_keys() -> None:
    fleet = Fleet()
    neuron = NeuronDouble("n1", fleet, loaded=("chat",), tokens=1)
    store = SqliteStore(":memory:")
    a1, a2 = new_key(store, "acme"), new_key(store, "acme")
    t1, t2 = new_key(store, "team"), new_key(store, "team")
    async with portals(fleet, {"acme": acme(), "team": acme(prompt_cache="portal")}, store=store) as (_, urls):
        def run() -> None:
            for portal, key in (("acme", a1), ("acme", a2), ("acme", a1), ("team", t1), ("team", t2)):
                r = httpx.post(urls[portal] + "/v1/chat/completions", json=ASK, headers=bearer(key), timeout=10)
                assert r.status_code == 200, r.text
            r = httpx.post(urls["default"] + "/v1/chat/completions", json={**ASK, "model": "chat"}, timeout=10)
            assert r.status_code == 200, r.text

        await trio.to_thread.run_sync(run)
    s_a1, s_a2, s_a1_again, s_t1, s_t2, s_open = (r.cache_scope for r in neuron.requests)
    assert s_a1 == s_a1_again and len({s_a1, s_a2, s_t1, s_open}) == 4 and s_t1 == s_t2
    for key in (a1, a2, t1, t2):
        key_id = key_id_of(key)
        assert key_id and all(key_id not in s and key not in s for s in (s_a1, s_a2, s_t1))
    assert all(len(s) == 32 and int(s, 16) >= 0 for s in (s_a1, s_a2, s_t1, s_open))


def test_a_scope_travels_in_a_generate_request_and_an_older_peers_frame_has_none() -> None:
    request = GenerateRequest("r", "m", Task.CHAT, messages=({"role": "user", "content": "x"},), cache_scope="ab" * 16)
    assert decode(encode(request)).cache_scope == "ab" * 16
    plain = GenerateRequest("r", "m", Task.CHAT)
    assert b"cache_scope" not in encode(plain)  # left out while empty: older neurons decode it
    assert decode(encode(plain)).cache_scope == ""


def test_a_peers_scope_is_never_one_of_this_cortexs_tenants() -> None:
    mine = scope_of("acme", "0123456789abcdef")
    assert peer_scope("p1", mine) != mine and peer_scope("p1", "") != scope_of("acme")
    assert peer_scope("p1", "x") == peer_scope("p1", "x") != peer_scope("p2", "x")
    assert scope_of("acme", "") != scope_of("acme", "k") != scope_of("beta", "k")
    assert scope_of("a", "bc") != scope_of("ab", "c")  # the parts cannot run into each other
