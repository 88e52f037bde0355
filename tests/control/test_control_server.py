"""The control plane between real trio tasks: a ControlServer and Neuron agents talking over
real websockets on 127.0.0.1 (port 0) or the in-memory transport (still through the codec)."""

from __future__ import annotations

from contextlib import asynccontextmanager

import msgpack
import pytest
import trio
import trio_websocket

from helexa.protocol import (
    Challenge,
    Fault,
    Hardware,
    Hello,
    Join,
    ModelConfig,
    NeuronDescriptor,
    Refused,
    UpsertModelConfig,
    auth,
    decode,
    encode,
)
from helexa.protocol.join import NeuronJoin, Welcomed
from helexa.roles.cortex.config import CortexConfig
from helexa.roles.cortex.control_server import ControlServer
from helexa.roles.cortex.fleet import Fleet, Health
from helexa.roles.neuron.agent import JoinRefused, Neuron, backoff_delays
from helexa.roles.neuron.config import NeuronConfig
from helexa.transport import ChannelClosed
from helexa.transport.handshake import exchange
from helexa.transport.memory import channel_pair

TOKEN = "hlx1.test-token"


async def start_cortex(nursery, **overrides) -> tuple[ControlServer, str]:
    settings = CortexConfig(control_socket="127.0.0.1:0", **{"heartbeat_interval": 0.2, **overrides})
    server = ControlServer(settings, Fleet(), lambda: TOKEN)
    port = await nursery.start(server.run)
    return server, f"ws://127.0.0.1:{port}"


def config(url: str, node_id: str = "n1", token: str = TOKEN, **kw) -> NeuronConfig:
    return NeuronConfig(cortex=url, node_id=node_id, join_token=token, **kw)


def neuron_for(url: str, node_id: str = "n1", token: str = TOKEN, **kw) -> Neuron:
    return Neuron(config(url, node_id, token, **{"reconnect_initial": 0.05, "reconnect_max": 0.2, **kw}))


def descriptor(node_id: str) -> NeuronDescriptor:
    return NeuronDescriptor(node_id, Hardware(cpu_cores=1, ram_total=1 << 30))


async def joined_with_synthetic_model(nursery):
    """A cortex, a neuron joined to it, and a synthetic model configured (not loaded)."""
    server, url = await start_cortex(nursery)
    neuron = neuron_for(url)
    nursery.start_soon(neuron.run)
    await wait_until(lambda: "n1" in server.fleet)
    link = server.fleet.get("n1")
    await link.provision(UpsertModelConfig("c1", ModelConfig("s", "synthetic")), timeout=5)
    return server, neuron, link


async def join_by_hand(server: ControlServer, nursery, node_id: str):
    """Join ``server`` over an in-memory channel with the neuron's own join session, then
    stay silent (no heartbeats): returns the neuron's side of the channel."""
    cortex_side, neuron_side = channel_pair()
    nursery.start_soon(server.handle, cortex_side)
    session = NeuronJoin(TOKEN, descriptor(node_id), timeout=10)
    assert await exchange(neuron_side, session, session.start()) == []
    assert isinstance(session.verdict, Welcomed)
    return neuron_side


async def wait_until(predicate, timeout: float = 20.0) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.01)


async def test_neuron_joins_and_heartbeats_update_the_fleet(nursery):
    server, url = await start_cortex(nursery)
    neuron = neuron_for(url, labels={"rack": "a"})
    nursery.start_soon(neuron.run)
    await wait_until(lambda: "n1" in server.fleet)
    link = server.fleet.get("n1")
    assert link.health is Health.HEALTHY
    assert link.descriptor.labels == {"rack": "a"}
    assert link.descriptor.hardware.cpu_cores >= 1
    first = link.heartbeats
    await wait_until(lambda: link.heartbeats >= first + 2)
    assert link.metrics.ram_total > 0
    snapshot = server.fleet.snapshot()
    assert snapshot["neurons"][0]["node_id"] == "n1"
    await link.ping(7, timeout=5)  # the neuron answers the cortex's liveness probe


