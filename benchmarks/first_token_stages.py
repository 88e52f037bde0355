#!/usr/bin/env python3
"""Where a llama.cpp request's first token (and each token after it) spends its time, stage
by stage, in the neuron's own process and through a worker process.

One trio process loads SmolLM2 three times with the same parameters (slots, threads,
context) and runs the same streamed chats through each, ``--conc`` at a time, in rounds
that rotate the order:

* ``direct``: xllamacpp's ``handle_chat_completions`` called from threads (no helexa);
* ``backend``: :class:`~helexa.runtime.llama_cpp.LlamaCppBackend` in this process;
* ``worker``: the same backend in a worker process (:class:`~helexa.runtime.worker.WorkerBackend`).

Timestamps (one clock, ``CLOCK_MONOTONIC``, shared by both processes) are taken by
wrappers this script puts around the code at run time; the worker is started through a
small interpreter shim (``WorkerSettings.python``) that installs the same wrappers there.
Nothing in helexa is changed to be measured. Per path, the medians of:

* ``sent→recv``   the request written to the worker's pipe → the worker read it;
* ``recv→serve``  (worker) the request's task starts;
* ``serve→thread`` (worker) / ``start→thread`` (backend): validation, the body, the prompt
  count, the slot, until the generation's thread is started;
* ``thread→call`` that thread calls llama.cpp; ``start→call``: start to that call;
* ``call→first``  llama.cpp's own time to the first content chunk (its callback);
* ``first→trio``  that callback → the chunk is read (on the trio thread after the thread
  hand-off; in a worker, on llama.cpp's thread itself: :mod:`helexa.runtime.token_tap`);
* ``trio→out``    → the chunk written to the worker's pipe;
* ``first→yield`` the callback → the chunk yielded to the caller;
* ``out→read``    the worker's write → the neuron's reader has it;
* ``read→yield``  the neuron's reader → the chunk yielded to the caller;
* ``TTFT``        start → the first chunk in the caller's hands;
* ``ITL p50/p99`` gaps between the caller's text chunks, and ``cb ITL p99`` between
  llama.cpp's own callbacks in the same streams.

    flock /tmp/helexa-bench.lock .venv/bin/python benchmarks/first_token_stages.py [--conc 1,4] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from collections import defaultdict
from contextlib import aclosing
from pathlib import Path
from typing import Any

PROMPT = "Write a long story about a lighthouse keeper."
STAMPS_ENV = "HELEXA_STAGE_STAMPS"
clock = time.perf_counter  # CLOCK_MONOTONIC on Linux: comparable across processes


class Stamps:
    """``(request id, stage) -> first time`` and the callback times per request; appended
    to the file named by ``$HELEXA_STAGE_STAMPS`` in a worker, kept in memory here."""

    def __init__(self, path: str | None = None) -> None:
        self.first: dict[tuple[str, str], float] = {}
        self.callbacks: dict[str, list[float]] = defaultdict(list)
        self._file = open(path, "a", buffering=1) if path else None
        self._lock = threading.Lock()

    def mark(self, rid: str, stage: str, t: float | None = None) -> None:
        t = clock() if t is None else t
        with self._lock:
            if (rid, stage) in self.first:
                return
            self.first[(rid, stage)] = t
            if self._file:
                self._file.write(json.dumps([rid, stage, t]) + "\n")

    def callback(self, rid: str, t: float) -> None:
        with self._lock:
            self.callbacks[rid].append(t)
            if self._file:
                self._file.write(json.dumps([rid, "cb", t]) + "\n")

    def load(self, path: str) -> None:
        for line in Path(path).read_text().splitlines():
            rid, stage, t = json.loads(line)
            if stage == "cb":
                self.callbacks[rid].append(t)
            else:
                self.first.setdefault((rid, stage), t)


def has_text(chunk: Any) -> bool:
    chunk = json.loads(chunk) if isinstance(chunk, str) else chunk
    return any((c.get("delta") or {}).get("content") for c in chunk.get("choices") or ())


def instrument(stamps: Stamps) -> None:
    """Wrap the backend, the worker's pipe and outbox and the neuron's side of the worker
    so that they mark ``stamps`` (in whichever process this runs)."""
    from helexa.protocol import GenerateRequest, TokenChunk
    from helexa.runtime import llama_cpp
    from helexa.runtime.worker import child, pipe, proxy

    class Server:  # llama.cpp's server, with a stamp at the call and at each text chunk
        def __init__(self, real: Any) -> None:
            self._real = real

        def __getattr__(self, name: str) -> Any:
            return getattr(self._real, name)

        def handle_chat_completions(self, body: dict, callback: Any) -> Any:
            rid = body.get("_rid", "?")
            body = {k: v for k, v in body.items() if k != "_rid"}
            stamps.mark(rid, "call")

            def on_chunk(chunk: Any) -> Any:
                if has_text(chunk):
                    t = clock()
                    stamps.mark(rid, "first", t)
                    stamps.callback(rid, t)
                    chunk["_rid"] = rid  # for parse_chunk's wrapper below
                return callback(chunk)

            return self._real.handle_chat_completions(body, on_chunk)

    load = llama_cpp.LlamaCppBackend.load

    async def wrapped_load(self: Any, progress: Any) -> None:
        await load(self, progress)
        self._server = Server(self._server)

    llama_cpp.LlamaCppBackend.load = wrapped_load
    body_of = llama_cpp.LlamaCppBackend._body

    def wrapped_body(self: Any, request: Any) -> Any:  # the request id, for the wrapper above
        body, generic = body_of(self, request)
        body["_rid"] = request.request_id
        return body, generic

    llama_cpp.LlamaCppBackend._body = wrapped_body
    parse_chunk = llama_cpp.openai_shapes.parse_chunk

    def wrapped_parse(payload: Any, *args: Any) -> Any:  # the trio thread has the chunk
        if isinstance(payload, dict) and "_rid" in payload:
            stamps.mark(payload["_rid"], "trio")
        return parse_chunk(payload, *args)

    llama_cpp.openai_shapes.parse_chunk = wrapped_parse

    receive_batch = pipe.Pipe.receive_batch

    async def wrapped_receive(self: Any) -> list[Any]:
        msgs = await receive_batch(self)
        t = clock()
        for m in msgs:
            if type(m) is GenerateRequest:
                stamps.mark(m.request_id, "recv", t)
            elif type(m) is TokenChunk:
                stamps.mark(m.request_id, "read", t)
        return msgs

    pipe.Pipe.receive_batch = wrapped_receive
    post = child.Outbox._post

    def wrapped_post(self: Any, msg: Any) -> None:
        post(self, msg)
        if type(msg) is TokenChunk:
            stamps.mark(msg.request_id, "out")

    child.Outbox._post = wrapped_post
    tap_send = child._Frames.send

    def wrapped_tap_send(self: Any, chunk: Any) -> bool:  # written from llama.cpp's thread
        ok = tap_send(self, chunk)
        stamps.mark(chunk.request_id, "out")
        return ok

    child._Frames.send = wrapped_tap_send
    serve = child.Worker._serve

    async def wrapped_serve(self: Any, req: Any, scope: Any) -> None:
        stamps.mark(req.request_id, "serve")
        await serve(self, req, scope)

    child.Worker._serve = wrapped_serve
    start_thread_soon = llama_cpp.trio.lowlevel.start_thread_soon

    def wrapped_start_thread_soon(fn: Any, deliver: Any, **kw: Any) -> None:
        # a generation's thread (its body carries the id: see Server above)
        rid = getattr(fn, "__closure__", None) and next(
            (c.cell_contents["_rid"] for c in fn.__closure__
             if isinstance(c.cell_contents, dict) and "_rid" in c.cell_contents), None)
        if rid:
            stamps.mark(rid, "thread")
        start_thread_soon(fn, deliver, **kw)

    llama_cpp.trio.lowlevel.start_thread_soon = wrapped_start_thread_soon
    send = proxy.WorkerBackend._send

    def wrapped_send(self: Any, request: Any) -> bool:
        ok = send(self, request)
        stamps.mark(request.request_id, "sent")
        return ok

    proxy.WorkerBackend._send = wrapped_send


def as_worker(argv: list[str]) -> None:
    """The worker's interpreter shim: ``-m helexa.runtime.worker ARGS`` with the wrappers."""
    import runpy

    assert argv[0] == "-m", argv
    instrument(Stamps(os.environ[STAMPS_ENV]))
    sys.argv = [argv[1], *argv[2:]]
    runpy.run_module(argv[1], run_name="__main__", alter_sys=True)


