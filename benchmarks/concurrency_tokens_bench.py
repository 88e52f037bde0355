#!/usr/bin/env python3
"""SmolLM2 under concurrency: llama.cpp's own OpenAI server, the fabric, and the proxy path.

Three paths to the same model with the same llama.cpp parameters (slots, threads, context):

* ``direct``  client -> llama.cpp's OpenAI server (xllamacpp's, in its own process);
* ``fabric``  client -> cortex -> neuron -> ``llama_cpp`` backend (llama.cpp in a worker
  process of the neuron, the default);
* ``proxy``   client -> cortex -> neuron -> ``openai_proxy`` backend -> the direct server.

and, when asked for (``--paths``), ``fabric-inproc``: the same ``llama_cpp`` model with
``metadata.isolate = false``, llama.cpp in the neuron's own process (what the worker
process's isolation costs).

At each concurrency (``--conc``, default 1,2,4,8) every path runs ``--requests`` streamed
chat completions per client, closed loop, greedy, about ``--tokens`` tokens each (clients
are staggered and lengths vary, identically for every path: see :func:`run_level`);
rounds visit the paths in a rotating order. llama.cpp gets as many slots as the highest
concurrency, so no stream waits for a slot. The client is one thread per stream on plain blocking
sockets (``http.client``), so a token's time is when its bytes arrived. Reported per path
and concurrency: aggregate tokens/s (all completion tokens / wall time of the round,
median over rounds), time to first token p50/p99 and inter-token latency p50/p99
(gaps between consecutive content events, all rounds pooled); then each path paired
with ``direct`` round by round (the same plan of staggers and lengths): the median over
rounds of the tokens/s ratio and of the added TTFT p50 and ITL p99, with the lowest and
highest round.

    flock /tmp/helexa-bench.lock .venv/bin/python benchmarks/concurrency_tokens_bench.py

Also per path: CPU milliseconds per request of the processes that serve it (llama.cpp's
server for ``direct``; the cortex, the neuron and its workers for the fabric's paths, so
``fabric`` includes llama.cpp's own work and ``proxy`` does not), from the threads'
``schedstat`` before and after each round.

``--upstream idle`` (or ``busy``) replaces llama.cpp's server by one with no model that
waits ``--idle-ms`` before the first token and between tokens, sleeping (or computing on
one thread, as llama.cpp's does): with ``direct`` and ``proxy`` it tells what the fabric
adds when a model costs the cores nothing. ``synth`` and ``synth-worker`` are the
``synthetic`` backend at one token per ``--idle-ms``, in the neuron and in a worker process.

``--policies`` measures the fabric's ``cpu_policy`` in the same processes: paths
``NAME-normal`` run with every thread of the cortex, the neuron and its workers under the
normal policy, the plain paths under the policies the processes gave themselves
(``batch``: all but the engines' threads under ``SCHED_BATCH``), switched round by round.
Separate processes per policy would also compare separate llama.cpp instances, whose speed
differs by a few percent from one process to another.

``--json`` keeps every sample. ``--baseline DIR`` also starts a cortex and a neuron from
another source tree with its own virtual environment (``DIR/.venv``, e.g. a ``git archive``
of main with ``./scripts/setup.sh`` run in it, so that its worker processes run that tree
too) and adds its paths as ``base-fabric`` and ``base-proxy``, interleaved with the rest.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import suppress
from pathlib import Path

PROMPT = "Write a long story about a lighthouse keeper."
STAGGER_S = 0.1
"""A client's first request waits up to this long (see :func:`run_level`)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_llama(port: int, slots: int, threads: int, ctx: int) -> None:
    """Run llama.cpp's own OpenAI server on ``port`` until killed (``--serve-llama``)."""
    import xllamacpp

    from helexa.runtime.llama_cpp import default_gguf_path

    params = xllamacpp.CommonParams()
    params.model.path = str(default_gguf_path())
    params.port = port
    params.n_ctx = ctx
    params.n_parallel = slots
    params.cpuparams.n_threads = threads
    params.cpuparams_batch.n_threads = threads
    server = xllamacpp.Server(params)
    print(f"listening on {server.listening_address}", flush=True)
    threading.Event().wait()