async def test_wrong_token_is_refused_and_the_cortex_carries_on(nursery):
    server, url = await start_cortex(nursery)
    good = neuron_for(url, "good")
    nursery.start_soon(good.run)
    await wait_until(lambda: "good" in server.fleet)
    with pytest.raises(JoinRefused) as refused:
        await neuron_for(url, "intruder", token="hlx1.wrong").run()
    assert refused.value.code == "unauthorized"
    assert "intruder" not in server.fleet
    assert server.refusals == 1
    link = server.fleet.get("good")
    beats = link.heartbeats
    await wait_until(lambda: link.heartbeats > beats)
    assert link.health is Health.HEALTHY


async def test_incompatible_version_is_refused_naming_both_versions(nursery):
    _, url = await start_cortex(nursery)
    async with trio_websocket.open_websocket_url(url) as ws:
        await ws.send_message(encode(Hello("future", 7, 9, auth.new_nonce())))
        reply = decode(await ws.get_message())
    assert isinstance(reply, Refused)
    assert reply.code == "version_mismatch"
    assert "7..9" in reply.reason and "1..3" in reply.reason  # JOIN_VERSIONS: 2 carries the identity key, 3 the cache


async def test_the_token_never_crosses_the_wire(nursery):
    _, url = await start_cortex(nursery)
    frames: list[bytes] = []
    async with trio_websocket.open_websocket_url(url) as ws:
        nonce = auth.new_nonce()
        hello = encode(Hello("n1", 1, 1, nonce))
        await ws.send_message(hello)
        challenge = decode(await ws.get_message())
        assert isinstance(challenge, Challenge)
        join = encode(Join(auth.join_proof(TOKEN, challenge.nonce, nonce, "n1"), descriptor("n1")))
        frames += [hello, join]
        await ws.send_message(join)
        frames.append(await ws.get_message())
    assert all(TOKEN.encode() not in f for f in frames)


@pytest.mark.parametrize(
    "frame",
    [
        b"\xc1\xc1\xc1",  # not msgpack
        msgpack.packb({"k": "hello", "v": 1, "node_id": 5}),  # wrong field type
        msgpack.packb({"k": "warp_drive", "v": 1}),  # unknown kind
        encode(Hello("n9", 1, 1, b"x" * 32))[:-3],  # truncated
        b"\x00" * (70 * 1024),  # oversized for this cortex
    ],
    ids=["garbage", "wrong-type", "unknown-kind", "truncated", "oversized"],
)
async def test_bad_frames_close_only_the_offending_connection(nursery, frame):
    server, url = await start_cortex(nursery, max_frame_bytes=64 * 1024)
    neuron = neuron_for(url, "bystander")
    nursery.start_soon(neuron.run)
    await wait_until(lambda: "bystander" in server.fleet)
    async with trio_websocket.open_websocket_url(url, max_message_size=1 << 20) as ws:
        await ws.send_message(frame)
        with trio.fail_after(5):
            with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                while True:
                    await ws.get_message()
    assert closed.value.reason.code in (1002, 1009)
    link = server.fleet.get("bystander")
    beats = link.heartbeats
    await wait_until(lambda: link.heartbeats > beats)
    assert link.connected and link.health is Health.HEALTHY


async def test_provisioning_round_trip_changes_state_on_both_sides(nursery):
    server, url = await start_cortex(nursery)
    neuron = neuron_for(url)
    nursery.start_soon(neuron.run)
    await wait_until(lambda: "n1" in server.fleet)
    link = server.fleet.get("n1")
    resp = await link.provision(UpsertModelConfig("c1", ModelConfig("m1", "no_such_backend")), timeout=5)
    assert resp.ok and resp.status.state.value == "configured"
    assert neuron.registry.status("m1").state.value == "configured"
    assert link.models["m1"].state.value == "configured"


# --- timing, on the virtual clock ------------------------------------------------------


def memory_connector(server: ControlServer, nursery):
    """Connect neurons to ``server`` through in-memory channels (the codec still runs)."""

    @asynccontextmanager
    async def connect(url):
        cortex_side, neuron_side = channel_pair()
        nursery.start_soon(server.handle, cortex_side)
        try:
            yield neuron_side
        finally:
            await neuron_side.aclose()

    return connect


