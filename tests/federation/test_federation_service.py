"""The Federation service end to end over the in-memory mesh."""

import time

import pytest
import trio

from helexa.mesh import MemoryMesh, MemoryNetwork, peer_id_from_ed25519
from helexa.protocol import EmbedRequest, GenerateRequest, GenerateResult, Task, TokenChunk, decode, encode
from helexa.protocol.federation import ANNOUNCE_TOPIC, OfferedModel, PolicySummary
from helexa.roles.cortex.federation import (
    AskPolicy,
    NoPeerOffers,
    Outbound,
    OutboundRefused,
    PeerFailed,
    PeerRefused,
    PeerUnreachable,
    PeerVanished,
    ServePolicy,
)
from helexa.roles.cortex.federation.announcements import sign_announcement
from helexa.roles.cortex.federation.ledger import CONSUMED, SERVED, Ledger
from helexa.roles.cortex.federation.outbound import AskTimeouts
from helexa.roles.cortex.federation.service import Federation, FederationSettings

from conftest import FakeFleet, new_identity

MODEL = OfferedModel("tiny", warm=True, price_input=1.0, price_output=2.0)


def request(rid="r1", model="tiny"):
    return GenerateRequest(rid, model, Task.CHAT, messages=({"role": "user", "content": "hi"},))


async def cortex(nursery, network, operator, *, fleet=None, offer=(MODEL,), serve_policy=ServePolicy(),
                 ask_policy=AskPolicy(), mesh_node=None, settings=FederationSettings(announce_interval=1.0),
                 protocols=None, count_prompt=None):
    """``protocols``: the request-stream protocols it speaks (``(FEDERATION_PROTOCOL,)``:
    a cortex of a release before scoped federation)."""
    ident = new_identity()
    mesh = MemoryMesh(network, peer_id_from_ed25519(ident.public_bytes), timeout=5)
    await nursery.start(mesh.run)
    fed = Federation(
        mesh=mesh, identity=ident, operator=operator, ledger=Ledger(":memory:"), offer_fn=lambda: list(offer),
        serve_generate=fleet.serve if fleet else None, serve_embed=fleet.embed if fleet else None,
        serve_policy=serve_policy, ask_policy=ask_policy, settings=settings,
        clock=trio.current_time, count_prompt=count_prompt)
    if protocols is not None:
        fed.protocols = protocols
    await nursery.start(fed.run)
    return fed


async def settle():
    await trio.sleep(1.5)


async def recorded(ledger, direction, rid):
    """The server records after answering, on a worker thread: wait (in real time)."""
    deadline = time.monotonic() + 5
    while (entry := ledger.get(direction, rid)) is None and time.monotonic() < deadline:
        await trio.sleep(0.01)
    return entry


async def test_streamed_request_is_served_by_the_peer_and_both_ledgers_agree(nursery, autojump_clock):
    net = MemoryNetwork()
    b_fleet = FakeFleet()
    a = await cortex(nursery, net, "A", offer=())
    b = await cortex(nursery, net, "B", fleet=b_fleet)
    await settle()
    assert list(a.remote_models()) == ["tiny"] and a.can_route("tiny")
    async with a.route(request()) as frames:
        got = [f async for f in frames]
    assert [f.text for f in got if isinstance(f, TokenChunk)] == ["Hel", "lo", " world"]
    assert isinstance(got[-1], GenerateResult)
    consumed = a.ledger.get(CONSUMED, "r1")
    served = await recorded(b.ledger, SERVED, "r1")
    assert not consumed.flagged
    assert consumed.receipt == served.receipt
    assert consumed.receipt.completion_tokens == 3 and consumed.receipt.prompt_tokens == 7
    assert consumed.peer_id == b.mesh.peer_id and served.peer_id == a.mesh.peer_id