def serve_idle(port: int, first_ms: float, gap_ms: float, busy: bool) -> None:
    """Run an OpenAI-style server with no model on ``port`` until killed (``--serve-idle``).

    Each streamed chat completion waits ``first_ms`` and then sends ``max_tokens`` content
    chunks ``gap_ms`` apart, shaped as llama.cpp's (a role chunk with the first token, a
    final chunk, usage, ``[DONE]``; chunked transfer encoding, keep-alive). Without ``busy``
    the waits are sleeps: the fabric in front of it gets idle cores, so what it adds to the
    first token is its own path. With ``busy`` a thread computes through every wait (hashing,
    without the interpreter lock), as llama.cpp's one thread does through a generation.
    """
    import hashlib

    import trio

    block = bytes(1 << 16)

    def spin(seconds: float) -> None:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            hashlib.sha256(block)  # releases the GIL: the trio thread sends meanwhile

    async def wait(ms: float) -> None:
        if busy:
            await trio.to_thread.run_sync(spin, ms / 1e3)
        else:
            await trio.sleep(ms / 1e3)

    async def reply(stream: trio.SocketStream, body: dict) -> None:
        n = int(body.get("max_tokens") or 16)

        def framed(data: bytes) -> bytes:
            return b"%x\r\n%s\r\n" % (len(data), data)

        def chunk(obj: dict) -> bytes:
            return framed(b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n")

        def delta(d: dict, reason: str | None = None) -> dict:
            return {"id": "idle", "object": "chat.completion.chunk", "created": 0, "model": "idle",
                    "choices": [{"index": 0, "delta": d, "finish_reason": reason}]}

        await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                              b"transfer-encoding: chunked\r\nkeep-alive: timeout=5, max=100\r\n\r\n")
        await wait(first_ms)
        await stream.send_all(chunk(delta({"role": "assistant", "content": None})) + chunk(delta({"content": "tok0"})))
        for i in range(1, n):
            await wait(gap_ms)
            await stream.send_all(chunk(delta({"content": f" tok{i}"})))
        usage = {"prompt_tokens": 8, "completion_tokens": n, "total_tokens": n + 8}
        await stream.send_all(chunk(delta({}, "length")) + chunk({**delta({}), "choices": [], "usage": usage})
                              + framed(b"data: [DONE]\n\n") + b"0\r\n\r\n")

    async def handle(stream: trio.SocketStream) -> None:
        buf = b""
        try:
            while True:
                while b"\r\n\r\n" not in buf:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    buf += data
                head, _, buf = buf.partition(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                fields = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
                size = int(fields.get("content-length", 0))
                while len(buf) < size:
                    buf += await stream.receive_some(65536)
                raw, buf = buf[:size], buf[size:]
                path = lines[0].split(" ")[1]
                if path.endswith("/chat/completions"):
                    await reply(stream, json.loads(raw))
                else:  # /health, /v1/models
                    await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                                          b"content-length: 2\r\n\r\n{}")
        except trio.BrokenResourceError:
            return

    print(f"listening on 127.0.0.1:{port}", flush=True)
    trio.run(trio.serve_tcp, handle, port)


def wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    host, port = url.removeprefix("http://").split(":")
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if proc.poll() is not None:
            sys.exit(f"{url}: exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            conn = http.client.HTTPConnection(host, int(port), timeout=2)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    sys.exit(f"{url} not ready after {timeout}s:\n{log.read_text()[-3000:]}")


def one_stream(conn: http.client.HTTPConnection, model: str, tokens: int) -> tuple[float, list[float], int]:
    """One streamed chat completion: (time to first token, inter-token gaps, completion tokens)."""
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": PROMPT}], "stream": True,
                       "max_tokens": tokens, "temperature": 0, "stream_options": {"include_usage": True}})
    for attempt in (1, 2):
        start = time.perf_counter()
        try:
            conn.request("POST", "/v1/chat/completions", body=body, headers={"content-type": "application/json"})
            response = conn.getresponse()
            break
        except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
            # llama.cpp's server closes a connection after a streamed answer without saying
            # so: connect again (the time to do so is not counted).
            conn.close()
            if attempt == 2:
                raise
    if response.status != 200:
        raise RuntimeError(f"{model}: {response.status} {response.read()[:300]!r}")
    stamps: list[float] = []
    used = 0
    while line := response.readline():
        if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
            continue
        now = time.perf_counter()
        event = json.loads(line[6:])
        if event.get("usage"):
            used = event["usage"]["completion_tokens"]
        if any((c.get("delta") or {}).get("content") for c in event.get("choices") or ()):
            stamps.append(now)
    if not stamps:
        raise RuntimeError(f"{model}: no tokens")
    return stamps[0] - start, [b - a for a, b in zip(stamps, stamps[1:])], used


