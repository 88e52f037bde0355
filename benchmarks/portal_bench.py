#!/usr/bin/env python3
"""What a keyed, metered request costs the cortex over an open one.

Two measurements, each an interleaved A/B.

**In process** (the first part): one trio process runs the same request through the
orchestrator directly (``direct``: what the gateway did before portals), and through the
metered path for an open portal (``open``), a keyed portal without a ledger (``quotas``:
the key authenticated, four quotas reserved and settled, the rate-limit headers
rendered), and a keyed portal with the ledger (``keyed``: and the record made durable,
``synchronous=FULL``; ``keyed-normal``: with ``ledger_sync = "normal"``).
CPU per request is the process's CPU time (``time.process_time``: every thread, the
ledger writer's included) over blocks of requests, sequential (c=1) and 16 at a time.
This isolates the portal's cost from HTTP and from the noise of a busy machine.

**Over HTTP**: one cortex gateway process (pinned to CPU 0) serves three portals over an in-memory neuron
that answers at once (the fabric's own work: parse, schedule, dispatch, encode; no
websocket hop), so the difference between them is the portal's work alone:

* ``open``    the default portal: no key, no quotas, no ledger (as before portals);
* ``ledger``  an open portal that records every request in the usage ledger (SQLite, WAL,
              ``synchronous=FULL``, written durably off the event loop before the answer);
* ``keyed``   a keyed portal: the API key checked, rpm, tpm, concurrency and a money budget
              reserved and settled on the key, and the ledger record written durably.

``wrk`` (CPU 1) sends non-streaming chat completions (``max_tokens`` 16) at each
concurrency; the targets are measured interleaved (every round visits each in turn). CPU
per request is the gateway process's utime+stime (all threads, the ledger writer's
included) over the requests wrk completed; the ledger's commit time comes from the
gateway's ``helexa_ledger_write_seconds``. At the end, the ledger must hold one row per
keyed and ledger request that got a 200.

**Before and after** (``--baseline DIR``, a checkout of the gateway before portals, with
its own ``.venv``): the open default portal of this tree against that tree's gateway:
first each tree's app called directly (no sockets, blocks of 3,000 requests, the trees
alternating), then each served by its own tree's ``benchmarks/gateway_bench.py --serve
gateway`` (the same in-memory neuron), interleaved under ``wrk``: what the open path costs
now over before.

Run (under the machine-wide lock)::

    apt-get install -y wrk
    flock /tmp/helexa-bench.lock .venv/bin/python benchmarks/portal_bench.py [--rounds 3 --dur 5 --conc 1,16]
    [--inproc-requests 2000] [--no-http] [--baseline /path/to/checkout-before-portals]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "litellm_harness"))
import bench  # noqa: E402  (wrk and cpu_s: the harness the LiteLLM comparison uses)
from instant_neuron import InstantNeuron  # noqa: E402

TARGETS = ("open", "ledger", "keyed")
UNLIMITED = {"rpm": 10**9, "tpm": 10**12, "max_concurrent": 10**6, "budget": 10.0**12, "period": "month"}


def serve(workdir: Path) -> None:
    """The gateway process: prints one JSON line (its URLs and the key) once it listens."""
    import trio

    from helexa.roles.cortex.catalogue import Catalogue
    from helexa.roles.cortex.config import CortexConfig
    from helexa.roles.cortex.fleet import Fleet
    from helexa.roles.cortex.gateway import Gateway
    from helexa.roles.cortex.orchestrator import Orchestrator
    from helexa.roles.cortex.portal import keys
    from helexa.roles.cortex.portal.quota import Limits
    from helexa.roles.cortex.portal.store import SqliteStore

    prices = {"bench": {"input": 1.0, "output": 2.0}}
    config = CortexConfig.model_validate({
        "data_dir": str(workdir), "gateway_socket": "127.0.0.1:0", "log_level": "warning",
        "gateway": {"keep_alive_max_requests": 10**9, "metrics_public": True},
        "portals": {
            "ledger": {"listen": ["127.0.0.1:0"], "record_usage": True, "prices": prices},
            "keyed": {"listen": ["127.0.0.1:0"], "auth": "keys", "prices": prices},
        }})
    store = SqliteStore(config.usage_store_path)
    secret, key = keys.create("keyed", "bench", limits=Limits(**UNLIMITED), now=time.time())
    store.put_key(key)

    async def main() -> None:
        fleet = Fleet()
        InstantNeuron(fleet)
        gateway = Gateway(config, Orchestrator(config, fleet, Catalogue()), store=store)
        async with trio.open_nursery() as nursery:
            await nursery.start(gateway.orchestrator.run)
            await nursery.start(gateway.run)
            urls = {pid: u[0] for pid, u in gateway.addresses.items()}
            print(json.dumps({"open": urls["default"], "ledger": urls["ledger"], "keyed": urls["keyed"],
                              "key": secret}), flush=True)

    trio.run(main)


INPROC = ("direct", "open", "quotas", "keyed", "keyed-normal")


def inproc(workdir: Path, n: int, rounds: int) -> dict[tuple[str, int], list[float]]:
    """CPU ms per request of each in-process target (see the module docstring):
    ``direct`` (the orchestrator alone), ``open`` (the metered path of an open portal),
    ``quotas`` (a key checked, four quotas reserved and settled, the rate-limit headers; no
    ledger), ``keyed`` (the same and the durable ledger write, ``synchronous=FULL``),
    ``keyed-normal`` (the same with ``ledger_sync = "normal"``)."""
    import trio

    from helexa.protocol import GenerateRequest, SamplingParams, Task
    from helexa.roles.cortex.catalogue import Catalogue
    from helexa.roles.cortex.config import CortexConfig
    from helexa.roles.cortex.fleet import Fleet
    from helexa.roles.cortex.gateway import Gateway
    from helexa.roles.cortex.orchestrator import Orchestrator
    from helexa.roles.cortex.portal import keys
    from helexa.roles.cortex.portal.metering import Caller
    from helexa.roles.cortex.portal.quota import Limits
    from helexa.roles.cortex.portal.store import SqliteStore

    prices = {"bench": {"input": 1.0, "output": 2.0}}
    keyed = {"listen": ["127.0.0.1:0"], "auth": "keys", "prices": prices}
    config = CortexConfig.model_validate({
        "data_dir": str(workdir), "portals": {"keyed": keyed, "quotas": {**keyed, "record_usage": False}}})
    stores = {sync: SqliteStore(workdir / f"inproc-{sync}.sqlite", synchronous=sync) for sync in ("FULL", "NORMAL")}
    secrets = {}
    for portal in ("keyed", "quotas"):
        secrets[portal], key = keys.create(portal, "bench", limits=Limits(**UNLIMITED), now=time.time())
        for store in stores.values():
            store.put_key(key)
    out: dict[tuple[str, int], list[float]] = {}
    messages = ({"role": "user", "content": "Say hello"},)

    async def main() -> None:
        fleet = Fleet()
        InstantNeuron(fleet)
        orch = Orchestrator(config, fleet, Catalogue())
        full, normal = (Gateway(config, orch, store=stores[s]) for s in ("FULL", "NORMAL"))
        for gateway in (full, normal):
            for key in stores["FULL"].keys():
                gateway.keyring.put(key)
        counter = [0]

        def request() -> GenerateRequest:
            counter[0] += 1
            return GenerateRequest(f"r{counter[0]}", "bench", Task.CHAT, messages=messages,
                                   sampling=SamplingParams(max_tokens=16), stream=False)

        async def direct() -> None:
            async with orch.generate(request(), endpoint="chat") as gen:
                async for _ in gen:
                    pass

        def metered(gateway: Gateway, portal: str):  # noqa: ANN202
            meter, ring, target = gateway.metering, gateway.keyring, gateway.portals[portal]
            anonymous = Caller(target)

            async def one() -> None:
                if target.keyed:  # what the portal app does for a keyed request
                    caller = Caller(target, ring.authenticate(portal, secrets[portal], time.time()))
                    meter.rate_headers(caller)
                else:
                    caller = anonymous
                async with meter.generate(caller, request(), endpoint="chat") as gen:
                    async for _ in gen:
                        pass
            return one

        work = {"direct": direct, "open": metered(full, "default"), "quotas": metered(full, "quotas"),
                "keyed": metered(full, "keyed"), "keyed-normal": metered(normal, "keyed")}
        async with trio.open_nursery() as nursery:
            await nursery.start(orch.run)
            await nursery.start(full.writer.run)
            await nursery.start(normal.writer.run)
            for fn in work.values():  # warm up
                for _ in range(200):
                    await fn()
            for _ in range(rounds):
                for c in (1, 16):
                    for name, fn in work.items():
                        async def worker(fn=fn, count=n // c) -> None:  # noqa: ANN001
                            for _ in range(count):
                                await fn()

                        t0 = time.process_time()
                        async with trio.open_nursery() as batch:
                            for _ in range(c):
                                batch.start_soon(worker)
                        out.setdefault((name, c), []).append((time.process_time() - t0) / (n // c * c) * 1e3)
            for sync, gateway in (("FULL", full), ("NORMAL", normal)):
                st = gateway.writer.stats
                print(f"# in process, {sync}: {st.records} records in {st.commits} commits, commit mean "
                      f"{st.commit_seconds / max(1, st.commits) * 1e3:.2f} ms, max {st.max_commit_seconds * 1e3:.1f} ms",
                      file=sys.stderr)
            nursery.cancel_scope.cancel()

    trio.run(main)
    for store in stores.values():
        store.close()
    return out


def ledger_writes(url: str) -> tuple[float, float]:
    """``(sum of seconds, count)`` of the ledger writes so far, from /metrics."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    total = sum(float(m) for m in re.findall(r"^helexa_ledger_write_seconds_sum\{[^}]*\} (\S+)$", text, re.M))
    count = sum(float(m) for m in re.findall(r"^helexa_ledger_write_seconds_count\{[^}]*\} (\S+)$", text, re.M))
    return total, count


