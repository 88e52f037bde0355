"""Real libp2p hosts, each in its own process, on 127.0.0.1."""

import time

import pytest
import trio

from helexa.mesh import MeshSettings, mesh_identity

from nodes import NodeProcess

pytestmark = pytest.mark.slow

YAMUX = MeshSettings(direct=False)
"""For the tests of our yamux streams: with the direct channel on, streams go over it."""


async def start_all(nursery, tmp_path, specs):
    """Start nodes concurrently; ``specs`` is a list of (name, args) and args may be a
    callable of the already started nodes' dict."""
    nodes = {}
    for name, args in specs:
        if callable(args):
            args = args(nodes)
        nodes[name] = await NodeProcess.start(nursery, tmp_path / name, *args)
    return nodes


def boot(node):
    return ["--bootstrap", node.addrs[0]]


async def test_three_nodes_discover_each_other_from_one_bootstrap_address(nursery, tmp_path):
    nodes = await start_all(nursery, tmp_path, [
        ("a", ["--federation"]),
        ("b", lambda n: ["--federation", *boot(n["a"])]),
        ("c", lambda n: ["--federation", *boot(n["a"])]),
    ])
    a, b, c = nodes["a"], nodes["b"], nodes["c"]
    # b and c only know a: they find each other through a's relaying of announcements.
    async with trio.open_nursery() as waits:
        waits.start_soon(lambda: a.call("wait_peers", peers=[b.peer_id, c.peer_id], timeout=15))
        waits.start_soon(lambda: b.call("wait_peers", peers=[a.peer_id, c.peer_id], timeout=15))
        waits.start_soon(lambda: c.call("wait_peers", peers=[a.peer_id, b.peer_id], timeout=15))
    assert mesh_identity(tmp_path / "a").peer_id == a.peer_id
    assert mesh_identity(tmp_path / "a").multiaddrs == tuple(a.addrs)
    for n in nodes.values():
        await n.stop()


async def test_gossip_crosses_a_line_of_three_and_invalid_messages_are_not_relayed(nursery, tmp_path):
    nodes = await start_all(nursery, tmp_path, [
        ("a", []),
        ("b", lambda n: boot(n["a"])),
        ("c", lambda n: boot(n["b"])),
    ])
    a, b, c = nodes["a"], nodes["b"], nodes["c"]
    await b.call("wait_peers", peers=[a.peer_id, c.peer_id], timeout=15)
    assert a.peer_id not in (await c.call("peers"))["peers"]  # a line, not a triangle
    await a.call("publish", data=b"bad forged".hex())
    got = None
    deadline = time.monotonic() + 15
    while got is None and time.monotonic() < deadline:
        await a.call("publish", data=b"hello".hex())
        try:
            got = await c.call("next_message", timeout=0.5)
        except RuntimeError:
            pass
    assert got is not None, "the announcement never crossed the line"
    assert bytes.fromhex(got["data"]) == b"hello" and got["origin"] == a.peer_id
    for n in nodes.values():
        await n.stop()


async def test_federated_request_streams_across_processes_and_ledgers_agree(nursery, tmp_path):
    nodes = await start_all(nursery, tmp_path, [
        ("a", ["--federation", "--operator", "A"]),
        ("b", lambda n: ["--federation", "--operator", "B", "--serve", "--tokens", "4", *boot(n["a"])]),
    ])
    a, b = nodes["a"], nodes["b"]
    await a.call("wait_route", model="tiny", timeout=15)
    streamed = await a.call("route", model="tiny", rid="r-stream")
    whole = await a.call("route", model="tiny", rid="r-whole", stream=False)
    for reply in (streamed, whole):
        assert reply["error_kind"] is None
        assert reply["texts"] == ["tok0 ", "tok1 ", "tok2 ", "tok3 ", "<stop>"]
        assert reply["peer"] == b.peer_id
    consumed = {e["request_id"]: e for e in (await a.call("ledger"))["entries"]}
    served = {e["request_id"]: e for e in (await b.call("ledger"))["entries"]}
    for rid in ("r-stream", "r-whole"):
        assert consumed[rid]["direction"] == "consumed" and not consumed[rid]["flagged"]
        assert served[rid]["direction"] == "served"
        assert consumed[rid]["signature"] == served[rid]["signature"]
        assert consumed[rid]["peer"] == b.peer_id and served[rid]["peer"] == a.peer_id
    for n in nodes.values():
        await n.stop()


