"""Two cortexes of different releases federated, over the in-memory mesh: every frame is
decoded as the release of 2026-11-30 decodes it (``tests/fixtures/wire_2026-11-30.json``:
a frame with a field it does not know is refused, and the stream with it), and that
release speaks only ``/helexa/federation/1``.

Asking such a peer for an embedding failed (502: it refused the request's ``truncate``),
and such a peer asking us for a non-streamed answer got a 502 for the answer's
``first_token_s`` while our ledger recorded it served and its own recorded nothing."""

from __future__ import annotations

import pytest

from helexa.mesh import MemoryNetwork, streams
from helexa.protocol import EmbedRequest, GenerateResult, Workload
from helexa.protocol.federation import FEDERATION_PROTOCOL, SCOPED_FEDERATION_PROTOCOL, OfferedModel
from helexa.roles.cortex.federation.ledger import CONSUMED, SERVED

from conftest import FakeFleet
from earlier_wire import kinds_of, strict
from test_federation_service import cortex, recorded, request, settle

EARLIER = kinds_of("2026-11-30")
BEFORE_COUNTS = kinds_of("2026-12-02")
"""The release of 2026-12-02 (186c5c3, wire-identical to 001ba7c): ``/helexa/federation/2``
and ``/1``, no first-chunk prompt count."""


@pytest.fixture
def earlier_codec(monkeypatch):
    """Every frame on the mesh's streams decoded under that release's field lists first."""
    strict_codec(monkeypatch, EARLIER)


@pytest.fixture
def codec_of_186c5c3(monkeypatch):
    """Every frame decoded under the field lists of the release of 2026-12-02 first."""
    strict_codec(monkeypatch, BEFORE_COUNTS)


def strict_codec(monkeypatch, kinds):
    monkeypatch.setattr(streams, "decode", strict(streams.decode, kinds))


class TimedFleet(FakeFleet):
    """A fleet whose non-streamed answers say when their first text came, as a neuron's do."""

    def serve(self, request):
        inner = super().serve(request)

        class Timed:
            async def __aenter__(self):
                frames = await inner.__aenter__()

                async def timed():
                    async for frame in frames:
                        if isinstance(frame, GenerateResult):
                            frame = GenerateResult(frame.request_id, frame.finish_reason, frame.usage,
                                                   text="Hello world", first_token_s=0.05)
                        yield frame
                return timed()

            async def __aexit__(self, *exc):
                return await inner.__aexit__(*exc)

        return Timed()


async def answered(a, b, rid: str = "r1") -> list:
    """``a`` asks for ``request(rid)``, which ``b`` serves: the frames it got, once both
    ledgers recorded the answer with the same receipt (and ``a`` did not flag it)."""
    async with a.route(request(rid)) as frames:
        got = [f async for f in frames]
    assert isinstance(got[-1], GenerateResult)
    served, consumed = await recorded(b.ledger, SERVED, rid), a.ledger.get(CONSUMED, rid)
    assert consumed is not None and served.receipt == consumed.receipt and not consumed.flagged
    return got


async def test_a_peer_of_the_earlier_release_asked_for_an_embedding_answers_it(nursery, autojump_clock,
                                                                                earlier_codec):
    net = MemoryNetwork()
    offer = (OfferedModel("emb", True, price_input=1.0, workloads=(Workload.EMBEDDING,)),)
    a = await cortex(nursery, net, "A", offer=())
    b = await cortex(nursery, net, "B", fleet=FakeFleet(), offer=offer, protocols=(FEDERATION_PROTOCOL,))
    await settle()
    for rid, truncate in (("e1", True), ("e2", False)):  # Ollama's default, OpenAI's
        assert (await a.embed(EmbedRequest(rid, "emb", ("x",), truncate=truncate))).dim == 2
        served, consumed = await recorded(b.ledger, SERVED, rid), a.ledger.get(CONSUMED, rid)
        assert served.receipt == consumed.receipt and not consumed.flagged


async def test_a_peer_of_the_earlier_release_gets_our_answer_and_both_ledgers_agree(nursery, autojump_clock,
                                                                                   earlier_codec):
    net = MemoryNetwork()
    a = await cortex(nursery, net, "A", offer=(), protocols=(FEDERATION_PROTOCOL,))
    b = await cortex(nursery, net, "B", fleet=TimedFleet())
    await settle()
    await answered(a, b)


async def test_a_peer_of_the_earlier_release_gets_our_streamed_answer_without_the_prompt_count(nursery, autojump_clock,
                                                                                               earlier_codec):
    """The first chunk's ``prompt_tokens`` (a neuron's exact count) is left out for it."""
    net = MemoryNetwork()
    a = await cortex(nursery, net, "A", offer=(), protocols=(FEDERATION_PROTOCOL,))
    b = await cortex(nursery, net, "B", fleet=FakeFleet(prompt_tokens=42))
    await settle()
    got = await answered(a, b)
    assert [f.text for f in got[:-1]] == ["Hel", "lo", " world"] and got[0].prompt_tokens is None


@pytest.mark.parametrize("old", ["asker", "server"])
async def test_a_peer_of_186c5c3_streams_with_us_without_the_prompt_count(nursery, autojump_clock,
                                                                          codec_of_186c5c3, old):
    """That release speaks ``/helexa/federation/2`` but refuses the first chunk's
    ``prompt_tokens``: asking us, it gets our stream without it; serving us, it is asked
    over that protocol and its answer is read as it comes (the stream was dropped at the
    first token, a 502, while its ledger recorded the request served)."""
    net = MemoryNetwork()
    earlier = {"protocols": (SCOPED_FEDERATION_PROTOCOL, FEDERATION_PROTOCOL)}
    a = await cortex(nursery, net, "A", offer=(), **(earlier if old == "asker" else {}))
    b = await cortex(nursery, net, "B", fleet=FakeFleet(prompt_tokens=42), **(earlier if old == "server" else {}))
    await settle()
    got = await answered(a, b)
    assert [f.text for f in got[:-1]] == ["Hel", "lo", " world"] and got[0].prompt_tokens is None
