#!/usr/bin/env python3
"""Fuzz a cortex's gateway at length: thousands of hostile requests, status codes counted.

The requests are the suite's (``tests/cortex/fuzz_bodies.py``): OpenAI's shapes with one or
two hostile values (wrong types, integers beyond 64 bits, NaN, deep nesting, odd Unicode),
and garbage. The target is 0 answers of 5xx and 0 tracebacks in the cortex's and the
neuron's logs; every 4xx must be OpenAI's error envelope.

    .venv/bin/python scripts/fuzz_gateway.py                       # own cortex + neuron (SmolLM2)
    .venv/bin/python scripts/fuzz_gateway.py --requests 20000 --concurrency 4
    .venv/bin/python scripts/fuzz_gateway.py --gateway http://127.0.0.1:8080   # a running cortex

Without ``--gateway`` it starts ``helexa cortex`` and ``helexa neuron`` here (SmolLM2
through llama.cpp with ``max_output = 16``, so that a body without ``max_tokens`` does not
generate for minutes; MiniLM embeddings), sends the requests only to that
loopback gateway, and reads their logs afterwards. Exits 1 when any answer was a 5xx or a
log holds a traceback. Prints the counts per status code and path, and examples of anything
unexpected.
"""

from __future__ import annotations

import argparse
import collections
import json
import signal
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests" / "cortex"), str(ROOT / "tests" / "e2e")]

CHAT, EMBED = "smollm2-135m-instruct", "all-minilm-l6-v2"
MODELS_TOML = f"""
[models."{CHAT}"]
backend = "llama_cpp"
memory_mb = 300
max_output = 16          # a body without max_tokens must not generate for minutes
[models."{CHAT}".config]
metadata = {{ n_ctx = 4096 }}

[models."{EMBED}"]
backend = "embeddings"
workloads = ["embedding"]
memory_mb = 100
max_context = 256
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gateway", help="a running cortex's gateway URL (default: start one here)")
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds allowed for one answer")
    parser.add_argument("--keep", type=Path, help="a directory to keep the processes' logs and every failing body in")
    args = parser.parse_args()
    # A SIGTERM (a timeout) unwinds like an exception, so the cortex and neuron started
    # here are stopped too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)

    from hypothesis import HealthCheck, Phase, given, seed, settings

    from fuzz_bodies import requests

    counts: collections.Counter[tuple[str, int]] = collections.Counter()
    unexpected: list[str] = []
    stream_errors: collections.Counter[str] = collections.Counter()
    lock = threading.Lock()
    slots = threading.BoundedSemaphore(args.concurrency)

    def run(url: str) -> None:
        client = httpx.Client(base_url=url, timeout=args.timeout,
                              limits=httpx.Limits(max_connections=args.concurrency))
        pool = ThreadPoolExecutor(args.concurrency)

        def send(path: str, body: bytes) -> None:
            try:
                r = client.post(path, content=body, headers={"content-type": "application/json"})
                status, text = r.status_code, r.text
            except httpx.HTTPError as exc:
                status, text = 0, f"{type(exc).__name__}: {exc}"
            finally:
                slots.release()
            problem = None
            if status == 0 or status >= 500:
                problem = f"{status} {path} {text[:300]} <- {body[:300]!r}"
                if args.keep:
                    with lock, (args.keep / "failing-bodies.jsonl").open("a") as f:
                        f.write(json.dumps({"path": path, "status": status, "answer": text[:2000],
                                            "body": body.decode("utf-8", "replace")}) + "\n")
            elif status >= 400:
                try:
                    error = json.loads(text)["error"]
                    assert error["message"] and error["type"]
                except (ValueError, KeyError, TypeError, AssertionError):
                    problem = f"{status} without OpenAI's envelope: {text[:300]}"
            elif '"error"' in text and "[DONE]" not in text and text.startswith("data:"):
                with lock:
                    stream_errors[text[text.find('"error"'):][:200]] += 1
            with lock:
                counts[(path, status)] += 1
                if problem and len(unexpected) < 50:
                    unexpected.append(problem)

        sent = [0]
        started = time.monotonic()

        @seed(args.seed)
        @settings(max_examples=args.requests, deadline=None, database=None, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @given(requests([CHAT, EMBED], chat_models=[CHAT]))
        def fuzz(request: tuple[str, bytes]) -> None:
            slots.acquire()
            pool.submit(send, *request)
            sent[0] += 1
            if sent[0] % 50 == 0:
                print(f"  {sent[0]} sent, {time.monotonic() - started:.0f}s", file=sys.stderr)

        fuzz()
        pool.shutdown(wait=True)
        client.close()

    tracebacks: dict[str, int] = {}
    if args.gateway:
        run(args.gateway)
    else:
        from procs import ProcGroup

        with tempfile.TemporaryDirectory(prefix="helexa-fuzz-") as tmp:
            with ProcGroup(Path(tmp)) as procs:
                cortex = procs.cortex(models=MODELS_TOML, env={"HELEXA_MISSED_HEARTBEATS": "10"})
                procs.neuron(cortex, "n1")
                run(cortex.gateway_url)
            tracebacks = {p.name: p.log().count("Traceback") for p in procs.procs}  # after a clean stop
            if args.keep:
                for p in procs.procs:
                    (args.keep / f"{p.name}.log").write_text(p.log())
    total = sum(counts.values())
    print(f"\n{total} requests")
    for (path, status), n in sorted(counts.items()):
        print(f"  {status:>3}  {path:<22} {n}")
    if stream_errors:
        print("error events inside 200 streams:")
        for text, n in stream_errors.most_common(10):
            print(f"  {n} x {text}")
    failures = sum(n for (_, status), n in counts.items() if status == 0 or status >= 500)
    if not args.gateway:
        print(f"tracebacks in logs: {tracebacks}")
        failures += sum(tracebacks.values())
    for line in unexpected:
        print("UNEXPECTED", line)
    print(f"5xx or no answer: {sum(n for (_, s), n in counts.items() if s == 0 or s >= 500)}")
    return 1 if failures or unexpected else 0


if __name__ == "__main__":
    sys.exit(main())
