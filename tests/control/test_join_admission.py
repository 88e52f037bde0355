"""Who may start a handshake: the pending-handshake cap against a flood of half-open
connections, and the per-address throttle on failed join proofs. The bookkeeping is tested
as pure code; the cortex's use of it over real sockets on 127.0.0.1, under the virtual clock."""

from __future__ import annotations

import pytest
import trio

from helexa.protocol import Hardware, NeuronDescriptor
from helexa.protocol.join import NeuronJoin, Refusal, Welcomed
from helexa.roles.cortex.config import CortexConfig
from helexa.roles.cortex.control_server import ControlServer
from helexa.roles.cortex.fleet import Fleet
from helexa.transport import ChannelClosed
from helexa.transport.admission import BLOCKED_NOW, FailedJoins, PendingHandshakes, host_of
from helexa.transport.handshake import exchange
from helexa.transport.ws_client import handshake

TOKEN = "hlx1.admission-token"


# --- the bookkeeping ---------------------------------------------------------------------


def test_pending_handshakes_refuse_past_the_limit_and_forget_stale_entries() -> None:
    pending = PendingHandshakes(2, stale_after=10.0)
    assert pending.admit("a:1", 0.0) and pending.admit("a:2", 1.0)
    assert not pending.admit("a:3", 2.0) and pending.refused == 1
    pending.release("a:1")
    pending.release("a:1")  # idempotent
    assert pending.admit("a:3", 3.0) and len(pending) == 2
    assert not pending.admit("a:4", 10.9)  # a:2 is 9.9 s old: still counted
    assert pending.admit("a:4", 11.0) and len(pending) == 2  # a:2 forgotten at 10 s


def test_failed_joins_block_an_address_at_the_burst_and_drain_at_the_rate() -> None:
    throttle = FailedJoins(burst=3, per_minute=6.0)  # one forgiven every 10 s
    for t in (0.0, 1.0):
        throttle.failed("10.0.0.1", t)
        assert throttle.retry_after("10.0.0.1", t) == 0.0
    throttle.failed("10.0.0.1", 2.0)  # level 3 - 0.2 = 2.8 drained: still under 3
    assert throttle.retry_after("10.0.0.1", 2.0) == 0.0
    throttle.failed("10.0.0.1", 2.0)  # 3.8: blocked until it drains under 3, 8 s later
    assert throttle.retry_after("10.0.0.1", 2.0) == pytest.approx(8.0)
    assert throttle.retry_after("10.0.0.1", 6.0) == pytest.approx(4.0)
    assert throttle.retry_after("10.0.0.1", 10.0) == BLOCKED_NOW  # at 3 exactly: still blocked, this instant
    assert throttle.retry_after("10.0.0.1", 10.01) == 0.0
    assert throttle.retry_after("10.0.0.2", 2.0) == 0.0  # other addresses are untouched


def test_failed_joins_remember_a_bounded_number_of_addresses() -> None:
    throttle = FailedJoins(burst=1, per_minute=1.0, capacity=3)
    for i in range(5):
        throttle.failed(f"10.0.0.{i}", 0.0)
    assert len(throttle) == 3
    assert throttle.retry_after("10.0.0.0", 0.0) == 0.0 and throttle.retry_after("10.0.0.4", 0.0) > 0


@pytest.mark.parametrize(("remote", "host"), [("127.0.0.1:5000", "127.0.0.1"), ("[::1]:80", "::1"),
                                              ("::1:80", "::1"), ("memory:a", "memory:a")])
def test_host_of_drops_the_port(remote: str, host: str) -> None:
    assert host_of(remote) == host


# --- the cortex --------------------------------------------------------------------------


async def start(nursery, **fields) -> tuple[ControlServer, int]:
    server = ControlServer(CortexConfig(control_socket="127.0.0.1:0", **fields), Fleet(), lambda: TOKEN)
    return server, await nursery.start(server.run)


async def join(port: int, node_id: str, token: str, *, source: str = "127.0.0.1") -> object:
    """One real join over a websocket from ``source``: the verdict, or the close code the
    cortex answered with instead."""
    tcp = await trio.open_tcp_stream("127.0.0.1", port, local_address=source)
    with trio.fail_after(10):
        channel = await handshake(tcp, host=f"127.0.0.1:{port}", max_frame=1 << 20, remote=f"127.0.0.1:{port}")
    session = NeuronJoin(token, NeuronDescriptor(node_id, Hardware(cpu_cores=1, ram_total=1 << 30)), timeout=10)
    try:
        await exchange(channel, session, session.start())
        return session.verdict
    except ChannelClosed as exc:
        return exc.code
    finally:
        await channel.aclose()


