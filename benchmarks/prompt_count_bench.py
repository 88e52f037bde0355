#!/usr/bin/env python3
"""Time to first token of a ``llama_cpp`` request whose prompt the cortex did not count.

The cortex counts a prompt only for models whose GGUF it can read; for the rest (an
``hf://`` or URL source, fetched by neurons only) the neuron counts before the request waits
for a slot. This benchmark loads SmolLM2 in this process (one slot, one thread) and, in
rounds that alternate, measures the first token of the same streamed chat:

* ``direct``: xllamacpp's ``handle_chat_completions`` called directly (no count at all);
* ``tokenizer``: the backend, counting with the GGUF's own tokenizer
  (:mod:`helexa.runtime.prompt_count`);
* ``llama.cpp``: the backend, asking llama.cpp to count (``/apply-template`` and
  ``/tokenize``), as every uncounted request did before;
* ``cortex``: the backend given the cortex's count (no count on the neuron).

    flock /tmp/helexa-bench.lock .venv/bin/python benchmarks/prompt_count_bench.py [--requests 30]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run by path: this checkout

from helexa.protocol import GenerateRequest, ModelConfig, SamplingParams, Task, TokenChunk  # noqa: E402
from helexa.runtime.llama_cpp import LlamaCppBackend  # noqa: E402

PROMPT = "Write a long story about a lighthouse keeper."


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=30, help="per path")
    a = ap.parse_args()
    backend = LlamaCppBackend(ModelConfig("smollm2", "llama_cpp",
                                          metadata={"n_ctx": 2048, "n_parallel": 1, "n_threads": 1}))
    await backend.load(lambda *args: None)
    counter = backend._counter
    with trio.fail_after(30):
        while counter is None or not counter.ready:
            await trio.sleep(0.05)
    server = backend._server

    async def direct() -> float:
        body = {"model": "m", "messages": [{"role": "user", "content": PROMPT}], "stream": True,
                "max_tokens": 4, "temperature": 0}
        stamps: list[float] = []

        def on_chunk(chunk):
            chunk = json.loads(chunk) if isinstance(chunk, str) else chunk
            if any((c.get("delta") or {}).get("content") for c in chunk.get("choices", [])):
                stamps.append(time.perf_counter())
            return False

        start = time.perf_counter()
        await trio.to_thread.run_sync(server.handle_chat_completions, body, on_chunk)
        return stamps[0] - start

    async def through_backend(prompt_tokens: int | None) -> float:
        request = GenerateRequest("r", "smollm2", Task.CHAT, messages=({"role": "user", "content": PROMPT},),
                                  sampling=SamplingParams(max_tokens=4, temperature=0.0), prompt_tokens=prompt_tokens)
        start = time.perf_counter()
        first = None
        async with contextlib.aclosing(backend.chat(request)) as events:
            async for event in events:
                if first is None and isinstance(event, TokenChunk) and event.text:
                    first = time.perf_counter() - start
        return first

    exact = await counter.count(GenerateRequest("c", "smollm2", Task.CHAT,
                                                messages=({"role": "user", "content": PROMPT},)))

    async def tokenizer() -> float:
        backend._counter = counter
        return await through_backend(None)

    async def llama() -> float:
        backend._counter = None
        try:
            return await through_backend(None)
        finally:
            backend._counter = counter

    async def cortex() -> float:
        return await through_backend(exact)

    paths = {"direct": direct, "tokenizer": tokenizer, "llama.cpp": llama, "cortex": cortex}
    times: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(a.requests):
        for name, run in paths.items():
            times[name].append(await run())
    await backend.unload()
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"\nSmolLM2, one slot, one thread, {a.requests} requests per path, interleaved; load average {load}\n")
    print("| neuron's count | TTFT p50 ms | TTFT p90 ms | added p50 vs direct |")
    print("|---|---:|---:|---:|")
    base = statistics.median(times["direct"])
    for name, xs in times.items():
        xs.sort()
        p50 = statistics.median(xs)
        print(f"| {name} | {p50 * 1e3:.1f} | {xs[int(len(xs) * 0.9)] * 1e3:.1f} | {(p50 - base) * 1e3:+.1f} |")


if __name__ == "__main__":
    trio.run(main)
