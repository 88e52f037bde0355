#!/usr/bin/env python3
"""Where the first token's time goes through the whole fabric, stage by stage, against
llama.cpp's own OpenAI server.

A cortex, a neuron (SmolLM2 in its worker process) and llama.cpp's server (the same
parameters) run as in ``concurrency_tokens_bench.py``; streamed chats go to both,
``--conc`` at a time, alternating. The neuron and its worker run through an interpreter
shim that installs the timing wrappers of ``first_token_stages.py`` (nothing in helexa is
changed to be measured; one clock, ``CLOCK_MONOTONIC``, in every process). The client
learns each request's id from the ``x-request-id`` header. Medians per stage:

* ``client→neuron``  the client's request → the neuron has it (the cortex's request path
  and the websocket);
* ``neuron→worker``  → written to the worker's pipe (the neuron's own request path);
* ``worker→call``    → the worker's thread calls llama.cpp;
* ``call→first``     llama.cpp's first text chunk (its own time);
* ``first→pipe``     → the worker wrote it to its pipe;
* ``pipe→relay``     → the neuron hands it to the websocket (``Connection.send``);
* ``relay→sent``     that send returned (not on the token's path: the cortex may have it first);
* ``relay→client``   → the client read it (the websocket, the cortex's stream path, HTTP);
* ``TTFT``, and ``direct TTFT`` through llama.cpp's own server.

    flock /tmp/helexa-bench.lock .venv/bin/python benchmarks/fabric_stages.py [--conc 1,4] [--rounds 3]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import runpy
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from concurrency_tokens_bench import PROMPT, free_port, stop, wait_ready  # noqa: E402
from first_token_stages import STAMPS_ENV, Stamps, clock, instrument  # noqa: E402

HERE = Path(__file__).resolve().parent


def as_neuron(argv: list[str]) -> None:
    """The neuron's interpreter shim: ``helexa neuron ARGS`` with the wrappers, its workers
    started through ``first_token_stages.py --as-worker``."""
    from dataclasses import replace

    from helexa.protocol import TokenChunk
    from helexa.roles.neuron import connection, serving
    from helexa.runtime.worker import process

    stamps = Stamps(os.environ[STAMPS_ENV])
    instrument(stamps)
    shim = os.environ["HELEXA_STAGE_WORKER_PYTHON"]
    init = process.WorkerProcess.__init__

    def worker_init(self: Any, config: Any, settings: Any, **kw: Any) -> None:
        init(self, config, replace(settings, python=shim), **kw)

    process.WorkerProcess.__init__ = worker_init
    start = serving.Serving.start

    def wrapped_start(self: Any, req: Any, nursery: Any) -> None:
        stamps.mark(req.request_id, "neuron")
        start(self, req, nursery)

    serving.Serving.start = wrapped_start
    send = connection.Connection.send

    async def wrapped_send(self: Any, msg: Any) -> None:
        first = type(msg) is TokenChunk and (msg.request_id, "relay") not in stamps.first
        if first:
            stamps.mark(msg.request_id, "relay")
        await send(self, msg)
        if first:
            stamps.mark(msg.request_id, "relayed")

    connection.Connection.send = wrapped_send
    sys.argv = ["helexa", "neuron", *argv]
    runpy.run_module("helexa.cli", run_name="__main__", alter_sys=True)


def one_stream(conn: http.client.HTTPConnection, model: str, tokens: int) -> tuple[str, float, float]:
    """One streamed chat: (request id, start, first text)."""
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": PROMPT}], "stream": True,
                       "max_tokens": tokens, "temperature": 0})
    for attempt in (1, 2):
        start = clock()
        try:
            conn.request("POST", "/v1/chat/completions", body=body, headers={"content-type": "application/json"})
            response = conn.getresponse()
            break
        except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
            conn.close()  # llama.cpp's server closes after a stream without saying so
            if attempt == 2:
                raise
    rid = response.getheader("x-request-id") or ""
    first = None
    while line := response.readline():
        if first is None and line.startswith(b"data: {") and b'"content":"' in line.replace(b'": "', b'":"'):
            event = json.loads(line[6:])
            if any((c.get("delta") or {}).get("content") for c in event.get("choices") or ()):
                first = clock()
    if first is None:
        raise RuntimeError(f"{model}: no text in the answer")
    return rid, start, first


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--as-neuron":
        return as_neuron(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--conc", default="1,4")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=5, help="streams per client per round")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--slots", type=int, default=8)
    ap.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    ap.add_argument("--ctx", type=int, default=4096)
    a = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="helexa-fabric-stages-"))
    stamp_file = work / "stamps.jsonl"
    shim = work / "python"
    shim.write_text(f"#!/bin/sh\nexec {sys.executable} {HERE / 'first_token_stages.py'} --as-worker \"$@\"\n")
    shim.chmod(0o755)
    env = {**os.environ, STAMPS_ENV: str(stamp_file), "HELEXA_STAGE_WORKER_PYTHON": str(shim)}
    procs: list[subprocess.Popen] = []

    def start(name: str, args: list[str]) -> tuple[subprocess.Popen, Path]:
        log = work / f"{name}.log"
        p = subprocess.Popen(args, stdout=open(log, "wb"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             start_new_session=True, env=env)
        procs.append(p)
        return p, log

    results: dict[str, dict[str, list]] = {}
    try:
        port = free_port()
        direct = ("127.0.0.1", port)
        p, log = start("llama-server", [sys.executable, str(HERE / "concurrency_tokens_bench.py"), "--serve-llama",
                                        str(port), "--slots", str(a.slots), "--threads", str(a.threads),
                                        "--ctx", str(a.ctx)])
        wait_ready(f"http://127.0.0.1:{port}", p, log)
        models = work / "models.toml"
        models.write_text(f"""
