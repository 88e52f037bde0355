"""Tokens/s and time to first token for SmolLM2 through the whole fabric (client -> cortex
gateway -> websocket -> neuron -> worker process -> llama.cpp) against xllamacpp called
directly in this process with the same parameters.

    flock /tmp/helexa-bench.lock .venv/bin/python benchmarks/fabric_tokens_bench.py [--rounds 7]

Rounds run direct / fabric (the model in a worker process, the default) / fabric with the
model in the neuron's own process (``metadata.isolate = false``, the same GGUF as a
second model id), in an order that rotates each round; figures are medians. The direct path uses the neuron's default thread
count (all cores but one), so every path runs llama.cpp the same way; each measurement runs
while the others are idle (their models stay loaded).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

PROMPT = "Write a long story about a lighthouse keeper."
MODEL = "smollm2-135m-instruct"
IN_PROCESS = "smollm2-in-process"
MODELS_TOML = f"""
[models."{MODEL}"]
backend = "llama_cpp"
memory_mb = 300
idle_ttl = 0
[models."{MODEL}".config]
metadata = {{ n_ctx = 4096 }}

[models."{IN_PROCESS}"]
backend = "llama_cpp"
memory_mb = 300
idle_ttl = 0
[models."{IN_PROCESS}".config]
metadata = {{ n_ctx = 4096, isolate = false }}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# One client for every request: a bare httpx.stream() builds a client (and an SSL context)
# per call, ~30 ms that an earlier version of this benchmark counted as first-token time.
CLIENT = httpx.Client()


def through_fabric(gateway: str, tokens: int, model: str = MODEL) -> tuple[float, float, int]:
    body = {
        "model": model, "messages": [{"role": "user", "content": PROMPT}], "stream": True,
        "max_tokens": tokens, "temperature": 0, "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    first = None
    n = 0
    with CLIENT.stream("POST", gateway + "/v1/chat/completions", json=body, timeout=120) as r:
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ev = json.loads(line[6:])
            if ev.get("usage"):
                n = ev["usage"]["completion_tokens"]
            if first is None and any((c.get("delta") or {}).get("content") for c in ev.get("choices", [])):
                first = time.perf_counter()
    end = time.perf_counter()
    return first - start, (n - 1) / (end - first), n


def direct(server, tokens: int) -> tuple[float, float, int]:
    body = {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}], "stream": True,
            "max_tokens": tokens, "temperature": 0, "stream_options": {"include_usage": True}}
    times: list[float] = []
    usage = {}

    def cb(chunk):
        if isinstance(chunk, str):
            chunk = json.loads(chunk)
        if chunk.get("usage"):
            usage.update(chunk["usage"])
        if any((c.get("delta") or {}).get("content") for c in chunk.get("choices", [])):
            times.append(time.perf_counter())
        return False

    start = time.perf_counter()
    server.handle_chat_completions(body, cb)
    end = time.perf_counter()
    n = usage.get("completion_tokens", len(times))
    return times[0] - start, (n - 1) / (end - times[0]), n


def fabric_cpu(*pids: int) -> float:
    """CPU seconds used so far by ``pids`` and all their descendants."""
    import psutil

    total = 0.0
    for pid in pids:
        root = psutil.Process(pid)
        for p in (root, *root.children(recursive=True)):
            try:
                t = p.cpu_times()
            except psutil.NoSuchProcess:
                continue
            total += t.user + t.system
    return total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--tokens", type=int, default=128)
    args = ap.parse_args()

    from helexa.runtime.llama_cpp import default_gguf_path
    import xllamacpp

    work = Path(tempfile.mkdtemp(prefix="helexa-bench-"))
    control, gw = free_port(), free_port()
    gateway = f"http://127.0.0.1:{gw}"
    exe = [sys.executable, "-m", "helexa.cli"]
    logs = open(work / "fabric.log", "w")
    (work / "models.toml").write_text(MODELS_TOML)
    cortex = subprocess.Popen(exe + ["cortex", "--data-dir", str(work / "c"), "--control-socket", f"127.0.0.1:{control}",
                                     "--gateway-socket", f"127.0.0.1:{gw}", "--log-level", "warning",
                                     "--models", str(work / "models.toml")],
                              stdout=logs, stderr=subprocess.STDOUT)
    while not (work / "c" / "join-token").exists():
        time.sleep(0.1)
    neuron = subprocess.Popen(exe + ["neuron", "--cortex", f"ws://127.0.0.1:{control}", "--node-id", "bench",
                                     "--join-token-file", str(work / "c" / "join-token"), "--log-level", "warning"],
                              stdout=logs, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                token = (work / "c" / "admin-token").read_text().strip()
                if httpx.get(gateway + "/admin/fleet", timeout=2,
                             headers={"authorization": f"Bearer {token}"}).json()["neurons"]:
                    break
            except (httpx.HTTPError, OSError, ValueError, KeyError):
                pass
            time.sleep(0.2)
        through_fabric(gateway, 8)  # cold loads + warm-up
        through_fabric(gateway, 8, IN_PROCESS)

        params = xllamacpp.CommonParams()
        params.model.path = str(default_gguf_path())
        params.n_ctx = 4096
        params.n_parallel = 2
        threads = max(1, (os.cpu_count() or 2) - 1)
        params.cpuparams.n_threads = threads
        params.cpuparams_batch.n_threads = threads
        server = xllamacpp.Server(params)
        direct(server, 8)

        rows = {"direct": [], "fabric": [], "in-process": []}
        paths = {
            "direct": lambda: direct(server, args.tokens),
            "fabric": lambda: through_fabric(gateway, args.tokens),
            "in-process": lambda: through_fabric(gateway, args.tokens, IN_PROCESS),
        }
        cpu = {"fabric": [], "in-process": []}
        order = list(paths)
        for i in range(args.rounds):
            for name in order[i % 3:] + order[: i % 3]:  # each path goes first, second, third in turn
                before = fabric_cpu(cortex.pid, neuron.pid)
                rows[name].append(paths[name]())
                if name in cpu:
                    cpu[name].append((fabric_cpu(cortex.pid, neuron.pid) - before) / rows[name][-1][2])
        med = {k: (statistics.median(r[0] for r in v) * 1000, statistics.median(r[1] for r in v),
                   statistics.median(r[2] for r in v)) for k, v in rows.items()}
        print(f"SmolLM2-135M-Instruct, {threads} llama.cpp thread(s), {args.rounds} rounds, greedy, max {args.tokens} tokens")
        names = {"direct": "direct", "fabric": "fabric, model in a worker", "in-process": "fabric, model in the neuron"}
        for k, (ttft, tps, n) in med.items():
            print(f"  {names[k]:>27}: ttft {ttft:6.1f} ms   decode {tps:6.1f} tok/s   ({n:.0f} tokens)")
        print(f"fabric (worker) / direct decode tokens/s: {med['fabric'][1] / med['direct'][1]:.1%}")
        print(f"fabric (in the neuron) / direct decode tokens/s: {med['in-process'][1] / med['direct'][1]:.1%}")
        print("CPU per token, cortex + neuron + its workers (llama.cpp's decoding included): "
              + ", ".join(f"{names[k]} {statistics.median(v) * 1000:.2f} ms" for k, v in cpu.items()))
    finally:
        for p in (neuron, cortex):
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()


if __name__ == "__main__":
    main()
