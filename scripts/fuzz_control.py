#!/usr/bin/env python3
"""Fuzz a cortex's control socket: generated hostile frames (``tests/control/frames.py``)
from many connections, at three points of a connection's life: as its first frame, in place
of the join after a valid hello, and after a real join. A bystander neuron stays joined all
along. The target: 0 crashes (the server task is still serving), 0 tracebacks in the logs,
the bystander still healthy and heartbeating; each hostile connection is closed or answered,
never anyone else's.

    .venv/bin/python scripts/fuzz_control.py                     # 100,000 frames
    .venv/bin/python scripts/fuzz_control.py --frames 20000 --concurrency 32 --seed 7

The cortex runs in this process (a real ControlServer on 127.0.0.1:0, real websockets);
its failed-join throttle is raised out of the way so every frame reaches the handshake
(the throttle has its own tests). Prints JSON: counts by stage and outcome, frames/s,
tracebacks, and the bystander's state. Exits 1 when the target is missed.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import trio
import trio_websocket

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "control"), str(ROOT / "scripts")]

from fuzz_driver import Tracebacks, main, rates, run_frames  # noqa: E402

from helexa.protocol import Hardware, NeuronDescriptor, decode, encode  # noqa: E402
from helexa.protocol.join import NeuronJoin  # noqa: E402
from helexa.roles.cortex.config import CortexConfig  # noqa: E402
from helexa.roles.cortex.control_server import ControlServer  # noqa: E402
from helexa.roles.cortex.fleet import Fleet, Health  # noqa: E402
from helexa.roles.neuron.agent import Neuron  # noqa: E402
from helexa.roles.neuron.config import NeuronConfig  # noqa: E402

TOKEN = "hlx1.fuzz-control-token"
STAGES = ("first", "join", "joined")


def descriptor(node_id: str) -> NeuronDescriptor:
    return NeuronDescriptor(node_id, Hardware(cpu_cores=1, ram_total=1 << 30))


async def one(url: str, stage: str, data: bytes, node_id: str) -> str:
    """Send ``data`` at ``stage`` of a fresh connection; the outcome as a short string."""
    try:
        async with trio_websocket.open_websocket_url(url, max_message_size=1 << 24, connect_timeout=10) as ws:
            with trio.fail_after(10):
                if stage != "first":
                    session = NeuronJoin(TOKEN, descriptor(node_id), timeout=10)
                    (hello,) = session.start()
                    await ws.send_message(encode(hello))
                    frames = session.receive(decode(await ws.get_message()))
                    if stage == "joined":
                        for f in frames:
                            await ws.send_message(encode(f))
                        session.receive(decode(await ws.get_message()))
                        if session.verdict is None or type(session.verdict).__name__ != "Welcomed":
                            return f"join failed: {session.verdict}"
                await ws.send_message(data)
            with trio.move_on_after(0.3 if stage == "joined" else 5):
                try:
                    while True:
                        await ws.get_message()
                except trio_websocket.ConnectionClosed as exc:
                    return f"closed {exc.reason.code}"
            return "left open"
    except trio_websocket.ConnectionClosed as exc:
        return f"closed {exc.reason.code}"
    except trio_websocket.HandshakeError as exc:
        return f"upgrade refused: {type(exc).__name__}"
    except trio.TooSlowError:
        return "no answer in 10 s"
    except OSError as exc:
        return f"socket error: {exc}"


async def fuzz(frames: int, concurrency: int = 32, seed: int = 0, *, log_every: int = 0) -> dict:
    """Run the fuzz; returns the report (see the module docstring)."""
    rng = random.Random(seed)
    with Tracebacks().catching("helexa", "trio-websocket") as catcher:
        config = CortexConfig(control_socket="127.0.0.1:0", heartbeat_interval=0.5, failed_joins_burst=10**9,
                              max_pending_handshakes=4 * concurrency + 16)
        server = ControlServer(config, Fleet(), lambda: TOKEN)
        async with trio.open_nursery() as nursery:
            port = await nursery.start(server.run)
            url = f"ws://127.0.0.1:{port}"
            bystander = Neuron(NeuronConfig(cortex=url, node_id="bystander", join_token=TOKEN))
            nursery.start_soon(bystander.run)
            with trio.fail_after(10):
                await bystander.joined.wait()
            beats0 = server.fleet.get("bystander").heartbeats
            outcomes, took = await run_frames(lambda i, stage, data: one(url, stage, data, f"fz-{i % 64}"),
                                              frames=frames, stages=STAGES, concurrency=concurrency, rng=rng,
                                              log_every=log_every)
            link = server.fleet.get("bystander")
            beats_before = link.heartbeats
            await trio.sleep(1.5)  # it keeps heartbeating
            report = {
                **rates(frames, took, outcomes, catcher), "bystander_healthy": link.health is Health.HEALTHY,
                "bystander_connected": link.connected, "bystander_heartbeats_during": beats_before - beats0,
                "bystander_heartbeats_after": link.heartbeats - beats_before, "refusals": server.refusals,
            }
            nursery.cancel_scope.cancel()
    report["ok"] = (report["tracebacks"] == 0 and report["bystander_healthy"] and report["bystander_connected"]
                    and report["bystander_heartbeats_after"] > 0
                    and not any("no answer" in k or "join failed" in k for k in outcomes))
    return report


if __name__ == "__main__":
    sys.exit(main(__doc__, fuzz))