def run_level(url: str, model: str, conc: int, requests: int, tokens: int, seed: int = 0) -> dict:
    """``conc`` clients, ``requests`` streams each, back to back.

    Clients are not in lock step: each starts after a pause of up to ``STAGGER_S`` and
    asks for between half and one and a half times ``tokens`` (both drawn from ``seed``,
    so every path gets the same sequence). In lock step, identical requests sent at the
    same instant all land in llama.cpp's first batch, and any path that spaces them by a
    millisecond (every proxy does) makes the later ones wait a whole batch: a measure of
    the clients' synchrony more than of the path.
    """
    host, port = url.removeprefix("http://").split(":")
    ttft: list[float] = []
    gaps: list[float] = []
    total = [0]
    errors: list[str] = []
    lock = threading.Lock()
    rng = random.Random(seed)
    plans = [(rng.uniform(0, STAGGER_S), [rng.randint(tokens // 2, tokens * 3 // 2) for _ in range(requests)])
             for _ in range(conc)]

    def client(pause: float, lengths: list[int]) -> None:
        conn = http.client.HTTPConnection(host, int(port), timeout=300)
        time.sleep(pause)
        for n in lengths:
            try:
                first, between, used = one_stream(conn, model, n)
            except Exception as exc:  # reported, and the round goes on
                errors.append(str(exc))
                conn.close()
                continue
            with lock:
                ttft.append(first)
                gaps.extend(between)
                total[0] += used
        conn.close()

    threads = [threading.Thread(target=client, args=plan, daemon=True) for plan in plans]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return {"tokens_per_s": total[0] / wall, "ttft": ttft, "gaps": gaps, "errors": errors, "wall": wall}


def cpu_parts(procs: list[subprocess.Popen]) -> dict[str, float]:
    """CPU time used so far by ``procs``, their live children (a neuron's workers) and all
    their threads, in nanoseconds' resolution (``/proc/PID/task/TID/schedstat``; the
    clock-tick figures of ``stat`` are too coarse for a few requests), in parts: each of
    ``procs`` by its place (``p0``, ``p1``: the cortex and the neuron of a fabric), and its
    children's main threads (``trio``: a worker's event loop) apart from their other
    threads (``threads``: llama.cpp's, its callback threads among them). ``PART#`` counts
    the part's time slices (the third field of ``schedstat``: each wake-up, and each
    preemption, starts one)."""
    import psutil

    parts: dict[str, float] = {}
    for i, p in enumerate(procs):
        try:
            pids = [(f"p{i}", p.pid, None), *(("child", c.pid, c.pid) for c in psutil.Process(p.pid).children(recursive=True))]
        except psutil.Error:
            continue
        for label, pid, main in pids:
            for task in Path(f"/proc/{pid}/task").glob("*"):
                try:
                    fields = (task / "schedstat").read_text().split()
                    ns, slices = int(fields[0]), int(fields[2])
                except (OSError, ValueError, IndexError):
                    continue
                part = label if main is None else "trio" if int(task.name) == main else "threads"
                parts[part] = parts.get(part, 0.0) + ns / 1e9
                parts[part + "#"] = parts.get(part + "#", 0.0) + slices
    return parts


PARTS = ("p0", "p1", "trio", "threads")
"""The CPU parts reported (:func:`cpu_parts`): for a fabric's paths the cortex, the neuron,
the worker's trio thread and the worker's other threads; for ``direct``, p0 is llama.cpp's
server."""


def fabric_threads(servers: dict[str, list[subprocess.Popen]]) -> list[int]:
    """Every thread of the fabric's processes (all but ``direct``'s) and of their children
    (a neuron's workers)."""
    import psutil

    tids = []
    for tag, procs in servers.items():
        for p in procs if tag != "direct" else ():
            try:
                pids = [p.pid, *(c.pid for c in psutil.Process(p.pid).children(recursive=True))]
            except psutil.Error:
                continue
            tids += [int(t.name) for pid in pids for t in Path(f"/proc/{pid}/task").glob("*")]
    return tids


def engine_threads(servers: dict[str, list[subprocess.Popen]]) -> set[int]:
    """The fabric's threads not under SCHED_BATCH as they run by themselves: under
    ``cpu_policy = "batch"``, the engines' own (llama.cpp's loop)."""
    out = set()
    for tid in fabric_threads(servers):
        with suppress(OSError):
            if os.sched_getscheduler(tid) != os.SCHED_BATCH:
                out.add(tid)
    return out


def set_policy(servers: dict[str, list[subprocess.Popen]], engines: set[int], *, normal: bool) -> None:
    """``normal``: every thread of the fabric under SCHED_OTHER (``cpu_policy = "normal"``);
    else as its own policy had them (``engines`` normal, the rest batch), threads started
    since among the rest."""
    for tid in fabric_threads(servers):
        with suppress(OSError):
            os.sched_setscheduler(tid, os.SCHED_OTHER if normal or tid in engines else os.SCHED_BATCH,
                                  os.sched_param(0))


def place(servers: dict[str, list[subprocess.Popen]], *, pinned: bool) -> None:
    """Pinned: every engine thread (llama.cpp's server, the neuron's worker processes) on
    CPU 0 and every fabric process and this client on the other CPUs; else all anywhere."""
    import psutil

    every = set(range(os.cpu_count() or 1))
    engine, rest = ({0}, every - {0}) if pinned and len(every) > 1 else (every, every)
    os.sched_setaffinity(0, rest)  # the clients' threads, started after this, inherit it
    for tag, procs in servers.items():
        for i, p in enumerate(procs):
            try:
                kids = psutil.Process(p.pid).children(recursive=True)
            except psutil.Error:
                continue
            for pid, cpus in [(p.pid, engine if tag == "direct" else rest), *((c.pid, engine) for c in kids)]:
                for task in Path(f"/proc/{pid}/task").glob("*"):
                    try:
                        os.sched_setaffinity(int(task.name), cpus)
                    except OSError:
                        pass


def slices_text(slices: dict[str, float]) -> str:
    return " / ".join(f"{slices.get(k, 0.0):.2f}" for k in PARTS)


def parts_text(parts: dict[str, float]) -> str:
    return " / ".join(f"{parts.get(k, 0.0) * 1e3:.2f}" for k in PARTS)


def pct(xs: list[float], p: int) -> float:
    if len(xs) < 2:
        return xs[0] if xs else float("nan")
    return statistics.quantiles(xs, n=100, method="inclusive")[p - 1]


def stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM every process, last started first; SIGKILL the group of one still there after 20 s."""
    for p in reversed(procs):
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in reversed(procs):
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--conc", default="1,2,4,8")
    ap.add_argument("--paths", default="direct,fabric,proxy")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=3, help="streams per client per round")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--slots", type=int, help="llama.cpp n_parallel, both servers (default: the highest "
                    "concurrency, so that no stream waits for a slot)")
    ap.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) - 1), help="llama.cpp threads")
    ap.add_argument("--ctx", type=int, default=4096)
    ap.add_argument("--warmup", type=float, default=5.0, help="seconds each path serves before the rounds")
    ap.add_argument("--json", help="write every sample here")
    ap.add_argument("--baseline", help="another source tree with its own .venv: adds base-fabric, base-proxy")
    ap.add_argument("--upstream", choices=("llama", "idle", "busy"), default="llama",
                    help="what direct and proxy reach: llama.cpp's server, or one with no model that "
                    "waits --idle-ms before the first token and between tokens, sleeping (idle) or "
                    "computing on one thread (busy); see serve_idle")
    ap.add_argument("--idle-ms", type=float, default=20.0)
    ap.add_argument("--policies", action="store_true",
                    help="add paths NAME-normal for each fabric path: before each of their rounds every thread of "
                    "the fabric's processes is put under the normal policy (cpu_policy = \"normal\"), before the "
                    "others' back under the policies they started with; the same processes serve both")
    ap.add_argument("--pin", action="store_true",
                    help="add paths NAME-pin for each path: the engines (llama.cpp's server, the neuron's "
                    "workers) on the first CPU, the fabric's processes and the clients on the others, "
                    "switched round by round in the same processes")
    ap.add_argument("--serve-llama", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--serve-idle", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.slots is None:
        a.slots = max(int(c) for c in a.conc.split(","))
    if a.serve_llama:
        serve_llama(a.serve_llama, a.slots, a.threads, a.ctx)
        return
    if a.serve_idle:
        serve_idle(a.serve_idle, a.idle_ms, a.idle_ms, a.upstream == "busy")
        return

    work = Path(tempfile.mkdtemp(prefix="helexa-conc-bench-"))
    procs: list[subprocess.Popen] = []

    def start(name: str, args: list[str], cwd: str | None = None) -> tuple[subprocess.Popen, Path]:
        log = work / f"{name}.log"
        p = subprocess.Popen(args, stdout=open(log, "wb"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             start_new_session=True, cwd=cwd)
        procs.append(p)
        return p, log

    try:
        port = free_port()
        direct = f"http://127.0.0.1:{port}"
        if a.upstream != "llama":
            p, log = start("idle-server", [sys.executable, __file__, "--serve-idle", str(port),
                                           "--idle-ms", str(a.idle_ms), "--upstream", a.upstream])
        else:
            p, log = start("llama-server", [sys.executable, __file__, "--serve-llama", str(port), "--slots",
                                            str(a.slots), "--threads", str(a.threads), "--ctx", str(a.ctx)])
        wait_ready(direct, p, log)
        servers: dict[str, list[subprocess.Popen]] = {"direct": [p]}  # whose CPU each path costs
        models = work / "models.toml"
        models.write_text(f"""
[models."smollm2"]
backend = "llama_cpp"
max_context = {a.ctx // a.slots}
[models."smollm2".config]
metadata = {{ n_ctx = {a.ctx}, n_parallel = {a.slots}, n_threads = {a.threads} }}

[models."smollm2-inproc"]
backend = "llama_cpp"
max_context = {a.ctx // a.slots}
[models."smollm2-inproc".config]
metadata = {{ n_ctx = {a.ctx}, n_parallel = {a.slots}, n_threads = {a.threads}, isolate = false }}

[models."smollm2-proxy"]
backend = "openai_proxy"
max_context = {a.ctx // a.slots}
[models."smollm2-proxy".config]
listen_endpoint = "{direct}"
metadata = {{ dialect = "llama.cpp", upstream_model = "smollm2" }}

[models."synth"]
backend = "synthetic"
[models."synth".config]
metadata = {{ tokens = {a.tokens * 2}, tokens_per_second = {1e3 / a.idle_ms} }}

[models."synth-worker"]
backend = "synthetic"
[models."synth-worker".config]
metadata = {{ tokens = {a.tokens * 2}, tokens_per_second = {1e3 / a.idle_ms}, isolate = true }}
""")

        def fabric(tag: str, python: str, cwd: str | None) -> str:
            control, gw = free_port(), free_port()
            exe = [python, "-m", "helexa.cli"]
            data = work / f"{tag}c"
            p, log = start(f"{tag}cortex", exe + ["cortex", "--data-dir", str(data), "--control-socket",
                                                  f"127.0.0.1:{control}", "--gateway-socket", f"127.0.0.1:{gw}",
                                                  "--models", str(models), "--log-level", "info"], cwd)
            while not (data / "join-token").exists() or "cortex ready" not in log.read_text():
                if p.poll() is not None:
                    sys.exit(f"{tag}cortex exited:\n" + log.read_text()[-3000:])
                time.sleep(0.1)
            servers[tag] = [p]
            n, _ = start(f"{tag}neuron", exe + ["neuron", "--cortex", f"ws://127.0.0.1:{control}", "--node-id", "bench",
                                         "--join-token-file", str(data / "join-token"), "--log-level", "warning"], cwd)
            servers[tag].append(n)
            return f"http://127.0.0.1:{gw}"

        gateway = fabric("", sys.executable, None)
        # synth, synth-worker: the synthetic backend at one token per --idle-ms, in the
        # neuron and in a worker process (no upstream at all).
        own = {"fabric": "smollm2", "fabric-inproc": "smollm2-inproc", "proxy": "smollm2-proxy", "synth": "synth", "synth-worker": "synth-worker"}
        targets = {"direct": (direct, "smollm2"), **{k: (gateway, m) for k, m in own.items()}}
        if a.baseline:
            tree = Path(a.baseline).resolve()
            base = fabric("base-", str(tree / ".venv" / "bin" / "python"), str(tree))
            targets.update({f"base-{k}": (base, m) for k, m in own.items()})
            if "base" not in a.paths:
                a.paths += ",base-fabric,base-proxy"
        targets = {k: v for k, v in targets.items() if k in a.paths.split(",")}
        if a.policies:
            targets.update({f"{k}-normal": v for k, v in list(targets.items()) if k != "direct"})
        if a.pin:
            targets.update({f"{k}-pin": v for k, v in list(targets.items())})
        deadline = time.monotonic() + 120
        for name, (url, model) in targets.items():  # cold loads and warm-up
            while True:
                try:
                    run_level(url, model, 1, 1, 8)
                    break
                except (OSError, RuntimeError, http.client.HTTPException):
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.5)
            # Serve a few seconds more before measuring: what a load leaves running in the
            # background (the neuron reading the GGUF's tokenizer for its prompt counts)
            # would otherwise land in the first round's figures, not the steady state's.
            settle = time.monotonic() + a.warmup
            while time.monotonic() < settle:
                run_level(url, model, 1, 1, 8)
        engines = engine_threads(servers) if a.policies else set()
        concs = [int(c) for c in a.conc.split(",")]
        load_before = " ".join(f"{x:.1f}" for x in os.getloadavg())
        raw: dict[str, list[dict]] = {}
        names = list(targets)
        for r in range(a.rounds):
            for c in concs:
                order = names[r % len(names):] + names[:r % len(names)]
                for name in order:
                    url, model = targets[name]
                    plain = name.removesuffix("-pin").removesuffix("-normal")
                    if a.policies:
                        set_policy(servers, engines, normal=name.endswith("-normal"))
                    side = servers["direct" if plain == "direct" else "base-" if plain.startswith("base-") else ""]
                    place(servers, pinned=name.endswith("-pin"))
                    before = cpu_parts(side)
                    res = run_level(url, model, c, a.requests, a.tokens, seed=r * 1000 + c)
                    after, n = cpu_parts(side), max(1, len(res["ttft"]))
                    res["cpu_parts"] = {k: (v - before.get(k, 0.0)) / n for k, v in after.items()}
                    streamed = max(1, len(res["ttft"]) + len(res["gaps"]))  # token events the clients saw
                    res["slices_per_event"] = {k[:-1]: (v - before.get(k, 0.0)) / streamed
                                               for k, v in after.items() if k.endswith("#")}
                    res["cpu_parts"] = {k: v for k, v in res["cpu_parts"].items() if not k.endswith("#")}
                    res["cpu_per_request"] = sum(res["cpu_parts"].values())
                    raw.setdefault(f"{name}|{c}", []).append(res)
                    print(f"# r{r} c={c} {name:6s} {res['tokens_per_s']:7.1f} tok/s  ttft p50 "
                          f"{pct(res['ttft'], 50) * 1e3:6.1f} ms  itl p99 {pct(res['gaps'], 99) * 1e3:6.1f} ms"
                          f"  cpu {res['cpu_per_request'] * 1e3:5.2f} ms/req ({parts_text(res['cpu_parts'])})"
                          f"  slices/event {slices_text(res['slices_per_event'])}"
                          f"  errors {len(res['errors'])} {res['errors'][:1]}", file=sys.stderr, flush=True)
    finally:
        stop(procs)

    print(f"\nSmolLM2-135M-Instruct, {a.slots} slots, {a.threads} llama.cpp thread(s), {a.tokens // 2}-"
          f"{a.tokens * 3 // 2} tokens per stream, {a.requests} streams per client per round, {a.rounds} rounds; "
          f"load average {load_before} before, {' '.join(f'{x:.1f}' for x in os.getloadavg())} after\n")
    print("| concurrency | path | tokens/s | vs direct | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms "
          "| added TTFT p50 | added ITL p99 | CPU ms/request | of which cortex / neuron / worker trio / worker others"
          " | errors |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|")
    for c in concs:
        base = raw.get(f"direct|{c}")
        for name in names:
            runs = raw[f"{name}|{c}"]
            tps = statistics.median(x["tokens_per_s"] for x in runs)
            ttft = [t for x in runs for t in x["ttft"]]
            gaps = [g for x in runs for g in x["gaps"]]
            if base:
                d_tps = statistics.median(x["tokens_per_s"] for x in base)
                d_ttft = [t for x in base for t in x["ttft"]]
                d_gaps = [g for x in base for g in x["gaps"]]
                vs = f"{tps / d_tps:.1%}"
                added = (f"{(pct(ttft, 50) - pct(d_ttft, 50)) * 1e3:+.1f}", f"{(pct(gaps, 99) - pct(d_gaps, 99)) * 1e3:+.1f}")
            else:
                vs, added = "", ("", "")
            errors = sum(len(x["errors"]) for x in runs)
            print(f"| {c} | {name} | {tps:.1f} | {vs} | {pct(ttft, 50) * 1e3:.1f} | {pct(ttft, 99) * 1e3:.1f} | "
                  f"{pct(gaps, 50) * 1e3:.1f} | {pct(gaps, 99) * 1e3:.1f} | {added[0]} | {added[1]} | "
                  f"{statistics.median(x['cpu_per_request'] for x in runs) * 1e3:.2f} | "
                  f"{parts_text({k: statistics.median(x['cpu_parts'].get(k, 0.0) for x in runs) for k in PARTS})} | "
                  f"{errors} |")
    print(paired_table(raw, concs, names))
    if a.json:
        Path(a.json).write_text(json.dumps(raw))


def paired_table(raw: dict[str, list[dict]], concs: list[int], names: list[str]) -> str:
    """Each path against ``direct`` round by round: within a round both ran the same plan
    (the same stagger and lengths, see :func:`run_level`) minutes apart at most, where the
    pooled figures above compare medians of rounds that ran different plans. Median over
    rounds, and the lowest and highest round in brackets."""
    rows = ["", "Paired by round (each round's path against direct's in the same round): median [min, max] over rounds", "",
            "| concurrency | path | tokens/s vs direct | added TTFT p50 ms | added ITL p99 ms |", "|---:|---|---:|---:|---:|"]

    def spread(xs: list[float], fmt: str) -> str:
        return f"{fmt.format(statistics.median(xs))} [{fmt.format(min(xs))}, {fmt.format(max(xs))}]"

    for c in concs:
        base = raw.get(f"direct|{c}")
        if not base:
            continue
        for name in names:
            if name == "direct":
                continue
            pairs = list(zip(raw[f"{name}|{c}"], base))
            ratio = [x["tokens_per_s"] / d["tokens_per_s"] for x, d in pairs]
            ttft = [(pct(x["ttft"], 50) - pct(d["ttft"], 50)) * 1e3 for x, d in pairs]
            itl = [(pct(x["gaps"], 99) - pct(d["gaps"], 99)) * 1e3 for x, d in pairs]
            rows.append(f"| {c} | {name} | {spread([r * 100 for r in ratio], '{:.1f}%')} | "
                        f"{spread(ttft, '{:+.1f}')} | {spread(itl, '{:+.1f}')} |")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
