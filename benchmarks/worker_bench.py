"""What running a model in a worker process costs, and what it buys.

    flock /tmp/helexa-bench.lock .venv/bin/python benchmarks/worker_bench.py [--rounds 3] [--dur 5]

Five parts, each an A/B between a backend in the neuron's own process and the same backend
in a worker process (``metadata.isolate``), rounds alternating so that noise from other work
on the machine hits both alike; figures are medians over rounds.

1. **start**: spawning a worker (a fresh interpreter, ``python -m helexa.runtime.worker``)
   until its first frame, and an idle worker's resident memory.
2. **stall**: how long the event loop stands still while SmolLM2 loads (a task that
   sleeps 10 ms in a loop records its worst lateness): the interpreter lock that xllamacpp
   holds through a load stalls the loop in-process, not from a worker. Each load runs in
   a fresh process.
3. **hop**: the ``synthetic`` backend called directly in one trio process: sequential
   non-streaming requests (p50 and requests/s), 16 concurrent, and 64-token streams.
4. **tokens**: SmolLM2 decoding 128 tokens through the backend interface (greedy).
5. **fabric**: a real ``helexa cortex`` and ``helexa neuron``, two synthetic models (16
   tokens) on the one neuron, one in-process and one in a worker; ``wrk`` (non-streaming,
   c=1 and c=16) and sequential 64-token streams through the gateway.

Needs ``wrk`` (``apt-get install -y wrk``) for part 5; ``--parts`` picks parts
(``start,stall,hop,tokens,fabric``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import aclosing
from pathlib import Path

import httpx
import psutil
import trio

from helexa.protocol import GenerateRequest, ModelConfig, SamplingParams, Task
from helexa.runtime import create_backend
from helexa.runtime.worker import WorkerBackend

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE / "litellm_harness"))
sys.path.insert(0, str(HERE.parent / "tests" / "e2e"))


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def backend(config: ModelConfig, place: str, nursery: trio.Nursery):
    b = create_backend(config) if place == "in-process" else WorkerBackend(config)
    b.service_nursery = nursery
    return b


# --- 1. start -----------------------------------------------------------------------------


async def start_cost(n: int) -> None:
    starts, loads, rss = [], [], []
    async with trio.open_nursery() as nursery:
        for _ in range(n):
            b = backend(ModelConfig("s", "synthetic"), "worker", nursery)
            t0 = trio.current_time()
            await b.load(lambda *a: None)
            loads.append(trio.current_time() - t0)
            starts.append(b.start_seconds)
            rss.append(psutil.Process(b.pid).memory_info().rss)
            await b.unload()
    print(f"[start] worker spawn to first frame: p50 {med(starts) * 1000:.0f} ms "
          f"(min {min(starts) * 1000:.0f}, max {max(starts) * 1000:.0f}); spawn + load (synthetic): "
          f"p50 {med(loads) * 1000:.0f} ms; idle worker RSS {med(rss) / 2**20:.0f} MiB  (n={n})")


# --- 2. stall -----------------------------------------------------------------------------


async def stall_probe(place: str) -> None:
    """One SmolLM2 load, ``place`` in-process or in a worker; prints ``load worst`` seconds."""
    from helexa.runtime.llama_cpp import default_gguf_path

    config = ModelConfig("smollm2", "llama_cpp", metadata={"path": str(default_gguf_path())})
    worst = 0.0
    async with trio.open_nursery() as nursery:
        b = backend(config, place, nursery)

        async def tick() -> None:
            nonlocal worst
            while True:
                t = trio.current_time()
                await trio.sleep(0.01)
                worst = max(worst, trio.current_time() - t - 0.01)

        nursery.start_soon(tick)
        t0 = trio.current_time()
        await b.load(lambda *a: None)
        took = trio.current_time() - t0
        nursery.cancel_scope.cancel()
    print(f"{took} {worst}", flush=True)


def stall(rounds: int) -> None:
    # Each load in a fresh process that exits without unloading: destroying an in-process
    # xllamacpp.Server has been seen to hang (a worker's unload is bounded by a kill).
    rows: dict[str, list[tuple[float, float]]] = {"in-process": [], "worker": []}
    for _ in range(rounds):
        for place in rows:
            out = subprocess.run([sys.executable, __file__, "--stall-probe", place], capture_output=True,
                                 text=True, timeout=300).stdout.split()
            rows[place].append((float(out[-2]), float(out[-1])))
    for place, r in rows.items():
        print(f"[stall] SmolLM2 load {place:>10}: load {med([x[0] for x in r]) * 1000:5.0f} ms, "
              f"event loop stood still for up to {med([x[1] for x in r]) * 1000:5.0f} ms "
              f"(rounds: {', '.join(f'{x[1] * 1000:.0f}' for x in r)})")


# --- 3. hop -------------------------------------------------------------------------------


def req(i: int, stream: bool, tokens: int) -> GenerateRequest:
    return GenerateRequest(f"r{i}", "s", Task.CHAT, messages=({"role": "user", "content": "hi"},),
                           sampling=SamplingParams(max_tokens=tokens), stream=stream)


async def one(b, i: int, stream: bool, tokens: int) -> None:
    async with aclosing(b.chat(req(i, stream, tokens))) as it:
        async for _ in it:
            pass


async def hop(rounds: int, n: int) -> None:
    cfg = ModelConfig("s", "synthetic", metadata={"tokens": 64})
    res: dict[str, dict[str, list[float]]] = {p: {"p50": [], "rps": [], "rps16": [], "sps": [], "s_p50": []}
                                              for p in ("in-process", "worker")}
    async with trio.open_nursery() as nursery:
        bs = {p: backend(cfg, p, nursery) for p in res}
        for b in bs.values():
            await b.load(lambda *a: None)
        ids = iter(range(10**9))
        for _ in range(rounds):
            for place, b in bs.items():
                lat = []
                t0 = time.perf_counter()
                for _ in range(n):
                    s = time.perf_counter()
                    await one(b, next(ids), False, 16)
                    lat.append(time.perf_counter() - s)
                res[place]["rps"].append(n / (time.perf_counter() - t0))
                res[place]["p50"].append(med(lat))
                t0 = time.perf_counter()
                async with trio.open_nursery() as inner:
                    for _ in range(16):
                        async def loop() -> None:
                            for _ in range(n // 16):
                                await one(b, next(ids), False, 16)
                        inner.start_soon(loop)
                res[place]["rps16"].append(n // 16 * 16 / (time.perf_counter() - t0))
                lat = []
                t0 = time.perf_counter()
                for _ in range(n // 4):
                    s = time.perf_counter()
                    await one(b, next(ids), True, 64)
                    lat.append(time.perf_counter() - s)
                res[place]["sps"].append(n // 4 / (time.perf_counter() - t0))
                res[place]["s_p50"].append(med(lat))
        for b in bs.values():
            await b.unload()
    r = {p: {k: med(v) for k, v in d.items()} for p, d in res.items()}
    for place, d in r.items():
        print(f"[hop] {place:>10}: request p50 {d['p50'] * 1e6:6.0f} us, {d['rps']:7.0f} requests/s (c=1), "
              f"{d['rps16']:7.0f} requests/s (c=16); 64-token stream p50 {d['s_p50'] * 1e6:6.0f} us, "
              f"{d['sps']:6.0f} streams/s")
    a, w = r["in-process"], r["worker"]
    print(f"[hop] added by the worker: request +{(w['p50'] - a['p50']) * 1e6:.0f} us p50, "
          f"stream +{(w['s_p50'] - a['s_p50']) * 1e6:.0f} us p50")


# --- 4. tokens ----------------------------------------------------------------------------


async def tokens(rounds: int, n: int) -> None:
    from helexa.protocol import GenerateResult, TokenChunk
    from helexa.runtime.llama_cpp import default_gguf_path

    prompt = "Write a long story about a lighthouse keeper."
    cfg = ModelConfig("smollm2", "llama_cpp", metadata={"path": str(default_gguf_path())})

    async def decode(b) -> float:
        r = GenerateRequest("t", "smollm2", Task.CHAT, messages=({"role": "user", "content": prompt},),
                            sampling=SamplingParams(max_tokens=n, temperature=0.0))
        first = end = None
        count = 0
        async with aclosing(b.chat(r)) as it:
            async for e in it:
                if isinstance(e, TokenChunk) and first is None:
                    first = time.perf_counter()
                elif isinstance(e, GenerateResult):
                    count = e.usage.completion_tokens
        end = time.perf_counter()
        return (count - 1) / (end - first)

    res: dict[str, list[float]] = {"in-process": [], "worker": []}
    async with trio.open_nursery() as nursery:
        bs = {p: backend(cfg, p, nursery) for p in res}
        for b in bs.values():
            await b.load(lambda *a: None)
            await decode(b)
        for _ in range(rounds):
            for place, b in bs.items():
                res[place].append(await decode(b))
        for b in bs.values():
            await b.unload()
    for place, r in res.items():
        print(f"[tokens] SmolLM2 {place:>10}: decode {med(r):5.1f} tokens/s (rounds: "
              f"{', '.join(f'{x:.1f}' for x in r)})")
    print(f"[tokens] worker / in-process: {med(res['worker']) / med(res['in-process']):.1%}")


# --- 5. fabric ----------------------------------------------------------------------------

MODELS = """
[models."synth-local"]
backend = "synthetic"
[models."synth-local".config]
metadata = { tokens = 64, isolate = false }

