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

import argparse
import collections
import json
import logging
import random
import sys
import time
from pathlib import Path

import trio
import trio_websocket

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "control")]

from frames import frame as hostile_frame  # noqa: E402

from helexa.protocol import Hardware, NeuronDescriptor, decode, encode  # noqa: E402
from helexa.protocol.join import NeuronJoin  # noqa: E402
from helexa.roles.cortex.config import CortexConfig  # noqa: E402
from helexa.roles.cortex.control_server import ControlServer  # noqa: E402
from helexa.roles.cortex.fleet import Fleet, Health  # noqa: E402
from helexa.roles.neuron.agent import Neuron  # noqa: E402
from helexa.roles.neuron.config import NeuronConfig  # noqa: E402

TOKEN = "hlx1.fuzz-control-token"
STAGES = ("first", "join", "joined")


class Tracebacks(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info or "Traceback" in record.getMessage():
            self.records.append(self.format(record))


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


async def fuzz(frames: int, concurrency: int = 32, seed: int = 0, *, log_every: float = 0) -> dict:
    """Run the fuzz; returns the report (see the module docstring)."""
    rng = random.Random(seed)
    catcher = Tracebacks()
    logging.getLogger("helexa").addHandler(catcher)
    logging.getLogger("trio-websocket").addHandler(catcher)
    outcomes: collections.Counter[str] = collections.Counter()
    try:
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
            send, receive = trio.open_memory_channel[tuple[int, str, bytes]](concurrency)
            t0 = time.perf_counter()

            async def produce() -> None:
                async with send:
                    for i in range(frames):
                        await send.send((i, STAGES[i % 3], hostile_frame(rng)))

            async def work() -> None:
                async for i, stage, data in receive:
                    outcomes[f"{stage}: {await one(url, stage, data, f'fz-{i % 64}')}"] += 1
                    if log_every and i and i % int(log_every) == 0:
                        print(f"{i} frames, {i / (time.perf_counter() - t0):.0f}/s", file=sys.stderr)

            async with trio.open_nursery() as workers:
                workers.start_soon(produce)
                for _ in range(concurrency):
                    workers.start_soon(work)
            took = time.perf_counter() - t0
            link = server.fleet.get("bystander")
            beats_before = link.heartbeats
            await trio.sleep(1.5)  # it keeps heartbeating
            report = {
                "frames": frames, "seconds": round(took, 1), "frames_per_second": round(frames / took),
                "outcomes": dict(sorted(outcomes.items())), "tracebacks": len(catcher.records),
                "traceback_examples": catcher.records[:3], "bystander_healthy": link.health is Health.HEALTHY,
                "bystander_connected": link.connected, "bystander_heartbeats_during": beats_before - beats0,
                "bystander_heartbeats_after": link.heartbeats - beats_before, "refusals": server.refusals,
            }
            nursery.cancel_scope.cancel()
    finally:
        logging.getLogger("helexa").removeHandler(catcher)
        logging.getLogger("trio-websocket").removeHandler(catcher)
    report["ok"] = (report["tracebacks"] == 0 and report["bystander_healthy"] and report["bystander_connected"]
                    and report["bystander_heartbeats_after"] > 0
                    and not any("no answer" in k or "join failed" in k for k in outcomes))
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=100_000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    report = trio.run(lambda: fuzz(args.frames, args.concurrency, args.seed, log_every=5000))
    print(json.dumps(report, indent=1))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
