"""Announcement propagation across N cortex-like libp2p nodes, each its own process.

    .venv/bin/python benchmarks/mesh_bench.py --nodes 16 --rounds 20

Every node runs the libp2p mesh and the Federation service (so, like a cortex, it
announces every few seconds and dials the peers it learns of). Node i > 0 bootstraps
from one random earlier node. Once all are connected, node 0 publishes a 1 KiB message
(the size of an announcement) per round; the figure is the time until the *last* of the
other nodes has it (wall clocks of one machine), reported as p50 / p90 / max over rounds.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "mesh"))
from nodes import NodeProcess  # noqa: E402


async def main(n: int, rounds: int, seed: int) -> None:
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory() as tmp:
        async with trio.open_nursery() as nursery:
            t0 = time.monotonic()
            nodes: list[NodeProcess] = [await NodeProcess.start(nursery, Path(tmp) / "n0", "--federation",
                                                                "--announce-interval", "5")]

            async def launch(i: int) -> None:
                parent = nodes[rng.randrange(len(nodes))]
                node = await NodeProcess.start(nursery, Path(tmp) / f"n{i}", "--federation",
                                               "--announce-interval", "5", "--bootstrap", parent.addrs[0], timeout=120)
                nodes.append(node)

            # start in waves of 4 so 2 cores are not swamped by 15 imports at once
            for wave in range(1, n, 4):
                async with trio.open_nursery() as starting:
                    for i in range(wave, min(n, wave + 4)):
                        starting.start_soon(launch, i)
            print(f"{n} nodes up in {time.monotonic() - t0:.1f}s", flush=True)
            first = nodes[0]
            others = nodes[1:]
            # wait until discovery through announcements has settled (every node knows
            # at least the gossip degree's worth of peers), then a few heartbeats more
            want = min(n - 1, 8)
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline:
                counts = [len((await node.call("peers"))["peers"]) for node in nodes]
                if min(counts) >= want:
                    break
                await trio.sleep(1)
            print(f"peers per node: min {min(counts)} max {max(counts)} "
                  f"({time.monotonic() - t0:.1f}s after the first start)", flush=True)
            await trio.sleep(5)
            spreads = []
            lost = 0
            for r in range(rounds):
                payload = r.to_bytes(4, "big") + bytes(1020)
                sent = (await first.call("publish", data=payload.hex()))["t"]
                times = []

                async def wait_one(node: NodeProcess) -> None:
                    try:
                        while True:
                            msg = await node.call("next_message", timeout=5)
                            if bytes.fromhex(msg["data"])[:4] == payload[:4]:
                                times.append(msg["t"] - sent)
                                return
                    except (RuntimeError, trio.TooSlowError):
                        pass

                async with trio.open_nursery() as waits:
                    for node in others:
                        waits.start_soon(wait_one, node)
                if len(times) < len(others):
                    lost += len(others) - len(times)
                if times:
                    spreads.append(max(times))
                await trio.sleep(0.3)
            spreads.sort()
            q = statistics.quantiles(spreads, n=10) if len(spreads) > 1 else spreads * 9
            print(f"propagation to all {n - 1} peers over {len(spreads)} rounds: "
                  f"p50 {statistics.median(spreads) * 1000:.0f} ms, p90 {q[8] * 1000:.0f} ms, "
                  f"max {spreads[-1] * 1000:.0f} ms; deliveries lost {lost}", flush=True)
            for node in nodes:
                await node.stop()
            nursery.cancel_scope.cancel()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nodes", type=int, default=16)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()
    trio.run(main, args.nodes, args.rounds, args.seed)
