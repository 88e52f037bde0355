#!/usr/bin/env python3
"""What the web console's pushed updates cost the cortex: a 100-neuron simulated fleet at
1 s heartbeats, with and without browsers watching the Fleet page.

A real cortex process (pinned to CPU 0 where ``taskset`` exists) and, on CPU 1, lean
simulated neurons (``control_plane_bench.py``'s: the real handshake, then a real
``Heartbeat`` with CPU, RAM, one GPU and one model every second, each on its own phase)
and console watchers: processes that sign in with the admin token, as a browser does, and
read ``/console/events`` (the SSE stream the Fleet page listens to), counting documents and
bytes. Phases alternate, so that noise from other work on the machine falls on both:

* ``fleet only``: the neurons heartbeat, nobody watches (the control plane's own cost);
* ``+ N watchers``: the same, with ``--watchers`` console streams open.

For each phase: the cortex's CPU share (CPU seconds / wall seconds, % of one core) and,
with watchers, the fleet documents each received per second and their size. The console's
cost is the difference. Target: under 5% of a core for 100 neurons at 1 s heartbeats.

Usage (other engineers benchmark on this machine too, so take the lock)::

    flock /tmp/helexa-bench.lock .venv/bin/python benchmarks/console_bench.py \\
        [--neurons 100] [--watchers 1,5] [--seconds 20] [--rounds 2]

Figures go to stdout as Markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONTROL_BENCH = ROOT / "benchmarks" / "control_plane_bench.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pinned(cpu: int | None, argv: list[str]) -> list[str]:
    return argv if cpu is None else ["taskset", "-c", str(cpu), *argv]


def watch_main(gateway: str, token: str, seconds: float) -> None:
    """One console watcher: sign in, read the event stream for ``seconds``, print counts."""
    import httpx

    with httpx.Client(base_url=gateway, timeout=30) as client:
        r = client.post("/console/login", data={"token": token})
        cookie = r.headers["set-cookie"].split(";")[0]  # Secure: httpx would keep it off http
        docs = size = 0
        t0 = time.monotonic()
        with client.stream("GET", "/console/events", headers={"cookie": cookie}, timeout=None) as resp:
            event = ""
            for line in resp.iter_lines():
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: ") and event == "fleet":
                    docs += 1
                    size += len(line) - 6
                    last = json.loads(line[6:])
                if time.monotonic() - t0 >= seconds:
                    break
        elapsed = time.monotonic() - t0
    print(json.dumps({"docs": docs, "seconds": elapsed, "bytes": size,
                      "neurons": len(last["neurons"]) if docs else 0}), flush=True)


def document_cost(neurons: int, repeat: int = 200) -> float:
    """Milliseconds to build one fleet document of ``neurons`` neurons, in this process (the
    same :class:`FleetFeed` code over link-shaped records of what a heartbeat leaves)."""
    import random
    from types import SimpleNamespace

    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(CONTROL_BENCH.parent))
    from control_plane_bench import MODEL, descriptor, heartbeat

    from helexa.roles.cortex.fleet import Health
    from helexa.roles.cortex.web.fleet_feed import FleetFeed

    rng = random.Random(1)
    links = [SimpleNamespace(node_id=f"sim-{i:05d}", descriptor=descriptor(f"sim-{i:05d}"),
                             metrics=heartbeat(1, rng).metrics, models={MODEL.model_id: MODEL},
                             health=Health.HEALTHY, last_heartbeat=time.time(), in_flight=0)
             for i in range(neurons)]
    feed = FleetFeed(links, None)  # type: ignore[arg-type]  # iterating is all it does with a fleet
    t0 = time.perf_counter()
    for _ in range(repeat):
        feed.document()
    return (time.perf_counter() - t0) / repeat * 1000


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--neurons", type=int, default=100)
    ap.add_argument("--watchers", default="1,5", help="console streams open in the watched phases")
    ap.add_argument("--seconds", type=float, default=20.0, help="seconds measured per phase")
    ap.add_argument("--rounds", type=int, default=2, help="times each phase is measured, interleaved")
    ap.add_argument("--no-pin", action="store_true")
    ap.add_argument("--_watch", nargs=3, metavar=("GATEWAY", "TOKEN_FILE", "SECONDS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._watch:
        gateway, token_file, seconds = args._watch
        watch_main(gateway, Path(token_file).read_text().strip(), float(seconds))
        return 0
    return orchestrate(args)


def orchestrate(args: argparse.Namespace) -> int:
    import httpx
    import psutil

    pin = not args.no_pin and shutil.which("taskset") is not None and (os.cpu_count() or 1) >= 2
    cortex_cpu, client_cpu = (0, 1) if pin else (None, None)
    helexa_bin = Path(sys.executable).parent / "helexa"
    data = Path(tempfile.mkdtemp(prefix="helexa-consolebench-"))
    cport, gport = free_port(), free_port()
    url, gateway = f"ws://127.0.0.1:{cport}", f"http://127.0.0.1:{gport}"
    log = open(data / "cortex.log", "w")
    cortex = subprocess.Popen(
        pinned(cortex_cpu, [str(helexa_bin), "cortex", "--data-dir", str(data / "cortex"),
                            "--control-socket", f"127.0.0.1:{cport}", "--gateway-socket", f"127.0.0.1:{gport}"]),
        stdout=log, stderr=subprocess.STDOUT)
    token_file = data / "cortex" / "join-token"
    admin_file = data / "cortex" / "admin-token"
    sim = None
    watchers_list = [int(w) for w in args.watchers.split(",") if w.strip()]
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(gateway + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or cortex.poll() is not None:
                print((data / "cortex.log").read_text()[-3000:], file=sys.stderr)
                return 1
            time.sleep(0.2)
        sim = subprocess.Popen(
            pinned(client_cpu, [sys.executable, str(CONTROL_BENCH), "--_role", "sim", "--_url", url,
                                "--_token-file", str(token_file), "--_id", "sim"]),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert sim.stdin is not None and sim.stdout is not None
        sim.stdin.write(f"add {args.neurons} 100\n")
        sim.stdin.flush()
        joined = json.loads(sim.stdout.readline())
        proc = psutil.Process(cortex.pid)
        time.sleep(3)

        def measure(watchers: int) -> dict:
            procs = [subprocess.Popen(
                pinned(client_cpu, [sys.executable, __file__, "--_watch", gateway, str(admin_file),
                                    str(args.seconds + 2)]), stdout=subprocess.PIPE, text=True)
                     for _ in range(watchers)]
            time.sleep(2)  # signed in and streaming
            t = proc.cpu_times()
            c0, w0 = t.user + t.system, time.monotonic()
            time.sleep(args.seconds)
            t = proc.cpu_times()
            share = (t.user + t.system - c0) / (time.monotonic() - w0)
            got = [json.loads(p.communicate(timeout=60)[0]) for p in procs]
            return {"cpu": share, "watch": got}

        phases = [0, *watchers_list]
        results: dict[int, list[dict]] = {w: [] for w in phases}
        for _ in range(args.rounds):
            for w in phases:
                results[w].append(measure(w))
        now = time.strftime("%Y-%m-%d")
        print(f"### Console pushes, {args.neurons} simulated neurons at 1 s heartbeats ({now})\n")
        print(f"Joined {joined['ok']} neurons in {joined['seconds']:.1f} s; {args.seconds:g} s per phase, "
              f"{args.rounds} rounds interleaved; cortex {'pinned to CPU 0' if pin else 'unpinned'}.\n")
        print("| phase | cortex CPU (% of a core), per round | mean | console's cost | documents/s per watcher | document size |")
        print("|---|---|---|---|---|---|")
        base = sum(r["cpu"] for r in results[0]) / len(results[0])
        for w in phases:
            shares = [r["cpu"] * 100 for r in results[w]]
            mean = sum(shares) / len(shares)
            watch = [x for r in results[w] for x in r["watch"]]
            rate = sum(x["docs"] / x["seconds"] for x in watch) / len(watch) if watch else 0
            size = sum(x["bytes"] for x in watch) / max(1, sum(x["docs"] for x in watch)) if watch else 0
            label = "fleet only" if w == 0 else f"+ {w} watcher{'s' if w > 1 else ''}"
            print(f"| {label} | {', '.join(f'{s:.1f}' for s in shares)} | {mean:.1f} | "
                  f"{'' if w == 0 else f'{mean - base * 100:+.1f}'} | {f'{rate:.2f}' if watch else ''} | "
                  f"{f'{size / 1024:.1f} KiB' if watch else ''} |")
        ms = document_cost(args.neurons)
        print(f"\nBuilding one document of {args.neurons} neurons: {ms:.2f} ms in process, so one a second "
              f"costs {ms / 10:.2f}% of a core, however many pages watch.")
        return 0
    finally:
        if sim is not None:
            try:
                sim.stdin.write("quit\n")  # type: ignore[union-attr]
                sim.stdin.flush()  # type: ignore[union-attr]
            except OSError:
                pass
            sim.wait(10)
        cortex.terminate()
        try:
            cortex.wait(15)
        except subprocess.TimeoutExpired:
            cortex.kill()
        shutil.rmtree(data, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
