"""What the fuzzers (``fuzz_control.py``, ``fuzz_mesh.py``) share: the loop that sends
generated hostile frames from many concurrent attackers, the log handler that counts
tracebacks, and the command line.

A fuzzer supplies ``attack(i, stage, data) -> outcome``: it sends frame ``data`` at
``stage`` of a fresh connection or stream and says, in a few words, what became of it;
:func:`run_frames` counts the outcomes. The frames come from ``tests/control/frames.py``,
which the fuzzers put on ``sys.path`` before importing this module.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import random
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any

import trio
from frames import frame as hostile_frame

Attack = Callable[[int, str, bytes], Awaitable[str]]


class Tracebacks(logging.Handler):
    """Keeps every log record that carries a traceback (``exc_info``, or one written into
    the message)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info or "Traceback" in record.getMessage():
            self.records.append(self.format(record))

    @contextmanager
    def catching(self, *loggers: str) -> Iterator[Tracebacks]:
        """Listen on ``loggers`` (by name) inside the block."""
        for name in loggers:
            logging.getLogger(name).addHandler(self)
        try:
            yield self
        finally:
            for name in loggers:
                logging.getLogger(name).removeHandler(self)


async def run_frames(attack: Attack, *, frames: int, stages: tuple[str, ...], concurrency: int,
                     rng: random.Random, log_every: int = 0) -> tuple[collections.Counter[str], float]:
    """Send ``frames`` hostile frames through ``attack`` from ``concurrency`` tasks, frame
    ``i`` at ``stages[i % len(stages)]``; returns the outcomes (``"stage: outcome"``) and
    the seconds it took. Prints progress to stderr every ``log_every`` frames."""
    outcomes: collections.Counter[str] = collections.Counter()
    send, receive = trio.open_memory_channel[tuple[int, str, bytes]](concurrency)
    t0 = time.perf_counter()

    async def produce() -> None:
        async with send:
            for i in range(frames):
                await send.send((i, stages[i % len(stages)], hostile_frame(rng)))

    async def work() -> None:
        async for i, stage, data in receive:
            outcomes[f"{stage}: {await attack(i, stage, data)}"] += 1
            if log_every and i and i % log_every == 0:
                print(f"{i} frames, {i / (time.perf_counter() - t0):.0f}/s", file=sys.stderr)

    async with trio.open_nursery() as workers:
        workers.start_soon(produce)
        for _ in range(concurrency):
            workers.start_soon(work)
    return outcomes, time.perf_counter() - t0


def rates(frames: int, seconds: float, outcomes: collections.Counter[str], catcher: Tracebacks) -> dict[str, Any]:
    """The part of a report every fuzzer prints."""
    return {"frames": frames, "seconds": round(seconds, 1), "frames_per_second": round(frames / seconds),
            "outcomes": dict(sorted(outcomes.items())), "tracebacks": len(catcher.records),
            "traceback_examples": catcher.records[:3]}


def main(doc: str, fuzz: Callable[..., Awaitable[dict[str, Any]]]) -> int:
    """The command line of a fuzzer whose module docstring is ``doc``: ``--frames``,
    ``--concurrency``, ``--seed``; prints the report as JSON, exits 1 when it missed its
    target."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=100_000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    report = trio.run(lambda: fuzz(args.frames, args.concurrency, args.seed, log_every=5000))
    print(json.dumps(report, indent=1))
    return 0 if report["ok"] else 1
