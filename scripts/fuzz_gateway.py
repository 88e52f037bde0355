#!/usr/bin/env python3
"""Fuzz a cortex's gateway at length: thousands of hostile requests, status codes counted.

The requests are the suite's (``tests/cortex/fuzz_bodies.py``): OpenAI's shapes with one or
two hostile values (wrong types, integers beyond 64 bits, NaN, deep nesting, odd Unicode),
and garbage. The target is 0 answers of 5xx and 0 tracebacks in the cortex's and the
neuron's logs; every 4xx must be OpenAI's error envelope.

    .venv/bin/python scripts/fuzz_gateway.py                       # own cortex + neuron (SmolLM2)
    .venv/bin/python scripts/fuzz_gateway.py --requests 20000 --concurrency 4
    .venv/bin/python scripts/fuzz_gateway.py --gateway http://127.0.0.1:8080   # a running cortex
    .venv/bin/python scripts/fuzz_gateway.py --requests 0 --raw 20000  # raw HTTP garbage only

``--raw N`` also sends N raw byte sequences straight to the socket, one connection each
(:func:`raw_requests`: broken request lines, methods and versions, oversized and
malformed headers, lying or broken Content-Length and chunked bodies, bare garbage), while
a well-formed request runs beside them every 100: each must get a 4xx or a close, never a
5xx, a hang or a traceback, and the well-formed ones must all succeed.

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


def raw_requests(rng: "random.Random") -> bytes:
    """One raw, hostile HTTP/1.1 byte sequence."""
    host = b"Host: fuzz\r\n"
    good_body = b'{"model":"x","messages":[{"role":"user","content":"hi"}]}'
    choices = [
        lambda: bytes(rng.getrandbits(8) for _ in range(rng.choice([1, 16, 300, 5000]))),
        lambda: b"GET / HTTP/1.1\r\n" + b"X: " + b"a" * rng.choice([9000, 70000]) + b"\r\n\r\n",
        lambda: rng.choice([b"GET", b"G\x00T", b"", b"POST POST", b"\xff\xfe"]) + b" /v1/models "
        + rng.choice([b"HTTP/1.1", b"HTTP/9.9", b"HTTP/1", b"", b"http/1.1"]) + b"\r\n" + host + b"\r\n",
        lambda: b"POST /v1/chat/completions HTTP/1.1\r\n" + host + b"Content-Length: "
        + rng.choice([b"-1", b"99999999999999999999", b"abc", b"10, 20", b"5"]) + b"\r\n\r\n" + good_body,
        lambda: b"POST /v1/chat/completions HTTP/1.1\r\n" + host + b"Transfer-Encoding: chunked\r\n\r\n"
        + rng.choice([b"zz\r\nabc\r\n0\r\n\r\n", b"ffffffffffffffff\r\n", b"5\r\nab\r\n", b"0\r\nX\r\n"]),
        lambda: b"POST /v1/chat/completions HTTP/1.1\r\n" + host + b"Content-Length: 5\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        lambda: b"GET /v1/models HTTP/1.1\r\n" + b"".join(b"H%d: v\r\n" % i for i in range(rng.choice([50, 500])))
        + host + b"\r\n",
        lambda: b"GET /v1/models HTTP/1.1\r\n" + rng.choice([b"NoColon\r\n", b" folded: x\r\n", b": empty\r\n",
                                                               b"Bad\x00Name: v\r\n", b"X: \x01\x7f\r\n"]) + host
        + b"\r\n",
        lambda: b"GET " + rng.choice([b"/" + b"a" * 20000, b"/%zz", b"/..%2f..%2fetc", b"*", b"http://x/v1/models"])
        + b" HTTP/1.1\r\n" + host + b"\r\n",
        lambda: (b"GET /v1/models HTTP/1.1\r\n" + host + b"\r\n") * rng.choice([2, 50]) + b"\x00garbage",
    ]
    return rng.choice(choices)()


def raw_fuzz(url: str, n: int, seed: int, concurrency: int) -> tuple[collections.Counter[str], list[str]]:
    """Send ``n`` raw hostile byte sequences (see ``--raw``); the outcomes and problems."""
    import random
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    addr = (parts.hostname, parts.port)
    rng = random.Random(seed)
    outcomes: collections.Counter[str] = collections.Counter()
    problems: list[str] = []
    lock = threading.Lock()

    def one(data: bytes) -> None:
        try:
            with socket.create_connection(addr, timeout=30) as sock:
                try:
                    sock.sendall(data)
                    sock.shutdown(socket.SHUT_WR)
                except OSError:
                    pass  # the server may close before reading it all
                answer = b""
                try:
                    while chunk := sock.recv(65536):
                        answer += chunk
                except ConnectionResetError:
                    pass
        except socket.timeout:
            with lock:
                outcomes["hang (30 s)"] += 1
                problems.append(f"no answer in 30 s to {data[:120]!r}")
            return
        except OSError as exc:
            with lock:
                outcomes[f"socket error {type(exc).__name__}"] += 1
            return
        status = answer[9:12].decode("latin-1") if answer.startswith(b"HTTP/1.") else ("closed" if not answer else "?")
        # 505 is the right answer to an HTTP version the server does not speak.
        bad = (status.startswith("5") and status != "505") or b"Traceback" in answer or status == "?"
        with lock:
            outcomes[status] += 1
            if bad and len(problems) < 50:
                problems.append(f"{status}: {answer[:200]!r} <- {data[:120]!r}")

    with ThreadPoolExecutor(concurrency) as pool, httpx.Client(base_url=url, timeout=30) as probe:
        futures = []
        for i in range(n):
            futures.append(pool.submit(one, raw_requests(rng)))
            if i % 100 == 0:
                r = probe.get("/v1/models")
                with lock:
                    outcomes["well-formed beside: " + str(r.status_code)] += 1
                    if r.status_code != 200:
                        problems.append(f"a well-formed request beside the garbage got {r.status_code}")
            if i % 1000 == 0 and i:
                print(f"  {i} raw sent", file=sys.stderr)
        for f in futures:
            f.result()
    return outcomes, problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gateway", help="a running cortex's gateway URL (default: start one here)")
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--raw", type=int, default=0, help="raw HTTP garbage sequences to send too")
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
        @settings(max_examples=max(1, args.requests), deadline=None, database=None, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @given(requests([CHAT, EMBED], chat_models=[CHAT]))
        def fuzz(request: tuple[str, bytes]) -> None:
            slots.acquire()
            pool.submit(send, *request)
            sent[0] += 1
            if sent[0] % 50 == 0:
                print(f"  {sent[0]} sent, {time.monotonic() - started:.0f}s", file=sys.stderr)

        if args.requests:
            fuzz()
        pool.shutdown(wait=True)
        client.close()
        if args.raw:
            outcomes, problems = raw_fuzz(url, args.raw, args.seed, args.concurrency)
            raw_outcomes.update(outcomes)
            unexpected.extend(problems)

    raw_outcomes: collections.Counter[str] = collections.Counter()
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
    if raw_outcomes:
        print(f"{args.raw} raw sequences: " + ", ".join(f"{k}: {v}" for k, v in sorted(raw_outcomes.items())))
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
