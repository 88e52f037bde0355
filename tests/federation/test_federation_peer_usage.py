"""What a peer's answer may claim: its usage is what the asking cortex shows its client
and bills the client's key for, so it is held to what the asker can account for."""

from contextlib import asynccontextmanager

import pytest

from helexa.mesh import MemoryNetwork
from helexa.protocol import EmbedRequest, EmbedResult, GenerateRequest, GenerateResult, SamplingParams, Task
from helexa.protocol import TokenChunk, Usage, Workload
from helexa.protocol.inference import ToolSpec
from helexa.protocol.federation import OfferedModel
from helexa.roles.cortex.federation import PeerVanished
from helexa.roles.cortex.federation.ledger import CONSUMED, SERVED
from helexa.roles.cortex.federation.peer_usage import UNBOUNDED_MAX_TOKENS

from test_federation_service import cortex, recorded, settle


class LyingFleet:
    """A local handler whose answers carry the given chunks, result text and usage."""

    def __init__(self, chunks=(("Hel", 1), ("lo", 1)), text="", usage=Usage(7, 2), embed_usage=Usage(3, 0)):
        self.chunks = chunks
        self.text = text
        self.usage = usage
        self.embed_usage = embed_usage

    @asynccontextmanager
    async def serve(self, request):
        async def frames():
            for text, tokens in self.chunks:
                yield TokenChunk(request.request_id, text, tokens)
            yield GenerateResult(request.request_id, "length", self.usage, text=self.text)

        gen = frames()
        try:
            yield gen
        finally:
            await gen.aclose()

    async def embed(self, request):
        return EmbedResult(request.request_id, 2, b"\0" * 8 * len(request.inputs), self.embed_usage)


def ask(rid="r1", max_tokens=None, stream=True):
    question = {"role": "user", "content": "What is the capital of France?"}
    return GenerateRequest(rid, "tiny", Task.CHAT, messages=(question,),
                           sampling=SamplingParams(max_tokens=max_tokens), stream=stream)


async def two(nursery, fleet):
    net = MemoryNetwork()
    a = await cortex(nursery, net, "A", offer=())
    emb = OfferedModel("emb", True, workloads=(Workload.EMBEDDING,))
    b = await cortex(nursery, net, "B", fleet=fleet, offer=(OfferedModel("tiny", True), emb))
    await settle()
    return a, b


async def answer(a, req):
    async with a.route(req) as frames:
        return [f async for f in frames]


async def test_an_answer_not_streamed_is_billed_and_recorded_unflagged(nursery, autojump_clock):
    # A request not streamed comes back as one result holding all its text: its 24 tokens
    # were flagged "bills far more completion tokens than were streamed" (none were).
    text = "L'Étoile, la Marseillaise, la femme, la femme au martyre, la"
    a, b = await two(nursery, LyingFleet(chunks=(), text=text, usage=Usage(37, 24)))
    got = await answer(a, ask(max_tokens=24, stream=False))
    assert got[-1].text == text and got[-1].usage == Usage(37, 24)
    consumed = a.ledger.get(CONSUMED, "r1")
    assert not consumed.flagged, consumed.flag_reason
    assert consumed.receipt == (await recorded(b.ledger, SERVED, "r1")).receipt


@pytest.mark.parametrize("fleet", [
    LyingFleet(usage=Usage(-1_000_000, 2)),
    LyingFleet(usage=Usage(7, -2)),
    LyingFleet(chunks=(("Hel", -1_000_000),)),
])
async def test_a_peer_claiming_negative_tokens_sent_an_invalid_answer(nursery, autojump_clock, fleet):
    # The asking cortex once passed these on: its metrics raised (a 500 to the client) and
    # its ledger recorded a negative cost, unflagged.
    a, _ = await two(nursery, fleet)
    with pytest.raises(PeerVanished, match="invalid answer"):
        await answer(a, ask())
    consumed = a.ledger.get(CONSUMED, "r1")
    assert consumed.flagged and consumed.receipt.outcome == "error"
    assert consumed.receipt.prompt_tokens >= 0 and consumed.receipt.cost >= 0


async def test_a_peer_inflating_its_usage_is_held_to_the_askers_bounds(nursery, autojump_clock):
    # Three chunks, billed as 2**62 tokens each way: the asker's client (and its key's
    # budget) once got exactly that.
    huge = 2 ** 62
    a, _ = await two(nursery, LyingFleet(chunks=(("a", 1), ("b", 1), ("c", 1)), usage=Usage(huge, huge, huge)))
    got = await answer(a, ask(max_tokens=50))
    usage = got[-1].usage
    assert usage.completion_tokens == 3
    assert 0 < usage.prompt_tokens <= 100 and usage.cached_tokens <= usage.prompt_tokens
    assert a.ledger.get(CONSUMED, "r1").flagged  # the peer's own receipt keeps its claim, flagged
    # A peer claiming more than max_tokens is held to it, and chunks to their bytes.
    a2, _ = await two(nursery, LyingFleet(chunks=(("x" * 10, 10),), usage=Usage(7, 40)))
    assert (await answer(a2, ask("r2", max_tokens=10)))[-1].usage == Usage(7, 10)
    a3, _ = await two(nursery, LyingFleet(chunks=(("x", huge),), usage=Usage(7, huge)))
    assert (await answer(a3, ask("r3")))[-1].usage == Usage(7, 1)