async def run(a: argparse.Namespace) -> None:
    import trio

    from helexa.protocol import GenerateRequest, ModelConfig, SamplingParams, Task, TokenChunk
    from helexa.runtime.llama_cpp import LlamaCppBackend
    from helexa.runtime.worker import WorkerBackend, WorkerSettings

    work = Path(tempfile.mkdtemp(prefix="helexa-stages-"))
    stamp_file = work / "worker-stamps.jsonl"
    os.environ[STAMPS_ENV] = str(stamp_file)
    shim = work / "python"
    shim.write_text(f"#!/bin/sh\nexec {sys.executable} {Path(__file__).resolve()} --as-worker \"$@\"\n")
    shim.chmod(0o755)
    stamps = Stamps()
    instrument(stamps)

    md = {"n_ctx": a.ctx, "n_parallel": a.slots, "n_threads": a.threads}
    results: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    async with trio.open_nursery() as nursery:
        backend = LlamaCppBackend(ModelConfig("smollm2", "llama_cpp", metadata=md))
        await backend.load(lambda *x: None)
        worker = WorkerBackend(ModelConfig("smollm2", "llama_cpp", metadata=md),
                               WorkerSettings(python=str(shim)))
        worker.service_nursery = nursery
        await worker.load(lambda *x: None)
        import xllamacpp

        from helexa.runtime.gguf_file import default_gguf_path
        p = xllamacpp.CommonParams()
        p.model.path = str(default_gguf_path())
        p.n_ctx, p.n_parallel = a.ctx, a.slots
        p.cpuparams.n_threads = p.cpuparams_batch.n_threads = a.threads
        direct_server = xllamacpp.Server(p)
        # (the cortex sends its count with every request for a model it can read: so do we)
        with trio.fail_after(30):
            while not backend._counter.ready:
                await trio.sleep(0.05)
        counted = await backend._counter.count(GenerateRequest("c", "smollm2", Task.CHAT, messages=(
            {"role": "user", "content": PROMPT},)))

        async def direct(rid: str, tokens: int) -> tuple[float, list[float]]:
            body = {"model": "m", "messages": [{"role": "user", "content": PROMPT}], "stream": True,
                    "max_tokens": tokens, "temperature": 0}
            times: list[float] = []

            def on_chunk(chunk: Any) -> bool:
                if has_text(chunk):
                    times.append(clock())
                return False

            start = clock()
            stamps.mark(rid, "start", start)
            await trio.to_thread.run_sync(direct_server.handle_chat_completions, body, on_chunk)
            stamps.callbacks[rid] = times
            return start, times

        async def through(b: Any, rid: str, tokens: int) -> tuple[float, list[float]]:
            request = GenerateRequest(rid, "smollm2", Task.CHAT, messages=({"role": "user", "content": PROMPT},),
                                      sampling=SamplingParams(max_tokens=tokens, temperature=0.0),
                                      prompt_tokens=counted)
            times: list[float] = []
            start = clock()
            stamps.mark(rid, "start", start)
            async with aclosing(b.chat(request)) as events:
                async for event in events:
                    if type(event) is TokenChunk and event.text:
                        times.append(clock())
                        stamps.mark(rid, "yield", times[-1])
            return start, times

        paths = {"direct": direct, "backend": lambda r, n: through(backend, r, n),
                 "worker": lambda r, n: through(worker, r, n)}
        names = [p for p in paths if p in a.paths.split(",")]
        concs = [int(c) for c in a.conc.split(",")]
        seq = [0]

        async def level(name: str, conc: int, seed: int) -> None:
            rng = random.Random(seed)
            plans = [(rng.uniform(0, 0.1), [rng.randint(a.tokens // 2, a.tokens * 3 // 2) for _ in range(a.requests)])
                     for _ in range(conc)]
            rows = results[f"{name}|{conc}"]

            async def client(pause: float, lengths: list[int]) -> None:
                await trio.sleep(pause)
                for n in lengths:
                    seq[0] += 1
                    rid = f"{name}-{conc}-{seq[0]}"
                    start, times = await paths[name](rid, n)
                    rows["ttft"].append(times[0] - start)
                    rows["itl"].extend(b - x for x, b in zip(times, times[1:]))
                    rows["rids"].append(rid)
                    rows["tokens"].append(len(times))

            t0 = clock()
            async with trio.open_nursery() as n:
                for plan in plans:
                    n.start_soon(client, *plan)
            rows["wall"].append(clock() - t0)
            rows["ntok"].append(sum(rows["tokens"][-conc * a.requests:]))

        for _ in range(1):  # warm-up
            for name in names:
                await level(name, 1, 0)
        results.clear()
        for r in range(a.rounds):
            for c in concs:
                for name in names[r % len(names):] + names[:r % len(names)]:
                    await level(name, c, r * 1000 + c)
        await worker.unload()
        await backend.unload()
        del direct_server
    stamps.load(str(stamp_file))

    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"\nSmolLM2, {a.slots} slots, {a.threads} thread(s), {a.rounds} rounds x {a.requests} streams per "
          f"client, {a.tokens // 2}-{a.tokens * 3 // 2} tokens; load average at the end {load}\n")
    stages = [("sent→recv", "sent", "recv"), ("recv→serve", "recv", "serve"), ("serve→thread", "serve", "thread"),
              ("start→thread", "start", "thread"), ("thread→call", "thread", "call"), ("start→call", "start", "call"),
              ("call→first", "call", "first"), ("first→trio", "first", "trio"), ("trio→out", "trio", "out"),
              ("first→yield", "first", "yield"),
              ("out→read", "out", "read"), ("read→yield", "read", "yield")]
    print("| conc | path | tokens/s | TTFT p50 | " + " | ".join(s[0] for s in stages)
          + " | ITL p50 | ITL p99 | cb ITL p99 |")
    print("|---:|---|---:|---:|" + "---:|" * len(stages) + "---:|---:|---:|")

    def ms(x: float | None) -> str:
        return "" if x is None else f"{x * 1e3:.2f}"

    for c in concs:
        for name in names:
            rows = results[f"{name}|{c}"]
            tps = statistics.median(n / w for n, w in zip(rows["ntok"], rows["wall"]))
            cells = []
            for _, s0, s1 in stages:
                xs = [stamps.first[(r, s1)] - stamps.first[(r, s0)] for r in rows["rids"]
                      if (r, s0) in stamps.first and (r, s1) in stamps.first]
                cells.append(ms(statistics.median(xs)) if xs else "")
            cb = [b - x for r in rows["rids"] for x, b in zip(stamps.callbacks[r], stamps.callbacks[r][1:])]
            print(f"| {c} | {name} | {tps:.1f} | {ms(statistics.median(rows['ttft']))} | " + " | ".join(cells)
                  + f" | {ms(pct(rows['itl'], 50))} | {ms(pct(rows['itl'], 99))} | {ms(pct(cb, 99))} |")


def pct(xs: list[float], p: int) -> float | None:
    if len(xs) < 2:
        return xs[0] if xs else None
    return statistics.quantiles(xs, n=100, method="inclusive")[p - 1]


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--as-worker":
        return as_worker(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--conc", default="1,4")
    ap.add_argument("--paths", default="direct,backend,worker")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=4, help="streams per client per round")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--slots", type=int, default=8)
    ap.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    ap.add_argument("--ctx", type=int, default=4096)
    a = ap.parse_args()
    import trio

    trio.run(run, a)


if __name__ == "__main__":
    main()