async def test_missed_heartbeats_mark_unhealthy_then_removed_at_exact_times(nursery, autojump_clock):
    settings = CortexConfig(control_socket="127.0.0.1:0", heartbeat_interval=1.0, missed_heartbeats=3, remove_after=30.0)
    server = ControlServer(settings, Fleet(), lambda: TOKEN)
    nursery.start_soon(server._watchdog)
    neuron = Neuron(config("ws://memory"), connector=memory_connector(server, nursery))
    neuron_scope = trio.CancelScope()
    nursery.start_soon(_run_in, neuron_scope, neuron.run)
    await neuron.joined.wait()
    await trio.sleep(10)
    link = server.fleet.get("n1")
    assert link.health is Health.HEALTHY
    assert link.heartbeats >= 10
    neuron_scope.cancel()
    # The neuron went silent at t=10 (its in-memory channel was closed at once).
    start = trio.current_time()
    await wait_until(lambda: server.fleet.get("n1") is not None and not server.fleet.get("n1").connected, 100)
    assert server.fleet.get("n1").health is Health.UNHEALTHY
    lost_at = server.fleet.get("n1").disconnected_at
    assert lost_at == pytest.approx(start, abs=0.02)
    while server.fleet.get("n1") is not None:
        await server.fleet.wait_changed()
    # Removed at the first watchdog tick (every 0.5 s) at least 30 s after the drop.
    assert 30.0 <= trio.current_time() - lost_at <= 30.5


async def _run_in(scope: trio.CancelScope, fn) -> None:
    with scope:
        await fn()


async def test_a_silent_connection_is_declared_unhealthy_after_three_intervals(nursery, autojump_clock):
    settings = CortexConfig(control_socket="127.0.0.1:0", heartbeat_interval=1.0, missed_heartbeats=3, remove_after=30.0)
    server = ControlServer(settings, Fleet(), lambda: TOKEN)
    nursery.start_soon(server._watchdog)
    await join_by_hand(server, nursery, "mute")
    joined_at = trio.current_time()
    link = server.fleet.get("mute")
    while link.health is not Health.UNHEALTHY:
        await server.fleet.wait_changed()
    # Declared at the first watchdog tick (every 0.5 s) after 3 s of silence.
    assert trio.current_time() - joined_at == pytest.approx(3.5)


def test_backoff_grows_exponentially_with_jitter_and_caps():
    import random

    delays = backoff_delays(0.5, 8.0, random.Random(1))
    got = [delays() for _ in range(8)]
    bases = [0.5, 1, 2, 4, 8, 8, 8, 8]
    for d, base in zip(got, bases):
        assert base / 2 <= d <= base


async def test_neuron_reconnects_with_backoff_after_a_drop(nursery, autojump_clock):
    settings = CortexConfig(control_socket="127.0.0.1:0", heartbeat_interval=1.0)
    server = ControlServer(settings, Fleet(), lambda: TOKEN)
    attempts: list[float] = []
    inner = memory_connector(server, nursery)

    @asynccontextmanager
    async def flaky(url):
        attempts.append(trio.current_time())
        if len(attempts) <= 3:
            raise __import__("helexa.transport", fromlist=["ConnectFailed"]).ConnectFailed("refused")
        async with inner(url) as ch:
            yield ch

    import random

    neuron = Neuron(
        config("ws://memory", reconnect_initial=1.0, reconnect_max=30.0),
        connector=flaky,
        rng=random.Random(7),
    )
    nursery.start_soon(neuron.run)
    await neuron.joined.wait()
    gaps = [b - a for a, b in zip(attempts, attempts[1:])]
    expected = backoff_delays(1.0, 30.0, random.Random(7))
    assert gaps == pytest.approx([expected() for _ in range(3)])


async def test_load_model_round_trip_changes_state_on_both_sides(nursery):
    from helexa.protocol import LoadModel, ModelState, UnloadModel

    server, neuron, link = await joined_with_synthetic_model(nursery)
    progress = []
    resp = await link.provision(LoadModel("c2", "s"), timeout=5, on_progress=progress.append)
    assert resp.ok and resp.status.state is ModelState.LOADED
    assert link.models["s"].state is ModelState.LOADED
    assert neuron.registry.status("s").state is ModelState.LOADED
    resp = await link.provision(UnloadModel("c3", "s"), timeout=5)
    assert resp.ok and link.models["s"].state is ModelState.CONFIGURED