def app_cpu(n: int) -> None:
    """Call this tree's open gateway app directly (no sockets) in blocks of ``n`` requests;
    print the CPU ms per request of each block (JSON). Runs against the gateway from before
    portals too (``--baseline``), so it only uses what both have."""
    import trio

    from helexa.roles.cortex.catalogue import Catalogue
    from helexa.roles.cortex.config import CortexConfig
    from helexa.roles.cortex.fleet import Fleet
    from helexa.roles.cortex.gateway import Gateway
    from helexa.roles.cortex.orchestrator import Orchestrator

    body = json.dumps({"model": "bench", "max_tokens": 16, "messages": [{"role": "user", "content": "Say hello"}]})
    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "query_string": b"",
             "client": ("127.0.0.1", 1), "headers": [(b"content-type", b"application/json"),
                                                     (b"content-length", str(len(body)).encode())]}

    async def main() -> None:
        fleet = Fleet()
        InstantNeuron(fleet)
        config = CortexConfig(gateway_socket="127.0.0.1:0")
        extra = {}
        try:
            from helexa.roles.cortex.portal.store import SqliteStore

            extra["store"] = SqliteStore(":memory:")
        except ImportError:  # the gateway from before portals
            pass
        gateway = Gateway(config, Orchestrator(config, fleet, Catalogue()), **extra)
        async with trio.open_nursery() as nursery:
            await nursery.start(gateway.orchestrator.run)
            await nursery.start(gateway.run)
            apps = getattr(gateway, "apps", None)
            app = apps[gateway.addresses["default"][0]] if apps else gateway

            async def send(message) -> None:  # noqa: ANN001
                pass

            def receive():  # noqa: ANN202
                first = [True]

                async def receive():  # noqa: ANN202
                    if first[0]:
                        first[0] = False
                        return {"type": "http.request", "body": body.encode(), "more_body": False}
                    await trio.sleep_forever()  # the client stays: what a watcher would wait for
                return receive

            for _ in range(500):
                await app(dict(scope), receive(), send)
            blocks = []
            for _ in range(5):
                t0 = time.process_time()
                for _ in range(n):
                    await app(dict(scope), receive(), send)
                blocks.append((time.process_time() - t0) / n * 1e3)
            print(json.dumps(blocks), flush=True)
            gateway.stop()
            nursery.cancel_scope.cancel()

    trio.run(main)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def before_after(baseline: Path, concs: list[int], rounds: int, dur: int, pin: bool) -> None:
    """The open path of this tree against ``baseline``'s gateway (see the module docstring)."""
    trees = {"before": baseline.resolve(), "after": HERE.parent}
    blocks: dict[str, list[float]] = {}
    for _ in range(2):
        for name, tree in trees.items():
            python = tree / ".venv" / "bin" / "python"
            done = subprocess.run(
                (["taskset", "-c", "0"] if pin else []) + [str(python if python.exists() else sys.executable),
                                                          __file__, "--app-cpu", "3000"],
                env=dict(os.environ, PYTHONPATH=str(tree)), capture_output=True, text=True, timeout=600)
            if done.returncode != 0:
                sys.exit(f"the {name} app run failed:\n{done.stderr[-2000:]}")
            blocks.setdefault(name, []).extend(json.loads(done.stdout.strip().splitlines()[-1]))
    print("| gateway (open), the app called directly | CPU per request, min (ms) | median (ms) |")
    print("|---|---:|---:|")
    for name, values in blocks.items():
        print(f"| {name} | {min(values):.3f} | {statistics.median(values):.3f} |")
    print()
    servers: dict[str, tuple[subprocess.Popen, str]] = {}
    try:
        for name, tree in trees.items():
            python = tree / ".venv" / "bin" / "python"
            port = free_port()
            cmd = [str(python if python.exists() else sys.executable), str(tree / "benchmarks" / "gateway_bench.py"),
                   "--serve", "gateway", "--port", str(port)]
            env = dict(os.environ, PYTHONPATH=str(tree))
            proc = subprocess.Popen((["taskset", "-c", "0"] if pin else []) + cmd, env=env, cwd=tree)
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 60
            while True:
                try:
                    urllib.request.urlopen(url + "/health", timeout=2).read()
                    break
                except OSError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        sys.exit(f"the {name} gateway did not start")
                    time.sleep(0.2)
            servers[name] = (proc, url)
            bench.wrk(url, 4, 1, "bench", "sk-none", "1" if pin else None)
        raw: dict[tuple[str, int], list[dict[str, float]]] = {}
        for rnd in range(rounds):
            for c in concs:
                for name, (proc, url) in servers.items():
                    cpu0 = bench.cpu_s(proc.pid)
                    r = bench.wrk(url, c, dur, "bench", "sk-none", "1" if pin else None)
                    cpu = (bench.cpu_s(proc.pid) - cpu0) / r["n"] * 1e3
                    raw.setdefault((name, c), []).append({"rps": r["rps"], "p50_ms": r["p50_ms"], "cpu_ms": cpu})
                    print(f"round {rnd + 1} {name:>6} c={c:<3} {r['rps']:8.0f} req/s  p50 {r['p50_ms']:.3f} ms  "
                          f"cpu {cpu:.3f} ms/req", file=sys.stderr)
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(10)
    print("| gateway (open) | load | requests/s | p50 ms | CPU per request (ms) |")
    print("|---|---|---:|---:|---:|")
    for c in concs:
        for name in trees:
            runs = raw[(name, c)]
            med = {f: statistics.median(x[f] for x in runs) for f in runs[0]}
            print(f"| {name} | POST c={c} | {med['rps']:,.0f} | {med['p50_ms']:.3f} | {med['cpu_ms']:.3f} |")
    print()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--serve", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--app-cpu", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dur", type=int, default=5, help="seconds per measurement")
    ap.add_argument("--conc", default="1,16")
    ap.add_argument("--inproc-requests", type=int, default=2000, help="requests per in-process block")
    ap.add_argument("--http", action=argparse.BooleanOptionalAction, default=True, help="the HTTP part")
    ap.add_argument("--baseline", type=Path, help="a checkout before portals: compare the open path with it")
    ap.add_argument("--json", help="write the raw figures here")
    args = ap.parse_args()
    if args.serve:
        serve(args.serve)
        return
    if args.app_cpu:
        app_cpu(args.app_cpu)
        return
    workdir = Path(tempfile.mkdtemp(prefix="helexa-portal-bench-"))
    if (os.cpu_count() or 1) >= 2:
        os.sched_setaffinity(0, {0})
    cpu = inproc(workdir, args.inproc_requests, args.rounds)
    med_in = {k: statistics.median(v) for k, v in cpu.items()}
    print("| path (in process) | c | CPU per request (ms) | over direct (ms) |")
    print("|---|---|---:|---:|")
    for c in (1, 16):
        for name in INPROC:
            over = "—" if name == "direct" else f"{med_in[(name, c)] - med_in[('direct', c)]:+.3f}"
            print(f"| {name} | {c} | {med_in[(name, c)]:.3f} | {over} |")
    print()
    os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
    if args.baseline is not None:
        before_after(args.baseline, [int(c) for c in args.conc.split(",")], args.rounds, args.dur,
                     (os.cpu_count() or 1) >= 2 and shutil.which("taskset") is not None)
    if not args.http:
        return
    if shutil.which("wrk") is None:
        sys.exit("needs wrk: apt-get install -y wrk")
    pin = (os.cpu_count() or 1) >= 2 and shutil.which("taskset") is not None
    cmd = [sys.executable, __file__, "--serve", str(workdir)]
    server = subprocess.Popen((["taskset", "-c", "0"] if pin else []) + cmd, stdout=subprocess.PIPE, text=True)
    try:
        info = json.loads(server.stdout.readline())
        concs = [int(c) for c in args.conc.split(",")]
        for target in TARGETS:  # warm up every path once
            bench.wrk(info[target], 4, 1, "bench", info["key"], "1" if pin else None)
        raw: dict[tuple[str, int], list[dict[str, float]]] = {}
        served = {t: 0 for t in TARGETS}
        for rnd in range(args.rounds):
            for c in concs:
                for target in TARGETS:
                    cpu0, (w0, n0) = bench.cpu_s(server.pid), ledger_writes(info["open"])
                    r = bench.wrk(info[target], c, args.dur, "bench", info["key"], "1" if pin else None)
                    cpu1, (w1, n1) = bench.cpu_s(server.pid), ledger_writes(info["open"])
                    if r["errors"]:
                        sys.exit(f"{target} c={c}: {r['errors']} errors")
                    served[target] += r["n"]
                    fig = {"rps": r["rps"], "p50_ms": r["p50_ms"], "cpu_ms": (cpu1 - cpu0) / r["n"] * 1e3,
                           "write_ms": (w1 - w0) / (n1 - n0) * 1e3 if n1 > n0 else 0.0, "n": r["n"]}
                    raw.setdefault((target, c), []).append(fig)
                    print(f"round {rnd + 1} {target:>6} c={c:<3} {fig['rps']:8.0f} req/s  p50 {fig['p50_ms']:.3f} ms  "
                          f"cpu {fig['cpu_ms']:.3f} ms/req  ledger write {fig['write_ms']:.3f} ms", file=sys.stderr)
    finally:
        server.terminate()
        server.wait(10)
    with sqlite3.connect(workdir / "usage.sqlite") as db:
        rows = dict(db.execute("SELECT portal, COUNT(*) FROM usage GROUP BY portal").fetchall())
    # wrk's warm-up requests count too: the ledger may hold more rows than the rounds served, never fewer.
    ok = rows.get("keyed", 0) >= served["keyed"] and rows.get("ledger", 0) >= served["ledger"]
    med = {k: {f: statistics.median(x[f] for x in v) for f in v[0]} for k, v in raw.items()}
    print("| portal | load | requests/s | p50 ms | cortex CPU per request (ms) | extra CPU vs open (ms) | "
          "ledger write p50-of-means (ms) |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for c in concs:
        base = med[("open", c)]["cpu_ms"]
        for target in TARGETS:
            m = med[(target, c)]
            extra = "—" if target == "open" else f"{m['cpu_ms'] - base:+.3f}"
            write = "—" if target == "open" else f"{m['write_ms']:.3f}"
            print(f"| {target} | POST c={c} | {m['rps']:,.0f} | {m['p50_ms']:.3f} | {m['cpu_ms']:.3f} | {extra} | {write} |")
    print(f"\nledger rows: keyed {rows.get('keyed', 0)} (>= {served['keyed']} served), ledger "
          f"{rows.get('ledger', 0)} (>= {served['ledger']}): {'ok' if ok else 'MISSING ROWS'}")
    if args.json:
        Path(args.json).write_text(json.dumps({"inproc": {f"{t}/c{c}": v for (t, c), v in cpu.items()},
                                               "http": {f"{t}/c{c}": v for (t, c), v in raw.items()}}, indent=2))
    shutil.rmtree(workdir, ignore_errors=True)
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
