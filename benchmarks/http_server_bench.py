#!/usr/bin/env python3
"""What the gateway's lean HTTP server costs per request, measured with ``wrk``; optionally
against another checkout of helexa (an A/B of a change to the server).

The server runs a trivial ASGI app (read the JSON POST, answer a fixed JSON body) in its
own process pinned to CPU 0; ``wrk`` (one thread) drives it from CPU 1 over keep-alive
connections at each concurrency. Besides wrk's requests/s and p50 latency it reports the
server's CPU time per request (utime + stime from ``/proc``), which moves least when
other work shares the machine. With ``--old DIR`` each round runs the server from
``DIR`` (a checkout of helexa: ``git archive <commit> | tar -x -C DIR``) and from this
tree, interleaved, so that noise from the rest of the machine falls on both.

Usage (figures go to stdout as a Markdown table of medians over the rounds)::

    flock /tmp/helexa-bench.lock .venv/bin/python benchmarks/http_server_bench.py \\
        [--old /tmp/http-old] [--rounds 3] [--dur 5] [--concurrency 1,16]

Needs ``wrk`` (``apt-get install -y wrk``) and ``taskset``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fixed_answer import BODY, raw_app

HERE = Path(__file__).resolve().parent.parent
LUA = f"""wrk.method = "POST"
wrk.body = {json.dumps(BODY)}
wrk.headers["content-type"] = "application/json"
"""


def serve(tree: str, port: int) -> None:
    """Run the server of the helexa checkout at ``tree`` on ``port`` until killed."""
    sys.path.insert(0, tree)
    import trio

    try:
        from helexa.roles.cortex.http import HttpServer
    except ImportError:  # a checkout from before the server became a package
        from helexa.roles.cortex.http_server import HttpServer
    import helexa
    assert helexa.__file__.startswith(tree), helexa.__file__

    trio.run(HttpServer(raw_app, port=port, keep_alive_max_requests=10**9).run)


def wait_for_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"the server on port {port} did not come up")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wrk(port: int, concurrency: int, dur: int, script: str, pid: int) -> tuple[float, float, float]:
    """Requests/s, p50 latency (ms) and server CPU per request (ms) of one ``wrk`` run."""
    cpu = cpu_seconds(pid)
    out = subprocess.run(["taskset", "-c", "1", "wrk", "-t1", f"-c{concurrency}", f"-d{max(1, round(dur))}s", "--latency",
                          "-s", script, f"http://127.0.0.1:{port}/v1/chat/completions"],
                         capture_output=True, text=True, check=True).stdout
    if "Non-2xx" in out or "Socket errors" in out:
        raise RuntimeError(out)
    cpu = cpu_seconds(pid) - cpu
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    value, unit = re.search(r"50%\s+([\d.]+)(us|ms|s)", out).groups()
    return rps, float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit], cpu / requests * 1e3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--serve", metavar="TREE")
    parser.add_argument("--port", type=int, default=18480)
    parser.add_argument("--old", metavar="DIR", help="another helexa checkout to compare with")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dur", type=int, default=5)
    parser.add_argument("--concurrency", default="1,16")
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.port)
        return
    trees = ([("old", str(Path(args.old).resolve()))] if args.old else []) + [("new", str(HERE))]
    levels = [int(c) for c in args.concurrency.split(",")]
    results: dict[tuple[str, int], list[tuple[float, float, float]]] = {}
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as lua:
        lua.write(LUA)
    try:
        for rnd in range(args.rounds):
            for i, (label, tree) in enumerate(trees):
                port = args.port + 10 * rnd + i
                proc = subprocess.Popen(["taskset", "-c", "0", sys.executable, __file__, "--serve", tree,
                                         "--port", str(port)])
                try:
                    wait_for_port(port)
                    wrk(port, 1, 1, lua.name, proc.pid)  # warm up
                    for c in levels:
                        rps, p50, cpu = wrk(port, c, args.dur, lua.name, proc.pid)
                        results.setdefault((label, c), []).append((rps, p50, cpu))
                        print(f"round {rnd + 1} {label} c={c}: {rps:,.0f} requests/s, p50 {p50:.3f} ms, "
                              f"{cpu * 1e3:.0f} µs CPU/request", file=sys.stderr)
                finally:
                    proc.terminate()
                    proc.wait(10)
    finally:
        os.unlink(lua.name)
    print(f"| tree | concurrency | requests/s | p50 ms | server CPU µs/request |  (medians of {args.rounds})")
    print("|---|---|---|---|---|")
    for (label, c), runs in sorted(results.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        print(f"| {label} | {c} | {statistics.median(r[0] for r in runs):,.0f} "
              f"| {statistics.median(r[1] for r in runs):.3f} | {statistics.median(r[2] for r in runs) * 1e3:.0f} |")


if __name__ == "__main__":
    main()