async def test_peer_killed_mid_stream_ends_the_stream_with_an_error(nursery, tmp_path):
    nodes = await start_all(nursery, tmp_path, [
        ("a", ["--federation"]),
        ("b", lambda n: ["--federation", "--serve", "--tokens", "100", "--token-delay", "0.05", *boot(n["a"])]),
    ])
    a, b = nodes["a"], nodes["b"]
    await a.call("wait_route", model="tiny", timeout=15)
    result = {}

    async def route():
        result.update(await a.call("route", model="tiny", rid="r1", timeout=30))

    async with trio.open_nursery() as inner:
        inner.start_soon(route)
        await trio.sleep(1.0)
        b.kill()
    assert result["error_kind"].startswith("PeerVanished")
    assert 0 < len(result["texts"]) < 100
    assert result["s"] < 5
    [entry] = (await a.call("ledger"))["entries"]
    assert entry["flagged"]
    await a.stop()


async def test_restarted_peer_is_reached_again_within_seconds(nursery, tmp_path):
    nodes = await start_all(nursery, tmp_path, [
        ("a", ["--federation"]),
        ("b", lambda n: ["--federation", "--serve", *boot(n["a"])]),
    ])
    a, b = nodes["a"], nodes["b"]
    await a.call("wait_route", model="tiny", timeout=15)
    assert (await a.call("route", model="tiny", rid="before"))["error_kind"] is None
    port_addr = b.addrs[0].split("/p2p/")[0]
    b.kill()
    await b.proc.wait()
    await trio.sleep(2)  # a's redials fail meanwhile: the peer lands in the negative dial cache
    # b comes back with the same identity and port, and no bootstrap: a must find it.
    b2 = await NodeProcess.start(nursery, tmp_path / "b", "--federation", "--serve", "--listen", port_addr)
    assert b2.peer_id == b.peer_id
    ready = time.time()
    back = await a.call("wait_peers", peers=[b2.peer_id], timeout=20)
    assert back["t"] - ready < 5, f"reconnected after {back['t'] - ready:.1f}s"
    after = await a.call("route", model="tiny", rid="after")
    assert after["error_kind"] is None and after["peer"] == b2.peer_id
    await a.stop()
    await b2.stop()


def test_peer_id_computed_without_libp2p_matches_libp2p():
    from libp2p.crypto.ed25519 import create_new_key_pair
    from libp2p.peer.id import ID

    from helexa.identity import Identity
    from helexa.mesh import peer_id_from_ed25519
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    ident = Identity(Ed25519PrivateKey.generate())
    assert peer_id_from_ed25519(ident.public_bytes) == ID.from_pubkey(create_new_key_pair(ident.seed).public_key).to_base58()