async def test_honest_usage_crosses_the_hop_unchanged(nursery, autojump_clock):
    a, _ = await two(nursery, LyingFleet(chunks=(("Hel", 1), ("lo", 1), ("", 1)), usage=Usage(37, 4, 30)))
    assert (await answer(a, ask(max_tokens=4)))[-1].usage == Usage(37, 4, 30)
    assert not a.ledger.get(CONSUMED, "r1").flagged


async def test_embedding_usage_from_a_peer_is_checked_too(nursery, autojump_clock):
    a, _ = await two(nursery, LyingFleet(embed_usage=Usage(-5, 0)))
    with pytest.raises(PeerVanished, match="invalid answer"):
        await a.embed(EmbedRequest("e1", "emb", ("x", "y")))
    assert a.ledger.get(CONSUMED, "e1").flagged
    a2, _ = await two(nursery, LyingFleet(embed_usage=Usage(2 ** 62, 0)))
    result = await a2.embed(EmbedRequest("e2", "emb", ("x", "y")))
    assert 0 < result.usage.prompt_tokens <= 40


async def test_a_peer_streaming_past_max_tokens_is_cut_there_and_cancelled(nursery, autojump_clock):
    # The peer ignores max_tokens = 5 and streams 3,000 tokens: the asker's client got all
    # of them (and its key was billed for them, past the worst case it reserved).
    fleet = LyingFleet(chunks=tuple((f"t{i} ", 1) for i in range(3000)), usage=Usage(10, 3000))
    a, b = await two(nursery, fleet)
    got = await answer(a, ask(max_tokens=5))
    assert [f.text for f in got[:-1]] == ["t0 ", "t1 ", "t2 ", "t3 ", "t4 "]
    assert got[-1].finish_reason == "length" and got[-1].usage.completion_tokens == 5
    consumed = a.ledger.get(CONSUMED, "r1")
    assert consumed.receipt.outcome == "cancelled"
    assert (await recorded(b.ledger, SERVED, "r1")).receipt.outcome == "cancelled"


async def test_a_prompt_with_tools_keeps_its_honest_count(nursery, autojump_clock):
    # The chat template renders the tools into the prompt (SmolLM2: 1,070 tokens for "hi"
    # and four tools): the prompt's size bound counted the messages only, and held an
    # honest peer's count to 30.
    tools = tuple(ToolSpec(f"f{i}", "Does a thing. " * 40, {"type": "object"}) for i in range(4))
    a, _ = await two(nursery, LyingFleet(usage=Usage(1070, 2)))
    req = GenerateRequest("r1", "tiny", Task.CHAT, messages=({"role": "user", "content": "hi"},), tools=tools)
    assert (await answer(a, req))[-1].usage == Usage(1070, 2)


async def test_a_tool_call_cut_short_is_billed_its_tokens_and_its_receipt_not_flagged(nursery, autojump_clock):
    # On a model whose tools are a JSON grammar, a call cut by max_tokens shows nothing (its
    # JSON is never text), yet all 20 tokens were generated: they were held to 0 and the
    # peer's honest receipt flagged "bills far more completion tokens than were streamed".
    tool = ToolSpec("get_weather", None, {"type": "object", "properties": {"city": {"type": "string"}}})
    a, b = await two(nursery, LyingFleet(chunks=(), usage=Usage(124, 20)))
    req = GenerateRequest("r1", "tiny", Task.CHAT, messages=({"role": "user", "content": "Weather in Paris?"},),
                          tools=(tool,), sampling=SamplingParams(max_tokens=20))
    assert (await answer(a, req))[-1].usage == Usage(124, 20)
    consumed = a.ledger.get(CONSUMED, "r1")
    assert not consumed.flagged, consumed.flag_reason
    # ...and never beyond max_tokens, tools or not.
    a2, _ = await two(nursery, LyingFleet(chunks=(), usage=Usage(124, 10_000)))
    assert (await answer(a2, GenerateRequest("r2", "tiny", Task.CHAT, messages=req.messages, tools=(tool,),
                                             sampling=SamplingParams(max_tokens=20))))[-1].usage == Usage(124, 20)


async def test_a_prompt_with_an_image_is_not_held_to_its_bytes(nursery, autojump_clock):
    # An image by URL is a few bytes here and hundreds of tokens to a vision model.
    a, _ = await two(nursery, LyingFleet(usage=Usage(900, 2)))
    content = [{"type": "text", "text": "what is it?"},
               {"type": "image_url", "image_url": {"url": "https://x.test/a.png"}}]
    req = GenerateRequest("r1", "tiny", Task.CHAT, messages=({"role": "user", "content": content},))
    assert (await answer(a, req))[-1].usage == Usage(900, 2)


async def test_a_peer_streaming_without_end_is_cut_even_when_no_max_tokens_was_set(nursery, autojump_clock):
    # An open portal sets no max_tokens: a peer that never sent its result kept the request
    # open (and a request not streamed gathering its text) for as long as it kept sending.
    chunk = ("x" * 1000, 1000)
    a, _ = await two(nursery, LyingFleet(chunks=(chunk,) * 1000, usage=Usage(7, 10**6)))
    got = await answer(a, ask(stream=False))
    assert got[-1].finish_reason == "length" and got[-1].usage.completion_tokens == UNBOUNDED_MAX_TOKENS // 1000 * 1000
    assert len(got) - 1 == UNBOUNDED_MAX_TOKENS // 1000