[models."smollm2"]
backend = "llama_cpp"
max_context = {a.ctx // a.slots}
[models."smollm2".config]
metadata = {{ n_ctx = {a.ctx}, n_parallel = {a.slots}, n_threads = {a.threads} }}
""")
        control, gw = free_port(), free_port()
        p, log = start("cortex", [sys.executable, "-m", "helexa.cli", "cortex", "--data-dir", str(work / "c"),
                                  "--control-socket", f"127.0.0.1:{control}", "--gateway-socket", f"127.0.0.1:{gw}",
                                  "--models", str(models), "--log-level", "info"])
        while not (work / "c" / "join-token").exists() or "cortex ready" not in log.read_text():
            if p.poll() is not None:
                sys.exit("cortex exited:\n" + log.read_text()[-3000:])
            time.sleep(0.1)
        start("neuron", [sys.executable, __file__, "--as-neuron", "--cortex", f"ws://127.0.0.1:{control}",
                         "--node-id", "bench", "--join-token-file", str(work / "c" / "join-token"),
                         "--log-level", "warning"])
        targets = {"direct": direct, "fabric": ("127.0.0.1", gw)}
        deadline = time.monotonic() + 120
        for name, addr in targets.items():  # cold load, warm-up
            while True:
                try:
                    one_stream(http.client.HTTPConnection(*addr, timeout=60), "smollm2", 8)
                    break
                except (OSError, http.client.HTTPException, RuntimeError):
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.5)
        concs = [int(c) for c in a.conc.split(",")]
        load_before = " ".join(f"{x:.1f}" for x in os.getloadavg())
        for r in range(a.rounds):
            for c in concs:
                for name in (["direct", "fabric"] if r % 2 == 0 else ["fabric", "direct"]):
                    rng = random.Random(r * 1000 + c)
                    plans = [(rng.uniform(0, 0.1), [rng.randint(a.tokens // 2, a.tokens * 3 // 2)
                                                   for _ in range(a.requests)]) for _ in range(c)]
                    rows = results.setdefault(f"{name}|{c}", {"rows": []})["rows"]
                    lock = threading.Lock()

                    def client(pause: float, lengths: list[int], addr: tuple = targets[name]) -> None:
                        conn = http.client.HTTPConnection(*addr, timeout=120)
                        time.sleep(pause)
                        for n in lengths:
                            try:
                                row = one_stream(conn, "smollm2", n)
                            except RuntimeError:  # an answer of nothing but its end: not a sample
                                continue
                            with lock:
                                rows.append(row)
                        conn.close()

                    threads = [threading.Thread(target=client, args=plan) for plan in plans]
                    for t in threads:
                        t.start()
                    for t in threads:
                        t.join()
    finally:
        stop(procs)

    stamps = Stamps()
    stamps.load(str(stamp_file))
    load_after = " ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"\nSmolLM2, {a.slots} slots, {a.threads} thread(s), {a.rounds} rounds x {a.requests} streams per client, "
          f"{a.tokens // 2}-{a.tokens * 3 // 2} tokens; load average {load_before} before, {load_after} after\n")
    stages = [("client→neuron", "client", "neuron"), ("neuron→worker", "neuron", "sent"),
              ("worker→call", "sent", "call"), ("call→first", "call", "first"), ("first→pipe", "first", "out"),
              ("pipe→relay", "out", "relay"), ("relay→sent", "relay", "relayed"),
              ("relay→client", "relay", "seen")]
    print("| conc | direct TTFT p50 | fabric TTFT p50 | added | " + " | ".join(s[0] for s in stages)
          + " | fabric outside llama.cpp |")
    print("|---:|---:|---:|---:|" + "---:|" * len(stages) + "---:|")
    for c in concs:
        d = statistics.median(f - s for _, s, f in results[f"direct|{c}"]["rows"])
        f_rows = results[f"fabric|{c}"]["rows"]
        for rid, s, f in f_rows:
            stamps.first[(rid, "client")] = s
            stamps.first[(rid, "seen")] = f
        ttft = statistics.median(f - s for _, s, f in f_rows)
        cells, outside = [], 0.0
        for name, s0, s1 in stages:
            xs = [stamps.first[(r, s1)] - stamps.first[(r, s0)] for r, _, _ in f_rows
                  if (r, s0) in stamps.first and (r, s1) in stamps.first]
            m = statistics.median(xs) if xs else float("nan")
            outside += 0 if name in ("call→first", "relay→sent") else m
            cells.append(f"{m * 1e3:.2f}")
        print(f"| {c} | {d * 1e3:.1f} | {ttft * 1e3:.1f} | {(ttft - d) * 1e3:+.1f} | " + " | ".join(cells)
              + f" | {outside * 1e3:.2f} |")


if __name__ == "__main__":
    main()