async def test_a_gossip_flood_from_one_peer_is_cut_to_its_rate_and_scores_it_down(nursery, tmp_path):
    nodes = await start_all(nursery, tmp_path, [
        ("hub", ["--gossip-per-peer", "5", "--gossip-burst", "20"]),
        ("flooder", lambda n: boot(n["hub"])),
        ("honest", lambda n: boot(n["hub"])),
    ])
    hub, flooder, honest = nodes["hub"], nodes["flooder"], nodes["honest"]
    await hub.call("wait_peers", peers=[flooder.peer_id, honest.peer_id], timeout=15)
    await trio.sleep(2)  # a couple of gossip heartbeats: both are in the hub's mesh
    started = time.monotonic()
    lowest = 0.0
    async with trio.open_nursery() as watch:
        async def watch_score():
            nonlocal lowest
            while True:
                state = await hub.call("gossip_state")
                lowest = min(lowest, state["scores"].get(flooder.peer_id, 0.0))
                await trio.sleep(0.2)

        watch.start_soon(watch_score)
        await flooder.call("flood", n=300, timeout=120)  # py-libp2p publishes some 20-50 a second
        watch.cancel_scope.cancel()
    state = await hub.call("gossip_state")
    lowest = min(lowest, state["scores"].get(flooder.peer_id, 0.0))
    for _ in range(20):  # until the hub has seen all that is on its way
        await trio.sleep(0.5)
        previous, state = state, await hub.call("gossip_state")
        lowest = min(lowest, state["scores"].get(flooder.peer_id, 0.0))
        if state["received"] == previous["received"] and state["received"]:
            break
    took = time.monotonic() - started
    delivered = state["received"].get(flooder.peer_id, 0)
    dropped = state["dropped"].get(flooder.peer_id, 0)
    # Burst 20, then 5/s: what the hub let through is bounded by the limit.
    assert delivered <= 20 + 5 * (took + 1) and dropped > 0, (delivered, dropped, took)
    # Each rejected message costs the flooder a point (decaying 10%/s); under -100 the hub
    # would ignore it outright (GOSSIP_SCORE). py-libp2p's own publish path loses most of
    # a burst this fast, so a few dozen reach the hub (fewer on a busy machine): enough to
    # see the score fall.
    assert lowest < 0
    print(f"\nflood: 300 sent in {took:.1f}s, {delivered} delivered, {dropped} rejected by the rate limit, "
          f"flooder's score fell to {lowest:.0f}")
    # The honest peer is heard all along.
    got = None
    deadline = time.monotonic() + 15
    while got is None and time.monotonic() < deadline:
        await honest.call("publish", data=b"still here".hex())
        with trio.move_on_after(1):
            while got is None:
                m = await hub.call("next_message", timeout=1)
                if m["origin"] == honest.peer_id:
                    got = m
    assert got is not None
    for n in nodes.values():
        await n.stop()


async def test_a_stream_carries_megabytes_both_ways_with_window_credit_returned_at_half_window():
    # The mesh turns py-libp2p's WINDOW_UPDATE-after-every-read off (go-yamux's rule: credit
    # goes back once half the 256 KiB window is read): 8 MB one way, over many windows,
    # must still flow, with the answers interleaved on the same stream.
    import os

    from helexa.mesh.libp2p_mesh import Libp2pMesh
    from helexa.protocol import TokenChunk

    assert os.environ["PY_YAMUX_RELEASE_ON_READ"] == "0"
    count, size = 200, 40_000
    received = []

    async def handler(stream):
        for _ in range(count):
            msg = await stream.receive(timeout=20)
            received.append(len(msg.text))
            await stream.send(TokenChunk("r", "ok"), timeout=20)

    a, b = Libp2pMesh(os.urandom(32), YAMUX), Libp2pMesh(os.urandom(32), YAMUX)
    b.serve("/helexa/test-bulk/1", handler)
    async with trio.open_nursery() as nursery:
        await nursery.start(a.run)
        addrs = await nursery.start(b.run)
        peer = await a.connect(addrs[0], timeout=10)
        stream = await a.open_stream(peer, "/helexa/test-bulk/1", timeout=10)

        async def send_all():
            for _ in range(count):
                await stream.send(TokenChunk("r", "x" * size), timeout=20)

        async with trio.open_nursery() as inner:
            inner.start_soon(send_all)
            answers = [await stream.receive(timeout=20) for _ in range(count)]
        assert received == [size] * count and len(answers) == count
        nursery.cancel_scope.cancel()