async def test_the_stop_sequence_that_ended_an_answer_crosses_the_hop(nursery, autojump_clock):
    net = MemoryNetwork()
    a = await cortex(nursery, net, "A", offer=())
    await cortex(nursery, net, "B", fleet=FakeFleet(stop_sequence="\n\n"))
    await settle()
    async with a.route(request()) as frames:
        got = [f async for f in frames]
    assert got[-1].finish_reason == "stop" and got[-1].stop_sequence == "\n\n"


async def test_embeddings_are_routed_too(nursery, autojump_clock):
    net = MemoryNetwork()
    offer = (OfferedModel("emb", True, workloads=(__import__("helexa").protocol.Workload.EMBEDDING,)),)
    a = await cortex(nursery, net, "A", offer=())
    await cortex(nursery, net, "B", fleet=FakeFleet(), offer=offer)
    await settle()
    result = await a.embed(EmbedRequest("e1", "emb", ("x", "y")))
    assert result.dim == 2
    assert not a.ledger.get(CONSUMED, "e1").flagged


async def test_refusal_by_the_peer_policy_is_a_clear_error(nursery, autojump_clock):
    net = MemoryNetwork()
    a = await cortex(nursery, net, "A", offer=())
    await cortex(nursery, net, "B", fleet=FakeFleet(), serve_policy=ServePolicy(deny_operators=frozenset({"A"})))
    await settle()
    with pytest.raises(PeerRefused) as err:
        async with a.route(request()):
            pass
    assert err.value.code == "denied"


async def test_rate_limited_peer_refuses_with_retry_after(nursery, autojump_clock):
    net = MemoryNetwork()
    a = await cortex(nursery, net, "A", offer=())
    # A bucket that refills only after hours of virtual time: the ledger writes on a worker
    # thread, and while it does the autojump clock may run ahead by many announce ticks.
    await cortex(nursery, net, "B", fleet=FakeFleet(), serve_policy=ServePolicy(rate_per_second=1e-4, burst=1))
    await settle()
    async with a.route(request("r1")) as frames:
        [f async for f in frames]
    with pytest.raises(PeerRefused) as err:
        async with a.route(request("r2")):
            pass
    assert err.value.code == "rate_limited" and err.value.retry_after > 0


async def test_outbound_policy_and_missing_models_fail_before_sending(nursery, autojump_clock):
    net = MemoryNetwork()
    fleet = FakeFleet()
    never = await cortex(nursery, net, "A", offer=(), ask_policy=AskPolicy(outbound=Outbound.NEVER))
    cheap = await cortex(nursery, net, "C", offer=(), ask_policy=AskPolicy(max_price_output=1.0))
    await cortex(nursery, net, "B", fleet=fleet)
    await settle()
    with pytest.raises(OutboundRefused):
        async with never.route(request()):
            pass
    with pytest.raises(OutboundRefused):
        async with cheap.route(request()):
            pass
    with pytest.raises(NoPeerOffers):
        async with cheap.route(request(model="unknown")):
            pass
    assert fleet.requests == []


async def test_busy_peer_is_skipped_for_the_next_best(nursery, autojump_clock):
    net = MemoryNetwork()
    a = await cortex(nursery, net, "A", offer=())
    cheap_closed = await cortex(nursery, net, "B", fleet=FakeFleet(), serve_policy=ServePolicy(
        rate_per_second=0.001, burst=0))
    pricey = await cortex(nursery, net, "C", fleet=FakeFleet(),
                          offer=(OfferedModel("tiny", True, price_input=5.0, price_output=5.0),))
    await settle()
    async with a.route(request()) as frames:
        assert frames.peer_id == pricey.mesh.peer_id
        [f async for f in frames]
    assert cheap_closed.ledger.summary() == []


async def test_peer_killed_mid_stream_ends_it_with_an_error(nursery, autojump_clock):
    net = MemoryNetwork()
    a = await cortex(nursery, net, "A", offer=())
    b = await cortex(nursery, net, "B", fleet=FakeFleet(tokens=("a",) * 10, delay=1.0))
    await settle()
    texts = []
    with pytest.raises(PeerVanished):
        async with a.route(request()) as frames:
            async for f in frames:
                texts.append(f.text)
                if len(texts) == 2:
                    b.mesh.kill()
    assert texts == ["a", "a"]
    flagged = a.ledger.get(CONSUMED, "r1")
    assert flagged.flagged and "no receipt" in flagged.flag_reason