async def test_an_address_that_fails_its_proof_too_often_is_refused_unread_until_it_drains(
        nursery, autojump_clock) -> None:
    server, port = await start(nursery, failed_joins_burst=3, failed_joins_per_minute=6.0)
    for _ in range(3):
        verdict = await join(port, "intruder", "hlx1.wrong")
        assert isinstance(verdict, Refusal) and verdict.code == "unauthorized"
    t0 = trio.current_time()
    assert await join(port, "intruder", "hlx1.wrong") == 1013  # try again later, its join unread
    assert server.refusals == 3 and server.throttled == 1
    # Another address is not slowed at all.
    assert isinstance(await join(port, "elsewhere", TOKEN, source="127.0.0.2"), Welcomed)
    # The level (4 at t0, less 0.1/s) is under the burst 10 s after t0: the proof is
    # judged in full again (a refusal saying why, not a screen's 1013).
    await trio.sleep(10.0 - (trio.current_time() - t0) + 0.01)
    verdict = await join(port, "intruder", "hlx1.wrong")
    assert isinstance(verdict, Refusal) and verdict.code == "unauthorized"
    assert server.throttled == 1


async def test_a_neuron_with_the_token_joins_at_once_from_an_address_that_failed_many_joins(
        nursery, autojump_clock) -> None:
    """A shared NAT or host: others' wrong tokens earn the address its throttle, and a
    neuron with the token behind the same address still joins at once, each time."""
    server, port = await start(nursery, failed_joins_burst=3, failed_joins_per_minute=6.0)
    verdicts = [await join(port, "intruder", "hlx1.wrong") for _ in range(50)]
    assert [type(v) for v in verdicts[:3]] == [Refusal] * 3 and verdicts[3:] == [1013] * 47
    assert server.throttled == 47
    for node_id in ("good", "intruder"):  # even under the node id the wrong tokens used
        t0 = trio.current_time()
        assert isinstance(await join(port, node_id, TOKEN), Welcomed)
        assert trio.current_time() == t0
    assert await join(port, "intruder", "hlx1.wrong") == 1013  # the wrong ones are still screened


async def test_a_screened_join_is_refused_from_its_first_bytes() -> None:
    """The screen reads a join's proof from the frame's opening bytes and nothing more: a
    join with a megabyte of configs behind a wrong proof costs an HMAC, not a decode."""
    from helexa.protocol import ModelConfig, auth, encode
    from helexa.protocol.join import CortexJoin, RecentNonces
    from helexa.protocol.join_screen import HELLO_SCREEN_BYTES
    from helexa.protocol.messages import Hello, Join

    session = CortexJoin(lambda: TOKEN, recent=RecentNonces(), heartbeat_interval=1.0, timeout=10)
    hello = Hello("n1", 1, 3, b"\x01" * 32)
    assert session.screen(encode(hello)) is None
    assert "hello of" in session.screen(b"\x80" * (HELLO_SCREEN_BYTES + 1))
    (challenge,) = session.receive(hello)
    descriptor = NeuronDescriptor("n1", Hardware(cpu_cores=1, ram_total=1 << 30))
    configs = tuple(ModelConfig(f"m{i}", "synthetic", metadata={"pad": "x" * 1000}) for i in range(1000))
    assert session.screen(encode(Join(b"\x00" * 32, descriptor, configs=configs))) == (
        "a join proof that does not match this cortex's join token")
    assert session.screen(b"\x81\xa1kx") == "a join that does not open with its proof"
    assert session.screen(b"\xc1") is not None
    good = Join(auth.join_proof(TOKEN, challenge.nonce, hello.nonce, "n1"), descriptor, configs=configs)
    assert session.screen(encode(good)) is None


async def test_the_logged_block_is_the_real_one(nursery, autojump_clock, caplog) -> None:
    server, port = await start(nursery, failed_joins_burst=3, failed_joins_per_minute=6.0)  # 0.1 forgiven a second
    for _ in range(3):  # a second apart: the level is 2.8 after the third, under the burst
        assert isinstance(await join(port, "intruder", "hlx1.wrong"), Refusal)
        await trio.sleep(1.0)
    assert "refused unread" not in caplog.text
    assert isinstance(await join(port, "intruder", "hlx1.wrong"), Refusal)  # 2.7 + 1: blocked 7 s
    failed_at = trio.current_time()
    logged = [r.getMessage() for r in caplog.records if "refused unread for" in r.getMessage()]
    assert len(logged) == 1 and logged[0].endswith("refused unread for 7.0s"), logged
    await trio.sleep(6.9 - (trio.current_time() - failed_at))
    assert await join(port, "intruder", "hlx1.wrong") == 1013  # still screened just before the logged figure
    assert server.throttled == 1
    # That screened failure counted (level 3.0 + 1 at 6.9 s: screened 10.1 s more); a join
    # with the token was never kept out.
    assert isinstance(await join(port, "good", TOKEN), Welcomed)
    await trio.sleep(6.9 + 11.1 - (trio.current_time() - failed_at))
    assert isinstance(await join(port, "intruder", "hlx1.wrong"), Refusal)  # heard in full again


