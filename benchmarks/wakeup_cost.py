#!/usr/bin/env python3
"""What one wake-up costs a Python process that a socket wakes every few milliseconds.

Each streamed token wakes the neuron and the cortex once (docs/benchmarks.md, "SmolLM2
under concurrency"). This measures the floor of that: a writer process sends one byte every
``--gap`` seconds over a socket pair; the reader waits for it, reads it and makes 100
trivial Python calls (about what the fabric's hot path does per event is a few hundred), in
three ways:

* ``plain``: ``select.epoll.poll`` with the socket registered once;
* ``oneshot``: the same, re-armed with ``EPOLLONESHOT`` before every wait (as trio does);
* ``trio``: ``trio.lowlevel.wait_readable`` in a trio run loop.

Figures: the reader's CPU time per message (its ``schedstat``, in ns), for each gap, and
``hot``: the same loop with the byte already there (no wait at all). The difference between
a gap and ``hot`` is what waking from idle costs on this machine.

Usage::

    flock /tmp/helexa-bench.lock taskset -c 1 .venv/bin/python benchmarks/wakeup_cost.py [--gaps 0.0005,0.002,0.02]
"""

from __future__ import annotations

import argparse
import os
import select
import socket
import time

import trio


def cpu_ms() -> float:
    with open("/proc/self/schedstat") as f:
        return int(f.read().split()[0]) / 1e6


def work(x: int) -> int:
    return x + 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gaps", default="0.0005,0.002,0.02", help="seconds between messages")
    ap.add_argument("--messages", type=int, default=300, help="per gap and way")
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    gaps = [float(g) for g in a.gaps.split(",")]
    ways = ("plain", "oneshot", "trio")
    n = a.messages
    r, w = socket.socketpair()
    pid = os.fork()
    if pid == 0:  # the writer: the same schedule the reader expects
        r.close()
        time.sleep(0.2)
        for _ in range(a.rounds):
            for _ in ways:
                for gap in gaps:
                    for _ in range(n):
                        time.sleep(gap)
                        w.send(b"x")
        os._exit(0)
    w.close()
    r.setblocking(False)
    results: dict[tuple[str, float], list[float]] = {}
    ep = select.epoll()
    ep.register(r.fileno(), select.EPOLLIN)

    def plain(oneshot: bool) -> float:
        t = cpu_ms()
        for _ in range(n):
            if oneshot:
                ep.modify(r.fileno(), select.EPOLLIN | select.EPOLLONESHOT)
            ep.poll()
            r.recv(1)
            for i in range(100):
                work(i)
        return (cpu_ms() - t) / n * 1e3

    async def in_trio() -> float:
        t = cpu_ms()
        for _ in range(n):
            await trio.lowlevel.wait_readable(r)
            r.recv(1)
            for i in range(100):
                work(i)
        return (cpu_ms() - t) / n * 1e3

    for _ in range(a.rounds):
        for way in ways:
            if way == "trio":
                ep.unregister(r.fileno())
            for gap in gaps:
                if way == "trio":
                    took = trio.run(in_trio)
                else:
                    took = plain(way == "oneshot")
                results.setdefault((way, gap), []).append(took)
            if way == "trio":
                ep.register(r.fileno(), select.EPOLLIN)
    os.waitpid(pid, 0)

    # Hot: the bytes are already there, no wait.
    a2, b2 = socket.socketpair()
    a2.setblocking(False)

    async def hot_trio() -> float:
        t = cpu_ms()
        for _ in range(n):
            b2.send(b"x")
            await trio.lowlevel.wait_readable(a2)
            a2.recv(1)
            for i in range(100):
                work(i)
        return (cpu_ms() - t) / n * 1e3

    t = cpu_ms()
    for _ in range(n):
        b2.send(b"x")
        a2.recv(1)
        for i in range(100):
            work(i)
    hot_plain = (cpu_ms() - t) / n * 1e3
    hot = {"plain": hot_plain, "oneshot": hot_plain, "trio": trio.run(hot_trio)}
    print("| way | hot | " + " | ".join(f"gap {g * 1e3:g} ms" for g in gaps) + " |")
    print("|---|---:|" + "---:|" * len(gaps))
    for way in ways:
        cells = " | ".join(f"{min(results[(way, g)]):.1f}" for g in gaps)
        print(f"| {way} | {hot[way]:.1f} | {cells} |")
    print("\nCPU µs per message, the best of the rounds.")


if __name__ == "__main__":
    main()
