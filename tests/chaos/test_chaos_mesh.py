"""A peer cortex frozen with SIGSTOP while another operator streams from it: the mesh's
liveness ping finds it silent in seconds (before, the asker waited out the 60 s idle
deadline), the stream ends with an error, and after SIGCONT the peer is reached again.

Peers are ``tests/mesh/mesh_node.py`` processes: a real libp2p host and the real
:class:`Federation` each (the asker routes, the server streams 200 tokens, one per 50 ms)."""

from __future__ import annotations

import signal
import time

import pytest
import trio

from nodes import NodeProcess

pytestmark = pytest.mark.slow


async def test_a_frozen_peer_is_detected_by_the_mesh_liveness_check_and_reached_after_it_thaws(
        nursery, tmp_path, figure) -> None:
    asker = await NodeProcess.start(nursery, tmp_path / "asker", "--federation")
    server = await NodeProcess.start(nursery, tmp_path / "server", "--federation", "--serve", "--tokens", "200",
                                     "--token-delay", "0.05", "--bootstrap", asker.addrs[0])
    await asker.call("wait_route", model="tiny", timeout=20)
    result: dict = {}

    async def route() -> None:
        result.update(await asker.call("route", model="tiny", rid="r1", timeout=90))
        result["ended"] = time.monotonic()

    async with trio.open_nursery() as inner:
        inner.start_soon(route)
        await trio.sleep(1.0)
        server.proc.send_signal(signal.SIGSTOP)
        frozen = time.monotonic()
    detect = result["ended"] - frozen
    assert result["error_kind"] and result["error_kind"].startswith("PeerVanished"), result
    assert 0 < len(result["texts"]) < 200
    assert detect < 10, f"the frozen peer was noticed after {detect:.1f}s"
    figure("frozen peer: time to detect (stream error after SIGSTOP)", detect, "s")
    figure("frozen peer: tokens received before the freeze", len(result["texts"]))

    server.proc.send_signal(signal.SIGCONT)
    thawed = time.monotonic()
    attempts = 0
    with trio.fail_after(60):
        while True:
            attempts += 1
            await asker.call("wait_route", model="tiny", timeout=30)
            again = await asker.call("route", model="tiny", rid=f"r{attempts + 1}", timeout=60)
            if again["error_kind"] is None:
                break
            await trio.sleep(0.2)  # reconnecting: "no valid connections" until the redial lands
    assert again["texts"][-1] == "<stop>"
    figure("frozen peer: attempts that failed while it reconnected", attempts - 1)
    figure("frozen peer: time to recover (SIGCONT to a new answer completed, of which streaming its 200 tokens is 10 s)",
           time.monotonic() - thawed, "s")
    for node in (asker, server):
        await node.stop()
