#!/usr/bin/env python3
"""What a federated request adds over the same request served locally.

Starts real processes on loopback: operator B's cortex with one neuron (the ``synthetic``
backend, so the model costs nothing and the fabric is what is measured), and two cortex
nodes of operator A with no neuron, bootstrapped to B over the mesh: one that opens a new
mesh stream per request (``[federation] idle_streams = 0``, as before streams were
reused) and one with the default (streams kept and reused). Then the same non-streamed
chat request (``--tokens`` tokens) is sent, one at a time over a keep-alive HTTP
connection, alternately in rounds to:

* ``local``:     B's gateway (gateway -> B's neuron);
* ``fed-new``:   A's gateway, a new stream each request (gateway -> mesh -> B -> neuron,
  and the signed receipt back);
* ``fed-reuse``: the other A's gateway, streams reused.

Prints p50 / p99 of each and what each federated path adds to the local one's median
(target: 3 ms at p50), then the CPU each process spends per request on each path.
``--baseline DIR`` starts the same processes a second time from the helexa source tree in
DIR (e.g. ``git archive COMMIT helexa | tar -x -C DIR``) and interleaves them with these:
a before/after in one run, on a machine whose load changes from minute to minute. Given
more than once, each tree gets its own set (``base-``, ``base2-``, ...): one run compares
several steps. ``--variant TAG:VAR=VALUE`` runs this checkout once more with an
environment variable set in all its processes (``off:HELEXA_MESH__DIRECT=false``: the
mesh's direct channel off), interleaved the same way.
Run it under the machine-wide benchmark lock::

    flock /tmp/helexa-bench.lock .venv/bin/python benchmarks/federation_bench.py
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

HELEXA = [sys.executable, "-m", "helexa.cli"]
MODEL = "synth-bench"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait(pred, timeout: float, what: str):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            got = pred()
            if got:
                return got
        except (OSError, httpx.HTTPError, ValueError, KeyError):
            pass
        time.sleep(0.1)
    raise SystemExit(f"timed out waiting for {what}")


class Procs:
    def __init__(self, work: Path) -> None:
        self.work = work
        self.procs: list[subprocess.Popen[bytes]] = []
        self.pids: dict[str, int] = {}
        self.control: dict[str, int] = {}

    def start(self, name: str, *args: str, env: dict[str, str] | None = None) -> Path:
        log = self.work / f"{name}.log"
        with open(log, "wb") as out:
            self.procs.append(subprocess.Popen([*HELEXA, *args], stdout=out, stderr=subprocess.STDOUT,
                                               stdin=subprocess.DEVNULL, cwd=self.work,
                                               env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}))
        self.pids[name] = self.procs[-1].pid
        return log

    def cpu(self) -> dict[str, float]:
        """CPU seconds (user + system, all threads) each process has used so far."""
        out = {}
        tick = os.sysconf("SC_CLK_TCK")
        for name, pid in self.pids.items():
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            out[name] = (int(fields[11]) + int(fields[12])) / tick
        return out

    def cortex(self, name: str, operator: str, control: int, gateway: int, *extra: str,
               env: dict[str, str] | None = None) -> str:
        """Start a cortex on the mesh; return its first multiaddr once it recorded them."""
        self.control[name] = control
        self.start(name, "cortex", "--data-dir", str(self.work / name), "--operator", operator,
                   "--control-socket", f"127.0.0.1:{control}", "--gateway-socket", f"127.0.0.1:{gateway}",
                   "--mesh-listen", "/ip4/127.0.0.1/tcp/0", "--log-level", "warning",
                   "--models", str(self.work / "models.toml"), *extra, env=env)
        addrs = wait(lambda: json.loads((self.work / name / "mesh-addrs.json").read_text())["multiaddrs"],
                     60, f"{name}'s mesh")
        return addrs[0]

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()


def measure(client: httpx.Client, url: str, body: dict, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        r = client.post(url + "/v1/chat/completions", json=body)
        out.append(time.perf_counter() - t0)
        if r.status_code != 200:
            raise SystemExit(f"{url}: HTTP {r.status_code}: {r.text}")
    return out


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))] * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=300, help="per side, over all rounds")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--cpu-requests", type=int, default=200,
                    help="requests per path in the CPU-per-request phase after the rounds (in as many rounds)")
    ap.add_argument("--baseline", metavar="DIR", action="append", default=[],
                    help="also run the same setup from the helexa source tree in DIR (its PYTHONPATH), "
                         "interleaved: an A/B in one run (repeatable: base-, base2-, ...)")
    ap.add_argument("--variant", metavar="TAG:VAR=VALUE", action="append", default=[],
                    help="also run this checkout with VAR=VALUE in its processes, tagged TAG- (repeatable)")
    ap.add_argument("--no-new", action="store_true", help="skip the new-stream-per-request path")
    args = ap.parse_args()
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    with tempfile.TemporaryDirectory(prefix="helexa-fedbench-") as tmp:
        work = Path(tmp)
        (work / "models.toml").write_text(
            f'[models."{MODEL}"]\nbackend = "synthetic"\n[models."{MODEL}".config]\n'
            f"metadata = {{ tokens = {args.tokens} }}\n")
        procs = Procs(work)
        kinds = {"fed-reuse": "8"} if args.no_new else {"fed-new": "0", "fed-reuse": "8"}
        trees = {"": {}}
        for i, tree in enumerate(args.baseline):
            # (Every process runs in the work directory: ``-m`` puts the current
            # directory first on sys.path, which would shadow PYTHONPATH with this tree.)
            trees[f"base{i + 1 if i else ''}-"] = {"PYTHONPATH": str(Path(tree).resolve())}
        for variant in args.variant:
            tag, _, assignment = variant.partition(":")
            var, _, value = assignment.partition("=")
            trees[f"{tag}-"] = {var: value}
        urls: dict[str, str] = {}
        paths: list[str] = []
        try:
            for tag, tree_env in trees.items():
                # B's default per-peer limit (5 requests/s) would refuse a benchmark's pace.
                b_addr = procs.cortex(tag + "b", "operator-b", free_port(), b_gw := free_port(), env={
                    **tree_env, "HELEXA_FEDERATION__RATE_PER_SECOND": "100000", "HELEXA_FEDERATION__BURST": "100000"})
                b_ctl = procs.control[tag + "b"]
                b_url = f"http://127.0.0.1:{b_gw}"
                wait(lambda: httpx.get(b_url + "/health").status_code == 200, 30, "b's gateway")
                procs.start(tag + "neuron", "neuron", "--cortex", f"ws://127.0.0.1:{b_ctl}", "--node-id", "bench",
                            "--join-token-file", str(work / (tag + "b") / "join-token"), "--log-level", "warning",
                            env=tree_env)
                wait(lambda: httpx.get(b_url + "/health").json()["neurons"] == 1, 30, "the neuron")
                urls[tag + "local"] = b_url
                for kind, idle in kinds.items():
                    name = tag + kind
                    procs.cortex(name, "operator-a", free_port(), a_gw := free_port(), "--bootstrap", b_addr,
                                 env={**tree_env, "HELEXA_FEDERATION__IDLE_STREAMS": idle})
                    urls[name] = f"http://127.0.0.1:{a_gw}"
                    paths.append(name)
            for name in paths:
                wait(lambda: any(m["id"] == MODEL and m.get("federated")
                                 for m in httpx.get(urls[name] + "/v1/models").json()["data"]), 30,
                     f"b's offer at {name}")
            body = {"model": MODEL, "max_tokens": args.tokens, "messages": [{"role": "user", "content": "hi"}]}
            times: dict[str, list[float]] = {name: [] for name in urls}
            per_round = max(1, args.requests // args.rounds)
            with httpx.Client(timeout=30) as client:
                for url in urls.values():
                    measure(client, url, body, 20)  # warm-up: cold load, connections, streams
                for r in range(args.rounds):
                    order = list(urls)[r % len(urls):] + list(urls)[:r % len(urls)]
                    for name in order:
                        times[name] += measure(client, urls[name], body, per_round)
                # Where the time goes: CPU per request of each process, one path at a time,
                # the paths interleaved in rounds too (a tree measured during a busy minute
                # of the machine was ~0.6 ms off on a path whose code is the same in all).
                used: dict[str, dict[str, float]] = {name: {} for name in urls}
                per_cpu_round = max(1, args.cpu_requests // args.rounds)
                for r in range(args.rounds):
                    order = list(urls)[r % len(urls):] + list(urls)[:r % len(urls)]
                    for name in order:
                        before = procs.cpu()
                        measure(client, urls[name], body, per_cpu_round)
                        after = procs.cpu()
                        for p in after:
                            used[name][p] = used[name].get(p, 0.0) + after[p] - before[p]
                cpu = {name: {p: s / (per_cpu_round * args.rounds) * 1000 for p, s in per.items()}
                       for name, per in used.items()}
        finally:
            procs.stop()
    print(f"chat, non-streamed, {args.tokens} tokens, {len(times['local'])} requests each, sequential, keep-alive"
          + "".join(f"; {tag}= the tree at {env['PYTHONPATH']}" if "PYTHONPATH" in env else
                    f"; {tag}= this checkout with {' '.join(f'{k}={v}' for k, v in env.items())}"
                    for tag, env in trees.items() if tag) + ":")
    tagged = tuple(tag for tag in trees if tag)

    def mine(name: str, tag: str) -> bool:
        return name.startswith(tag) if tag else not name.startswith(tagged)

    for tag in trees:
        local = times[tag + "local"]
        lp50 = statistics.median(local) * 1000
        print(f"  {tag + 'local':15s} (B's gateway -> B's neuron):          p50 {lp50:6.2f} ms  p99 {pct(local, 99):6.2f} ms")
        for name in paths:
            if not mine(name, tag):
                continue
            fed = times[name]
            fp50 = statistics.median(fed) * 1000
            print(f"  {name:15s} (A's gateway -> mesh -> B -> neuron): p50 {fp50:6.2f} ms  p99 {pct(fed, 99):6.2f} ms"
                  f"  added: p50 {fp50 - lp50:+.2f} ms, p99 {pct(fed, 99) - pct(local, 99):+.2f} ms")
    print("  (target: the federated hop adds at most 3 ms at p50)")
    print("CPU ms per request, per process (one path at a time, interleaved in rounds; the others idle):")
    for tag in trees:
        names = [n for n in procs.pids if mine(n, tag)]
        print("  " + f"{'path':15s}" + "".join(f"{n:>15s}" for n in names) + f"{'total':>9s}")
        for path, per in cpu.items():
            if mine(path, tag):
                print("  " + f"{path:15s}" + "".join(f"{per[n]:15.2f}" for n in names)
                      + f"{sum(per[n] for n in names):9.2f}")
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
