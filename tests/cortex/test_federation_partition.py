"""A model only a mesh peer serves, while that peer cannot be reached: once its offer
expired the model is temporarily unavailable (503 with Retry-After, in each surface's own
error shape, which the clients retry), and only after ``unavailable_grace`` unknown (404).

Two real libp2p hosts on 127.0.0.1; cortex A's gateway has no neuron, cortex B's federation
offers ``tiny``; the partition is B's host closing."""

from __future__ import annotations

import time
from contextlib import asynccontextmanager
from pathlib import Path

import anthropic
import httpx
import ollama
import openai
import pytest
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from helexa.identity import Identity
from helexa.mesh import MeshSettings
from helexa.mesh.libp2p_mesh import Libp2pMesh
from helexa.protocol import GenerateResult, TokenChunk, Usage
from helexa.protocol.federation import OfferedModel
from helexa.roles.cortex.federation.ledger import Ledger
from helexa.roles.cortex.federation.policy import AskPolicy, Outbound
from helexa.roles.cortex.federation.service import Federation, FederationSettings
from helexa.roles.cortex.fleet import Fleet
from helexa.roles.cortex.peering import PeerRouter
from portals import CATALOGUE
from serving import serving

pytestmark = pytest.mark.slow

TTL = 1.0  # B's offer is forgotten this long after its last announcement
GRACE = 4.0  # then A says "temporarily unavailable" this long, then "not found"
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}


@asynccontextmanager
async def serve_tiny(request):
    async def frames():
        yield TokenChunk(request.request_id, "tok ")
        yield GenerateResult(request.request_id, "stop", Usage(5, 1))

    yield frames()


async def peers(nursery: trio.Nursery, tmp_path: Path, ask_policy: AskPolicy = AskPolicy()
                ) -> tuple[Federation, trio.CancelScope]:
    """A's federation (offering nothing, asking under ``ask_policy``), connected over real
    libp2p to B's, which offers ``tiny``; cancelling the scope returned takes B's host away
    (the partition)."""
    ids = [Identity(Ed25519PrivateKey.generate()) for _ in range(2)]
    a, b = Libp2pMesh(ids[0].seed, MeshSettings()), Libp2pMesh(ids[1].seed, MeshSettings())
    fa = Federation(mesh=a, identity=ids[0], operator="A", ledger=Ledger(tmp_path / "a.sqlite"), offer_fn=lambda: [],
                    ask_policy=ask_policy, settings=FederationSettings(announce_interval=0.2, unavailable_grace=GRACE))
    fb = Federation(mesh=b, identity=ids[1], operator="B", ledger=Ledger(tmp_path / "b.sqlite"),
                    offer_fn=lambda: [OfferedModel("tiny", True, price_input=1.0, price_output=2.0)],
                    serve_generate=serve_tiny, settings=FederationSettings(announce_interval=0.2, announcement_ttl=TTL))
    b_side = trio.CancelScope()

    async def run_b(task_status=trio.TASK_STATUS_IGNORED):
        with b_side:
            async with trio.open_nursery() as b_nursery:
                addrs = await b_nursery.start(b.run)
                await b_nursery.start(fb.run)
                task_status.started(addrs)

    addrs = await nursery.start(run_b)
    await nursery.start(a.run)
    await nursery.start(fa.run)
    await a.connect(addrs[0], timeout=10)
    return fa, b_side


async def test_a_peers_model_is_unavailable_during_a_partition_then_unknown(nursery, tmp_path) -> None:
    fa, b_side = await peers(nursery, tmp_path)
    async with serving(Fleet(), CATALOGUE) as (gateway, url):
        gateway.orchestrator.set_remote_router(PeerRouter(fa))
        with trio.fail_after(20):
            while not fa.can_route("tiny"):
                await trio.sleep(0.05)
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:
            r = await http.post("/v1/chat/completions", json=CHAT)
            assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "tok "

            b_side.cancel()  # the partition: B's host goes away
            with trio.fail_after(TTL + 5):
                while fa.can_route("tiny"):
                    await trio.sleep(0.05)
            expired_at = trio.current_time()

            def clients() -> list:
                out = []
                with pytest.raises(openai.APIStatusError) as caught:
                    openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0).chat.completions.create(
                        **CHAT)
                out.append(caught.value)
                with pytest.raises(anthropic.APIStatusError) as caught2:
                    anthropic.Anthropic(base_url=url, api_key="x", max_retries=0).messages.create(
                        max_tokens=8, **CHAT)
                out.append(caught2.value)
                with pytest.raises(ollama.ResponseError) as caught3:
                    ollama.Client(host=url).chat(stream=False, **CHAT)
                out.append(caught3.value)
                return out

            oa, an, ol = await trio.to_thread.run_sync(clients)
            assert trio.current_time() - expired_at < GRACE
            assert oa.status_code == 503 and oa.response.headers["retry-after"] == "1"
            assert oa.body["code"] == "model_unavailable" and "temporarily unavailable" in oa.body["message"]
            assert an.status_code == 529 and an.response.headers["retry-after"] == "1"  # Anthropic's "overloaded"
            assert an.body["type"] == "error" and an.body["error"]["type"] == "overloaded_error"
            assert "temporarily unavailable" in an.body["error"]["message"]
            assert ol.status_code == 503 and "temporarily unavailable" in ol.error
            r = await http.post("/v1/completions", json={"model": "tiny", "prompt": "hi"})
            assert r.status_code == 503 and r.json()["error"]["code"] == "model_unavailable"

            # Past the grace the model is forgotten: unknown.
            await trio.sleep(GRACE + 0.5 - (trio.current_time() - expired_at))
            r = await http.post("/v1/chat/completions", json=CHAT)
            assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
            assert "retry-after" not in r.headers
    assert len(fa.table.recent) == 0  # nothing kept of it


async def test_a_model_only_a_peer_our_policy_excludes_served_stays_refused_after_its_offer_expires(
        nursery, tmp_path) -> None:
    """While B announced ``tiny``, A's outbound policy (only listed peers, B not among them)
    refused it: 403 ``outbound_refused``. Once B's offer expired, the partition grace must
    not turn that into "temporarily unavailable" (503, which clients retry, to get 403 at
    best): it stays 403 for the grace, then the model is unknown (404)."""
    fa, b_side = await peers(nursery, tmp_path, AskPolicy(outbound=Outbound.LISTED, operators=frozenset({"C"})))
    async with serving(Fleet(), CATALOGUE) as (gateway, url):
        gateway.orchestrator.set_remote_router(PeerRouter(fa))
        with trio.fail_after(20):
            while not fa.table.offers("tiny", time.time()):
                await trio.sleep(0.05)
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:
            r = await http.post("/v1/chat/completions", json=CHAT)
            assert r.status_code == 403 and r.json()["error"]["code"] == "outbound_refused", r.text

            b_side.cancel()  # B goes away; its offer expires
            with trio.fail_after(TTL + 5):
                while fa.table.offers("tiny", time.time()):
                    await trio.sleep(0.05)
            expired_at = trio.current_time()
            r = await http.post("/v1/chat/completions", json=CHAT)
            assert trio.current_time() - expired_at < GRACE
            assert r.status_code == 403 and r.json()["error"]["code"] == "outbound_refused", r.text
            assert "retry-after" not in r.headers
            r = await http.post("/v1/messages", json={"max_tokens": 8, **CHAT})
            assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error", r.text

            await trio.sleep(GRACE + 0.5 - (trio.current_time() - expired_at))
            r = await http.post("/v1/chat/completions", json=CHAT)
            assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