async def test_cancellation_crosses_the_hop(nursery, autojump_clock):
    net = MemoryNetwork()
    fleet = FakeFleet(tokens=("a",) * 100, delay=1.0)
    a = await cortex(nursery, net, "A", offer=())
    b = await cortex(nursery, net, "B", fleet=fleet)
    await settle()
    with trio.move_on_after(3.5):
        async with a.route(request()) as frames:
            async for _ in frames:
                pass
    await trio.sleep(1)
    assert fleet.closed_early == ["r1"]
    assert (await recorded(b.ledger, SERVED, "r1")).receipt.outcome == "cancelled"
    consumed = a.ledger.get(CONSUMED, "r1")
    assert consumed.receipt.outcome == "cancelled" and not consumed.flagged



async def test_a_request_cut_after_its_tokens_began_is_billed_its_prompt_on_both_sides(nursery, autojump_clock):
    # The serving side's receipt for a cut generation billed 0 prompt tokens (the neuron's
    # usage comes with its result, which never came): the prompt's compute went unpaid.
    net = MemoryNetwork()
    fleet = FakeFleet(tokens=("a",) * 100, delay=1.0)
    counted = []

    async def count_prompt(req):
        counted.append(req.request_id)
        await trio.sleep(0)
        return 31

    a = await cortex(nursery, net, "A", offer=())
    b = await cortex(nursery, net, "B", fleet=fleet, count_prompt=count_prompt)
    await settle()
    with trio.move_on_after(3.5):
        async with a.route(request()) as frames:
            async for _ in frames:
                pass
    served = await recorded(b.ledger, SERVED, "r1")
    assert served.receipt.outcome == "cancelled" and counted == ["r1"]
    assert served.receipt.prompt_tokens == 31 and served.receipt.completion_tokens > 0
    await trio.sleep(1)
    consumed = a.ledger.get(CONSUMED, "r1")
    assert consumed.receipt == served.receipt and not consumed.flagged


async def test_a_request_left_before_its_first_token_is_recorded_on_both_sides(nursery, autojump_clock):
    # The client left during the peer's cold load (no answer frame yet): the peer recorded
    # a cancelled receipt and the asker nothing, so the two ledgers disagreed.
    net = MemoryNetwork()
    fleet = FakeFleet(tokens=("a",) * 10, delay=5.0)
    a = await cortex(nursery, net, "A", offer=())
    b = await cortex(nursery, net, "B", fleet=fleet)
    await settle()
    with trio.move_on_after(1.0):
        async with a.route(request()):
            pass
    served = await recorded(b.ledger, SERVED, "r1")
    consumed = a.ledger.get(CONSUMED, "r1")
    assert served.receipt.outcome == "cancelled" and fleet.closed_early == ["r1"]
    assert consumed is not None and consumed.receipt == served.receipt and not consumed.flagged


async def test_a_peer_too_slow_to_answer_is_told_and_its_receipt_recorded(nursery, autojump_clock):
    net = MemoryNetwork()
    fleet = FakeFleet(tokens=("a",) * 10, delay=5.0)
    settings = FederationSettings(announce_interval=1.0, ask=AskTimeouts(first_frame=1.0))
    a = await cortex(nursery, net, "A", offer=(), settings=settings)
    b = await cortex(nursery, net, "B", fleet=fleet)
    await settle()
    with pytest.raises(PeerUnreachable):
        async with a.route(request()):
            pass
    served = await recorded(b.ledger, SERVED, "r1")
    assert served.receipt.outcome == "cancelled" and fleet.closed_early == ["r1"]
    assert a.ledger.get(CONSUMED, "r1").receipt == served.receipt