async def test_a_flood_of_half_open_connections_holds_at_most_the_cap_and_ends_at_the_deadline(
        nursery, autojump_clock) -> None:
    server, port = await start(nursery, max_pending_handshakes=8, handshake_timeout=5.0)
    silent = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(40)]
    await trio.sleep(0.1)
    assert len(server.pending) == 8 and server.pending.refused == 32
    # The refused ones were closed at once: they read end-of-file; the 8 admitted are
    # closed at the handshake deadline.
    closed_at: list[float] = []

    async def until_closed(stream: trio.SocketStream) -> None:
        with trio.fail_after(30):
            while await stream.receive_some(1024):
                pass
        closed_at.append(trio.current_time())

    t0 = trio.current_time()
    async with trio.open_nursery() as readers:
        for stream in silent:
            readers.start_soon(until_closed, stream)
    refused_times = [t - t0 for t in closed_at if t - t0 < 1]
    admitted_times = [t - t0 for t in closed_at if t - t0 >= 1]
    assert len(refused_times) == 32 and len(admitted_times) == 8
    assert all(t == pytest.approx(5.0 - 0.1, abs=0.01) for t in admitted_times)
    # Then a neuron joins at once.
    assert isinstance(await join(port, "after-the-flood", TOKEN), Welcomed)
    for stream in silent:
        await stream.aclose()


async def test_a_connection_reset_before_the_cortex_reads_its_upgrade_closes_only_itself(
        nursery, autojump_clock) -> None:
    # Seen in a join storm: a neuron gave up (its handshake deadline passed while the
    # cortex was busy) and its connection was reset before the cortex read its upgrade;
    # the peer's address could no longer be read, and that error took the cortex down.
    import socket
    import struct

    server, port = await start(nursery)
    for _ in range(3):
        # Blocking calls with no checkpoint between them: the reset lands before the
        # cortex's accept loop runs.
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()
    await trio.sleep(0.5)
    assert isinstance(await join(port, "after-the-resets", TOKEN), Welcomed)
    assert len(server.pending) == 0


async def test_a_neuron_turned_away_at_the_cap_redials_with_its_backoff_and_joins_when_a_slot_frees(
        nursery, autojump_clock) -> None:
    # In a join storm the cap turns joins away by closing them at accept; the neuron is
    # not dropped: it redials on its own backoff with jitter, so a storm spreads out.
    import random

    from helexa.roles.neuron.agent import Neuron
    from helexa.roles.neuron.config import NeuronConfig
    from helexa.roles.neuron.connection import backoff_delays

    server, port = await start(nursery, max_pending_handshakes=2, handshake_timeout=5.0)
    silent = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(2)]  # both slots, until 5 s
    await trio.sleep(0.1)
    t0 = trio.current_time()
    neuron = Neuron(NeuronConfig(cortex=f"ws://127.0.0.1:{port}", node_id="storm-1", join_token=TOKEN,
                                 reconnect_initial=0.5, reconnect_max=30.0), rng=random.Random(3))
    nursery.start_soon(neuron.run)
    await neuron.joined.wait()
    # Its dials: at t0, then after each backoff delay, until the first one at or after the
    # moment the silent connections' slots were forgotten (their deadline, 5 s after 0).
    delays = backoff_delays(0.5, 30.0, random.Random(3))
    dials = [t0]
    while dials[-1] < 5.0:
        dials.append(dials[-1] + delays())
    assert trio.current_time() == pytest.approx(dials[-1], abs=0.01)
    assert server.pending.refused == len(dials) - 1 and "storm-1" in server.fleet
    for stream in silent:
        await stream.aclose()


def test_late_handshakes_halve_the_pending_limit_and_on_time_ones_raise_it_back() -> None:
    pending = PendingHandshakes(100, stale_after=10.0, floor=10)
    for i in range(100):
        assert pending.admit(f"a:{i}", 0.0)
    pending.finished("a:0", 4.0)  # on time (under half the deadline): already at the limit
    assert pending.allowed == 100 and pending.late == 0
    pending.finished("a:1", 6.0)  # late: halved
    assert pending.allowed == 50 and pending.late == 1
    pending.finished("a:2", 6.5)  # late again, within a quarter of the deadline of the cut
    assert pending.allowed == 50 and pending.late == 2
    pending.finished("a:3", 8.5)  # 2.5 s after the cut
    assert pending.allowed == 25
    assert not pending.admit("b:0", 8.5)  # 96 still pending, 25 allowed
    for i in range(4, 90):
        pending.finished(f"a:{i}", 9.0)
    pending.finished("a:90", 11.0)  # the floor holds
    pending.finished("a:91", 13.5)
    pending.finished("a:92", 16.0)
    assert pending.allowed == 10
    pending.finished("a:92", 16.0)  # idempotent
    for i in range(5):
        assert pending.admit(f"c:{i}", 20.0)
        pending.finished(f"c:{i}", 20.5)
    assert pending.allowed == 15 and pending.refused == 1