[models."synth-worker"]
backend = "synthetic"
[models."synth-worker".config]
metadata = { tokens = 64, isolate = true }
"""


def streams(client: httpx.Client, base: str, model: str, n: int) -> tuple[float, float]:
    body = {"model": model, "stream": True, "max_tokens": 64, "messages": [{"role": "user", "content": "hi"}]}
    lat = []
    t0 = time.perf_counter()
    for _ in range(n):
        s = time.perf_counter()
        with client.stream("POST", base + "/v1/chat/completions", json=body) as r:
            data = b"".join(r.iter_bytes())
        assert r.status_code == 200 and b"[DONE]" in data, data[-200:]
        lat.append(time.perf_counter() - s)
    return n / (time.perf_counter() - t0), med(lat)


def fabric(rounds: int, dur: int) -> None:
    import bench  # benchmarks/litellm_harness/bench.py: wrk with post.lua
    from procs import ProcGroup

    work = Path(tempfile.mkdtemp(prefix="helexa-worker-bench-"))
    with ProcGroup(work) as procs:
        cortex = procs.cortex(models=MODELS)
        procs.neuron(cortex, "n1")
        base = cortex.gateway_url
        client = httpx.Client(timeout=60)
        for model in ("synth-local", "synth-worker"):  # cold loads and warm-up
            bench.wrk(base, 2, 1, model, "unused", None)
        res: dict[str, dict[str, list[float]]] = {m: {"rps1": [], "p50": [], "rps16": [], "sps": [], "s_p50": []}
                                                  for m in ("synth-local", "synth-worker")}
        for _ in range(rounds):
            for model, d in res.items():
                one_ = bench.wrk(base, 1, dur, model, "unused", None)
                d["rps1"].append(one_["rps"])
                d["p50"].append(one_["p50_ms"])
                d["rps16"].append(bench.wrk(base, 16, dur, model, "unused", None)["rps"])
                sps, s50 = streams(client, base, model, 100)
                d["sps"].append(sps)
                d["s_p50"].append(s50 * 1000)
        client.close()
    r = {m: {k: med(v) for k, v in d.items()} for m, d in res.items()}
    for model, d in r.items():
        place = "in-process" if model == "synth-local" else "worker"
        print(f"[fabric] {place:>10}: {d['rps1']:6.0f} requests/s c=1 (p50 {d['p50']:.2f} ms), "
              f"{d['rps16']:6.0f} requests/s c=16; 64-token streams {d['sps']:5.0f}/s (p50 {d['s_p50']:.2f} ms)")
    a, w = r["synth-local"], r["synth-worker"]
    print(f"[fabric] worker / in-process: requests/s c=1 {w['rps1'] / a['rps1']:.1%}, c=16 "
          f"{w['rps16'] / a['rps16']:.1%}, streams/s {w['sps'] / a['sps']:.1%}; added p50 "
          f"+{w['p50'] - a['p50']:.2f} ms (request), +{w['s_p50'] - a['s_p50']:.2f} ms (stream)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dur", type=int, default=5, help="seconds per wrk run")
    ap.add_argument("--starts", type=int, default=10)
    ap.add_argument("--requests", type=int, default=2000, help="requests per round in the hop part")
    ap.add_argument("--parts", default="start,stall,hop,tokens,fabric", help="which parts to run")
    ap.add_argument("--stall-probe", choices=["in-process", "worker"], help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.stall_probe:
        trio.run(stall_probe, a.stall_probe)
        os._exit(0)  # without unloading (see stall)
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start")
    parts = a.parts.split(",")
    if "start" in parts:
        trio.run(start_cost, a.starts)
    if "stall" in parts:
        stall(a.rounds)
    if "hop" in parts:
        trio.run(hop, a.rounds, a.requests)
    if "tokens" in parts:
        trio.run(tokens, a.rounds * 2 + 1, 128)
    if "fabric" in parts:
        fabric(a.rounds, a.dur)
    print(f"load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