async def test_local_failure_on_the_peer_is_reported_as_peer_failed(nursery, autojump_clock):
    net = MemoryNetwork()
    a = await cortex(nursery, net, "A", offer=())
    await cortex(nursery, net, "B", fleet=FakeFleet(fail=RuntimeError("out of memory")))
    await settle()
    with pytest.raises(PeerFailed) as err:
        async with a.route(request()) as frames:
            [f async for f in frames]
    assert "out of memory" in str(err.value)


async def test_forged_announcement_never_reaches_the_table(nursery, autojump_clock):
    net = MemoryNetwork()
    a = await cortex(nursery, net, "A", offer=())
    liar = MemoryMesh(net, "liar")
    await nursery.start(liar.run)
    victim = new_identity()
    ann = sign_announcement(victim, operator="V", models=(MODEL,), spare_slots=1, policy=PolicySummary(),
                            addrs=(), issued_at=trio.current_time(), ttl=30, sequence=1)
    await liar.announce(ANNOUNCE_TOPIC, encode(ann))  # a real signature, the wrong author
    await trio.sleep(0.1)
    assert a.table.peers() == []
    assert not a.can_route("tiny")


async def test_offers_expire_when_a_peer_stops_announcing(nursery, autojump_clock):
    net = MemoryNetwork()
    a = await cortex(nursery, net, "A", offer=())
    b = await cortex(nursery, net, "B", fleet=FakeFleet())
    await settle()
    assert a.can_route("tiny")
    b.mesh.kill()
    await trio.sleep(31)
    assert not a.can_route("tiny")


# --- streams reused between requests ----------------------------------------------------


def count_opens(fed):
    """The peers ``fed`` opened a new stream to, one entry a stream."""
    opened = []
    real = fed.mesh.open_stream

    async def open_stream(peer_id, protocol, **kw):
        opened.append(peer_id)
        return await real(peer_id, protocol, **kw)

    fed.mesh.open_stream = open_stream
    return opened


async def test_requests_to_one_peer_reuse_one_stream_errors_included(nursery, autojump_clock):
    net = MemoryNetwork()
    fleet = FakeFleet()
    offer = (MODEL, OfferedModel("emb", True, workloads=(__import__("helexa").protocol.Workload.EMBEDDING,)))
    a = await cortex(nursery, net, "A", offer=())
    b = await cortex(nursery, net, "B", fleet=fleet, offer=offer)
    await settle()
    opened = count_opens(a)
    for rid in ("r1", "r2"):
        async with a.route(request(rid)) as frames:
            assert len([f async for f in frames]) == 4
    assert (await a.embed(EmbedRequest("e1", "emb", ("x",)))).dim == 2
    fleet.fail = RuntimeError("out of memory")
    with pytest.raises(PeerFailed, match="out of memory"):
        async with a.route(request("r3")) as frames:
            [f async for f in frames]
    fleet.fail = None
    async with a.route(request("r4")) as frames:
        assert isinstance([f async for f in frames][-1], GenerateResult)
    assert opened == [b.mesh.peer_id]
    for rid in ("r1", "r2", "e1", "r3", "r4"):
        consumed = a.ledger.get(CONSUMED, rid)
        assert not consumed.flagged and consumed.receipt == (await recorded(b.ledger, SERVED, rid)).receipt


async def test_a_cancelled_request_does_not_leave_its_stream_for_the_next(nursery, autojump_clock):
    net = MemoryNetwork()
    fleet = FakeFleet(tokens=("a",) * 100, delay=1.0)
    a = await cortex(nursery, net, "A", offer=())
    b = await cortex(nursery, net, "B", fleet=fleet)
    await settle()
    opened = count_opens(a)
    with trio.move_on_after(3.5):
        async with a.route(request("r1")) as frames:
            async for _ in frames:
                pass
    fleet.tokens, fleet.delay = ("b",), 0.0
    async with a.route(request("r2")) as frames:
        got = [f async for f in frames]
    assert fleet.closed_early == ["r1"] and [f.text for f in got[:-1]] == ["b"]
    assert opened == [b.mesh.peer_id, b.mesh.peer_id]
    assert (await recorded(b.ledger, SERVED, "r1")).receipt.outcome == "cancelled"
    assert a.ledger.get(CONSUMED, "r2").receipt.outcome == "ok"


