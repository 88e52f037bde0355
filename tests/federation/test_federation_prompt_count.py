"""The prompt a federated generation cut short is billed, on both sides of the hop.

A neuron's first chunk carries the prompt's exact token count (``TokenChunk.prompt_tokens``,
from llama.cpp's prompt processing); the result with the usage never comes for a cut
generation. The serving cortex's receipt billed 0 prompt tokens where its own tokenizer
could not count the model (a hub or URL source, another backend), and an asker that got no
receipt recorded a stand-in with 0 prompt tokens whatever it knew."""

from __future__ import annotations

import pytest
import trio

from helexa.mesh import MemoryNetwork
from helexa.protocol import GenerateRequest, TokenChunk
from helexa.roles.cortex.federation import PeerVanished
from helexa.roles.cortex.federation.ledger import CONSUMED, SERVED
from helexa.roles.cortex.federation.peer_usage import estimated_prompt
from helexa.roles.cortex.prompt_size import prompt_upper_bound

from conftest import FakeFleet
from test_federation_service import cortex, recorded, request, settle


async def cut_after(fed, req: GenerateRequest, seconds: float) -> list[TokenChunk]:
    got: list[TokenChunk] = []
    with trio.move_on_after(seconds):
        async with fed.route(req) as frames:
            async for f in frames:
                got.append(f)
    return got


async def test_a_cut_generation_s_receipts_bill_the_prompt_count_its_first_chunk_carried(nursery, autojump_clock):
    net = MemoryNetwork()
    fleet = FakeFleet(tokens=("a",) * 100, delay=1.0, prompt_tokens=42)
    a = await cortex(nursery, net, "A", offer=())
    b = await cortex(nursery, net, "B", fleet=fleet)  # no tokenizer of its own for the model
    await settle()
    got = await cut_after(a, request(), 3.5)
    assert got[0].prompt_tokens == 42 and all(c.prompt_tokens is None for c in got[1:])  # passed on to the asker
    served = await recorded(b.ledger, SERVED, "r1")
    assert served.receipt.outcome == "cancelled" and served.receipt.prompt_tokens == 42
    await trio.sleep(1)
    consumed = a.ledger.get(CONSUMED, "r1")
    assert consumed.receipt == served.receipt and not consumed.flagged


async def test_the_first_chunk_s_count_wins_over_a_recount_on_the_serving_side(nursery, autojump_clock):
    """The neuron's count is what its backend read; no second count is made for it."""
    net = MemoryNetwork()
    counted = []

    async def count_prompt(req):
        counted.append(req.request_id)
        return 31

    a = await cortex(nursery, net, "A", offer=())
    b = await cortex(nursery, net, "B", fleet=FakeFleet(tokens=("a",) * 100, delay=1.0, prompt_tokens=42),
                     count_prompt=count_prompt)
    await settle()
    await cut_after(a, request(), 3.5)
    served = await recorded(b.ledger, SERVED, "r1")
    assert served.receipt.prompt_tokens == 42 and counted == []


async def test_no_receipt_the_stand_in_bills_the_prompt_count_the_answer_carried(nursery, autojump_clock):
    net = MemoryNetwork()
    a = await cortex(nursery, net, "A", offer=())
    b = await cortex(nursery, net, "B", fleet=FakeFleet(tokens=("a",) * 10, delay=1.0, prompt_tokens=42))
    await settle()
    texts = []
    with pytest.raises(PeerVanished):
        async with a.route(request()) as frames:
            async for f in frames:
                texts.append(f.text)
                if len(texts) == 2:
                    b.mesh.kill()
    stand_in = a.ledger.get(CONSUMED, "r1")
    assert stand_in.flagged and "no receipt" in stand_in.flag_reason and "asker's own" in stand_in.flag_reason
    assert "exact" in stand_in.flag_reason
    assert (stand_in.receipt.prompt_tokens, stand_in.receipt.completion_tokens) == (42, 2)
    assert stand_in.receipt.cost == pytest.approx((42 * 1.0 + 2 * 2.0) / 1e6)


async def test_no_receipt_and_no_count_the_stand_in_bills_the_asker_s_estimate(nursery, autojump_clock):
    """A peer of an earlier release sends no count: the asker's estimate, as a cut stream's."""
    net = MemoryNetwork()
    a = await cortex(nursery, net, "A", offer=())
    b = await cortex(nursery, net, "B", fleet=FakeFleet(tokens=("a",) * 10, delay=1.0))
    await settle()
    with pytest.raises(PeerVanished):
        async with a.route(request()) as frames:
            async for _ in frames:
                b.mesh.kill()
    stand_in = a.ledger.get(CONSUMED, "r1")
    assert stand_in.flagged and "estimated" in stand_in.flag_reason
    assert stand_in.receipt.prompt_tokens == estimated_prompt(request()) > 0


async def test_a_peer_s_prompt_count_is_held_to_the_asker_s_bound(nursery, autojump_clock):
    """What the asker bills its client for a cut stream is no more than it can account for."""
    net = MemoryNetwork()
    a = await cortex(nursery, net, "A", offer=())
    b = await cortex(nursery, net, "B", fleet=FakeFleet(tokens=("a",) * 10, delay=1.0, prompt_tokens=10**9))
    await settle()
    got = []
    with pytest.raises(PeerVanished):
        async with a.route(request()) as frames:
            async for f in frames:
                got.append(f)
                b.mesh.kill()
    bound = prompt_upper_bound(request())
    assert got[0].prompt_tokens == bound
    assert a.ledger.get(CONSUMED, "r1").receipt.prompt_tokens == bound