async def test_a_rejoining_neuron_reports_what_it_already_holds(nursery):
    from helexa.protocol import LoadModel, ModelState

    server, neuron, link = await joined_with_synthetic_model(nursery)
    await link.provision(LoadModel("c2", "s"), timeout=5)
    # A new cortex on another port stands in for a restarted one: the neuron's view of
    # what it holds travels with its join.
    server2, url2 = await start_cortex(nursery)
    neuron2_view = Neuron(config(url2, reconnect_initial=0.05), registry=neuron.registry)
    nursery.start_soon(neuron2_view.run)
    await wait_until(lambda: "n1" in server2.fleet)
    rejoined = server2.fleet.get("n1")
    assert rejoined.models["s"].state is ModelState.LOADED
    assert rejoined.configs["s"].backend_kind == "synthetic"


async def test_a_neuron_silent_while_it_loads_is_unhealthy_like_any_other(nursery, autojump_clock):
    """Models load in worker processes, so a loading neuron heartbeats: an outstanding load
    buys a silent neuron no extra time."""
    from helexa.protocol import LoadModel
    from helexa.roles.cortex.fleet import CommandTimeout, NeuronGone

    settings = CortexConfig(control_socket="127.0.0.1:0", heartbeat_interval=1.0, missed_heartbeats=3)
    server = ControlServer(settings, Fleet(), lambda: TOKEN)
    nursery.start_soon(server._watchdog)
    await join_by_hand(server, nursery, "slow")
    link = server.fleet.get("slow")
    start = trio.current_time()

    async def load():
        with pytest.raises((CommandTimeout, NeuronGone)):
            await link.provision(LoadModel("c1", "big"), timeout=60)

    nursery.start_soon(load)
    while link.health is not Health.UNHEALTHY:
        await server.fleet.wait_changed()
    assert trio.current_time() - start == pytest.approx(3.5)  # 3 intervals, seen at the next half-interval check


# --- the handshake's shell on the cortex --------------------------------------------------


@pytest.mark.parametrize("says", [[], [Hello("n1", 1, 1, b"h" * 32)]], ids=["nothing", "only-hello"])
async def test_a_neuron_silent_in_the_handshake_is_dropped_at_the_deadline(autojump_clock, says):
    server = ControlServer(CortexConfig(control_socket="127.0.0.1:0", handshake_timeout=7.0), Fleet(), lambda: TOKEN)
    cortex_side, neuron_side = channel_pair()
    for msg in says:
        await neuron_side.send(msg)
    await server.handle(cortex_side)
    assert trio.current_time() == pytest.approx(7.0)
    with pytest.raises(ChannelClosed):
        while True:
            await neuron_side.receive()  # the challenge (if any), then the close
    assert len(server.fleet) == 0 and server.refusals == 0


async def test_a_replayed_hello_nonce_is_refused_on_another_connection(nursery, autojump_clock):
    server = ControlServer(CortexConfig(control_socket="127.0.0.1:0"), Fleet(), lambda: TOKEN)
    nonce = auth.new_nonce()
    first_cortex, first = channel_pair()
    nursery.start_soon(server.handle, first_cortex)
    await first.send(Hello("n1", 1, 1, nonce))
    assert isinstance(await first.receive(), Challenge)
    replay_cortex, replay = channel_pair()
    nursery.start_soon(server.handle, replay_cortex)
    await replay.send(Hello("n1", 1, 1, nonce))
    reply = await replay.receive()
    assert isinstance(reply, Refused) and reply.code == "replayed_nonce"
    assert server.refusals == 1


async def test_an_unexpected_frame_in_the_handshake_gets_a_fault_and_a_close(autojump_clock):
    server = ControlServer(CortexConfig(control_socket="127.0.0.1:0"), Fleet(), lambda: TOKEN)
    cortex_side, neuron_side = channel_pair()
    await neuron_side.send(UpsertModelConfig("c1", ModelConfig("m", "synthetic")))
    await server.handle(cortex_side)
    fault = await neuron_side.receive()
    assert isinstance(fault, Fault) and fault.message == "expected hello, got UpsertModelConfig"
    with pytest.raises(ChannelClosed):
        await neuron_side.receive()
    assert trio.current_time() == 0.0 and server.refusals == 0