async def test_a_stream_the_peer_closed_while_idle_is_replaced_unseen(nursery, autojump_clock):
    net = MemoryNetwork()
    a = await cortex(nursery, net, "A", offer=(),
                     settings=FederationSettings(announce_interval=1.0, stream_max_idle=1000.0))
    b = await cortex(nursery, net, "B", fleet=FakeFleet())
    await settle()
    opened = count_opens(a)
    async with a.route(request("r1")) as frames:
        [f async for f in frames]
    await trio.sleep(61)  # past the serving side's idle timeout (60 s): it closed the stream
    async with a.route(request("r2")) as frames:
        got = [f async for f in frames]
    assert isinstance(got[-1], GenerateResult) and not a.ledger.get(CONSUMED, "r2").flagged
    assert opened == [b.mesh.peer_id, b.mesh.peer_id]


async def test_an_idle_stream_past_its_age_is_closed_not_reused(nursery, autojump_clock):
    net = MemoryNetwork()
    a = await cortex(nursery, net, "A", offer=())  # stream_max_idle 30 s
    b = await cortex(nursery, net, "B", fleet=FakeFleet())
    await settle()
    opened = count_opens(a)
    for rid, pause in (("r1", 0), ("r2", 29), ("r3", 31)):
        await trio.sleep(pause)
        async with a.route(request(rid)) as frames:
            [f async for f in frames]
    assert opened == [b.mesh.peer_id, b.mesh.peer_id]  # r2 reused r1's stream; r3 did not


# --- the serving side's one reader per stream -------------------------------------------


async def test_a_cancel_sent_together_with_its_request_stops_it(nursery, autojump_clock):
    # The Cancel is read before the exchange starts (the stream's reader queues it behind
    # the request): it must still count for that request, not be taken for the next.
    from helexa.protocol import Cancel
    from helexa.protocol.federation import FEDERATION_PROTOCOL, FederatedHello, Receipt

    net = MemoryNetwork()
    fleet = FakeFleet(tokens=("a",) * 100, delay=1.0)
    b = await cortex(nursery, net, "B", fleet=fleet)
    asker = MemoryMesh(net, "asker", timeout=5)
    await nursery.start(asker.run)
    stream = await asker.open_stream(b.mesh.peer_id, FEDERATION_PROTOCOL)
    await stream.send(FederatedHello("A", "r1"), request("r1"), Cancel("r1"))
    frames = []
    while not isinstance(frame := await stream.receive(), Receipt):
        frames.append(frame)
    assert frame.outcome == "cancelled" and fleet.closed_early == ["r1"]
    assert len(frames) <= 1 and trio.current_time() < 2
    # The stream serves the next request as usual.
    fleet.tokens, fleet.delay = ("b",), 0.0
    await stream.send(FederatedHello("A", "r2"), request("r2"))
    got = [await stream.receive() for _ in range(3)]
    assert [type(f).__name__ for f in got] == ["TokenChunk", "GenerateResult", "Receipt"]
    assert got[-1].outcome == "ok"


async def test_an_asker_that_goes_away_mid_answer_stops_the_generation(nursery, autojump_clock):
    from helexa.protocol.federation import FEDERATION_PROTOCOL, FederatedHello

    net = MemoryNetwork()
    fleet = FakeFleet(tokens=("a",) * 100, delay=1.0)
    b = await cortex(nursery, net, "B", fleet=fleet)
    asker = MemoryMesh(net, "asker", timeout=5)
    await nursery.start(asker.run)
    stream = await asker.open_stream(b.mesh.peer_id, FEDERATION_PROTOCOL)
    await stream.send(FederatedHello("A", "r1"), request("r1"))
    for _ in range(3):
        await stream.receive()
    asker.kill()
    await trio.sleep(2)
    assert fleet.closed_early == ["r1"]
    assert (await recorded(b.ledger, SERVED, "r1")).receipt.outcome == "cancelled"


