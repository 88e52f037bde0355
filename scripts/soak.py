#!/usr/bin/env python3
"""Soak a cortex and neurons: mixed load for a set time with random neuron restarts;
reports errors (those near an injected restart apart from the rest), the cortex's and the
neurons' memory (RSS) over time and their open file descriptors.

    .venv/bin/python scripts/soak.py --minutes 30                 # the issue's target run
    .venv/bin/python scripts/soak.py --minutes 3 --neurons 2 --restart-every 30

Real ``helexa cortex`` / ``helexa neuron`` processes (``tests/e2e/procs.py``) serving
``synthetic`` models (so the run measures the fabric, not a model): a streamed chat, a
plain chat, a completion, ``/v1/models`` and a malformed request (a 400), from
``--clients`` threads back to back. Every ``--restart-every`` seconds one neuron is killed
with SIGKILL and started again. A failed request counts as injected when it ended within
``--fault-window`` seconds after a kill. The target: 0 errors beyond the injected ones, and
memory that ends where it settled (the RSS growth from the first sample after warm-up to
the last is printed). Exits 1 when an error is not injected.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests" / "e2e")]

from procs import ProcGroup  # noqa: E402

MODELS = """
[models."chat"]
backend = "synthetic"
keep_warm = true
[models."chat".config]
metadata = { tokens = 40, tokens_per_second = 400 }

[models."chat2"]
backend = "synthetic"
[models."chat2".config]
metadata = { tokens = 10 }
"""


def sample(procs: dict[str, int]) -> dict[str, dict[str, float]]:
    out = {}
    for name, pid in procs.items():
        try:
            p = psutil.Process(pid)
            kids = p.children(recursive=True)
            out[name] = {"rss_mb": round(sum(x.memory_info().rss for x in [p, *kids]) / 2**20, 1),
                         "fds": sum(x.num_fds() for x in [p, *kids])}
        except psutil.NoSuchProcess:
            pass
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--neurons", type=int, default=2)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--restart-every", type=float, default=60.0)
    ap.add_argument("--fault-window", type=float, default=5.0)
    ap.add_argument("--sample-every", type=float, default=10.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="helexa-soak-"))
    kills: list[float] = []
    errors: list[tuple[float, str]] = []
    counts = {"ok": 0, "expected_4xx": 0}
    stop = threading.Event()
    lock = threading.Lock()
    samples: list[dict] = []
    with ProcGroup(work) as group:
        cortex = group.cortex(models=MODELS)
        neurons = {f"n{i}": group.neuron(cortex, f"n{i}") for i in range(1, args.neurons + 1)}
        url = cortex.gateway_url

        def client(k: int) -> None:
            crng = random.Random(args.seed * 100 + k)
            with httpx.Client(base_url=url, timeout=30) as http:
                while not stop.is_set():
                    kind = crng.choice(["stream", "chat", "chat2", "completion", "models", "bad"])
                    try:
                        if kind == "stream":
                            with http.stream("POST", "/v1/chat/completions", json={
                                    "model": "chat", "stream": True, "messages": [{"role": "user", "content": "x"}]}) as r:
                                body = "".join(r.iter_text())
                            ok = r.status_code == 200 and '"error"' not in body and body.rstrip().endswith("[DONE]")
                            detail = f"stream {r.status_code} {body[-200:]!r}"
                        elif kind in ("chat", "chat2"):
                            r = http.post("/v1/chat/completions", json={
                                "model": kind, "messages": [{"role": "user", "content": "x"}]})
                            ok, detail = r.status_code == 200, f"{kind} {r.status_code} {r.text[:200]}"
                        elif kind == "completion":
                            r = http.post("/v1/completions", json={"model": "chat", "prompt": "x", "max_tokens": 8})
                            ok, detail = r.status_code == 200, f"completion {r.status_code} {r.text[:200]}"
                        elif kind == "models":
                            r = http.get("/v1/models")
                            ok, detail = r.status_code == 200, f"models {r.status_code}"
                        else:
                            r = http.post("/v1/chat/completions", json={"model": "chat", "messages": "nope"})
                            ok, detail = r.status_code == 400, f"bad {r.status_code} {r.text[:200]}"
                            if ok:
                                with lock:
                                    counts["expected_4xx"] += 1
                                continue
                    except httpx.HTTPError as exc:
                        ok, detail = False, f"{kind} {type(exc).__name__}: {exc}"
                    with lock:
                        if ok:
                            counts["ok"] += 1
                        else:
                            errors.append((time.monotonic(), detail))

        threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(args.clients)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        end = t0 + args.minutes * 60
        next_kill, next_sample = t0 + args.restart_every, t0
        while time.monotonic() < end:
            now = time.monotonic()
            if now >= next_sample:
                pids = {"cortex": cortex.pid, **{n: p.pid for n, p in neurons.items() if p.alive}}
                samples.append({"t": round(now - t0), **sample(pids)})
                print(json.dumps(samples[-1]), file=sys.stderr, flush=True)
                next_sample += args.sample_every
            if now >= next_kill:
                name = rng.choice(sorted(neurons))
                kills.append(time.monotonic())  # before the kill: its errors follow it at once
                neurons[name].kill()
                group.procs.remove(neurons[name])
                neurons[name] = group.neuron(cortex, name, timeout=60)
                next_kill += args.restart_every
            time.sleep(0.2)
        stop.set()
        for t in threads:
            t.join(timeout=60)
        cortex_log = cortex.log()
    injected = [e for e in errors if any(k <= e[0] <= k + args.fault_window for k in kills)]
    other = [e for e in errors if e not in injected]
    warm = [s for s in samples if s["t"] >= min(60, args.minutes * 30)] or samples
    growth = {name: round(warm[-1][name]["rss_mb"] - warm[0][name]["rss_mb"], 1)
              for name in ("cortex",) if name in warm[0] and name in warm[-1]}
    report = {
        "minutes": args.minutes, "neurons": args.neurons, "clients": args.clients, "restarts": len(kills),
        "requests_ok": counts["ok"], "expected_400s": counts["expected_4xx"], "errors_injected": len(injected),
        "errors_other": len(other), "other_examples": [d for _, d in other[:5]],
        "injected_examples": [d for _, d in injected[:3]],
        "cortex_rss_mb_first_last": [warm[0]["cortex"]["rss_mb"], warm[-1]["cortex"]["rss_mb"]],
        "cortex_rss_growth_mb_after_warmup": growth.get("cortex"),
        "cortex_fds_first_last": [samples[0]["cortex"]["fds"], samples[-1]["cortex"]["fds"]],
        "cortex_rss_mb_max": max(s["cortex"]["rss_mb"] for s in samples),
        "tracebacks_in_cortex_log": cortex_log.count("Traceback"), "samples": len(samples), "workdir": str(work),
    }
    print(json.dumps(report, indent=1))
    return 0 if not other and report["tracebacks_in_cortex_log"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