async def test_small_exchanges_on_a_reused_stream_send_no_window_updates():
    # go-yamux's rule on our request streams: no credit goes back until half the window
    # (128 KiB) is read, so a request/response exchange of a few KiB is two frames, not
    # four. Seen from the receiving yamux stream: its window shrinks by exactly what it
    # read, in both directions (py-libp2p's default would have credited each read back).
    import os

    from helexa.mesh.libp2p_mesh import Libp2pMesh
    from helexa.protocol import TokenChunk

    count, size = 40, 1_000
    served = []

    async def handler(stream):
        served.append(stream)
        for _ in range(count):
            msg = await stream.receive(timeout=20)
            await stream.send(TokenChunk("r", msg.text), timeout=20)

    a, b = Libp2pMesh(os.urandom(32), YAMUX), Libp2pMesh(os.urandom(32), YAMUX)
    b.serve("/helexa/test-credit/1", handler)
    async with trio.open_nursery() as nursery:
        await nursery.start(a.run)
        addrs = await nursery.start(b.run)
        peer = await a.connect(addrs[0], timeout=10)
        stream = await a.open_stream(peer, "/helexa/test-credit/1", timeout=10)
        for _ in range(count):
            await stream.send(TokenChunk("r", "x" * size), timeout=20)
            answer = await stream.receive(timeout=20)
            assert answer.text == "x" * size
        asker, server = stream._ns.muxed_stream, served[0]._ns.muxed_stream
        # Each side's own target: yamux's auto-tuning may have grown one and not the other.
        received = asker.target_recv_window - asker.recv_window
        sent = server.target_recv_window - server.recv_window
        assert count * size < received < count * (size + 100)
        assert count * size < sent < count * (size + 100)
        nursery.cancel_scope.cancel()


async def test_liveness_pings_reuse_one_stream_and_a_dropped_one_is_replaced():
    # The ping protocol answers any number of pings on one stream: a stream per ping
    # cost both peers a stream's opening and negotiation every liveness interval.
    import os

    from helexa.mesh.libp2p_mesh import Libp2pMesh

    fast = MeshSettings(direct=False, liveness_interval=0.05)
    a, b = Libp2pMesh(os.urandom(32), fast), Libp2pMesh(os.urandom(32), fast)

    async def pinged(node, n):
        with trio.fail_after(20):
            while node.liveness.pings < n:
                await trio.sleep(0.01)

    async with trio.open_nursery() as nursery:
        await nursery.start(a.run)
        addrs = await nursery.start(b.run)
        await a.connect(addrs[0], timeout=10)
        await pinged(a, 8)
        await pinged(b, 8)
        assert a.liveness.ping_streams == 1 and b.liveness.ping_streams == 1
        # The answering side resets the stream (as a peer's handler does when it gives
        # up on it): the next probe opens another, and the peer is not taken as silent.
        for conn in b._host.get_network().connections.values():
            for c in conn if isinstance(conn, list) else [conn]:
                for stream in list(c.get_streams()):
                    if str(stream.get_protocol()) == "/ipfs/ping/1.0.0":
                        await stream.reset()
        await pinged(a, a.liveness.pings + 8)
        assert a.liveness.ping_streams >= 2 and a.liveness.silent_peers_closed == 0
        nursery.cancel_scope.cancel()


async def test_forgotten_peers_leave_no_entries_in_the_redial_tables():
    """A peer unreachable for ``forget_after`` was dropped from the known peers, but its
    lost-since and next-dial entries stayed for ever: every peer ever announced and gone
    (churn over months) grew the supervisor's tables."""
    import os
    import socket

    from helexa.mesh.libp2p_mesh import Libp2pMesh

    with socket.socket() as s:  # a port nobody listens on: every dial is refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    fast = MeshSettings(direct=False, reconnect_interval=0.02, max_redial_interval=0.05, forget_after=0.3,
                        dial_timeout=1.0)
    node = Libp2pMesh(os.urandom(32), fast)
    gone = [Libp2pMesh(os.urandom(32)).peer_id for _ in range(20)]
    async with trio.open_nursery() as nursery:
        await nursery.start(node.run)
        for peer in gone:
            node.add_addrs(peer, [f"/ip4/127.0.0.1/tcp/{port}"])
        with trio.fail_after(20):
            while len(node._lost_since) < len(gone):  # each was dialled and is lost
                await trio.sleep(0.01)
            while node._known or node._dialing:
                await trio.sleep(0.01)
        await trio.sleep(10 * fast.reconnect_interval)  # supervisor rounds after the forgetting
        assert not node._known and not node._lost_since and not node._next_dial
        nursery.cancel_scope.cancel()