async def test_candidates_follow_new_announcements_expiries_and_policies_at_once():
    # The candidate lists are kept between requests (three lookups a request): kept
    # only while the table is unchanged and none of their offers expired.
    now = [1000.0]
    ident = new_identity()
    fed = Federation(mesh=MemoryMesh(MemoryNetwork(), "me", timeout=5), identity=new_identity(), operator="A",
                     ledger=Ledger(":memory:"), offer_fn=lambda: [], clock=lambda: now[0])

    def announce(seq, models=(MODEL,)):
        ann = decode(encode(sign_announcement(
            ident, operator="B", models=models, spare_slots=1, policy=ServePolicy().summary(), addrs=(),
            issued_at=now[0], ttl=30.0, sequence=seq)))
        assert fed.table.update(ann, now[0])

    assert not fed.can_route("tiny")
    announce(1)
    assert fed.can_route("tiny") and fed.can_route("tiny")
    now[0] += 29.9
    assert fed.can_route("tiny")
    now[0] += 0.2  # expired, though nobody has told the table yet
    assert not fed.can_route("tiny")
    announce(2, models=())
    assert not fed.can_route("tiny")
    announce(3)
    assert fed.can_route("tiny")
    assert not fed.can_route("tiny", also=AskPolicy(outbound=Outbound.LISTED))
    fed.set_policies(ServePolicy(), AskPolicy(max_price_output=1.0))
    assert not fed.can_route("tiny")
    fed.set_policies(ServePolicy(), AskPolicy())
    assert fed.can_route("tiny")


async def test_a_peer_denied_by_its_announced_operator_cannot_claim_another_in_its_hello(nursery, autojump_clock):
    # The hello's operator is the asker's word for one request: B once judged that, so a
    # peer whose signed announcements say "A" got past deny_operators = ["A"] by sending
    # another name in its hellos.
    net = MemoryNetwork()
    a = await cortex(nursery, net, "A", offer=())
    b = await cortex(nursery, net, "B", fleet=FakeFleet(), serve_policy=ServePolicy(deny_operators=frozenset({"A"})))
    await settle()
    assert b.table.get(a.mesh.peer_id).operator == "A"
    a.operator = "someone-else"  # the next hellos claim it; the announcement B holds says "A"
    with pytest.raises(PeerRefused) as err:
        async with a.route(request()):
            pass
    assert err.value.code == "denied"


async def test_a_hellos_operator_name_is_bounded_before_the_policy_logs_and_answers_it(nursery, autojump_clock):
    """A peer with no announcement here is judged by its hello's operator name, which only
    the frame bounded: a refusal quoted 50,000 characters (or a forged log line) back to it
    and into the log. It is held to 256 printable characters with a mark, as an announced one."""
    from helexa.protocol.federation import FEDERATION_PROTOCOL, FederatedHello, Refusal

    net = MemoryNetwork()
    b = await cortex(nursery, net, "B", fleet=FakeFleet(), serve_policy=ServePolicy(allow_operators=frozenset({"x"})))
    asker = MemoryMesh(net, "asker", timeout=5)
    await nursery.start(asker.run)
    stream = await asker.open_stream(b.mesh.peer_id, FEDERATION_PROTOCOL)
    await stream.send(FederatedHello("o" * 50_000 + "\n12:00 forged", "r1"), request("r1"))
    refusal = await stream.receive()
    assert isinstance(refusal, Refusal) and refusal.code == "denied"
    assert "o" * 256 + "... [cut from 50013 characters]" in refusal.message and len(refusal.message) < 1000
