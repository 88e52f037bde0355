#!/usr/bin/env python3
"""The control plane across processes: round-trip latency, messages/s, neurons per cortex.

A real cortex process (``helexa cortex``, pinned to CPU 0 where ``taskset`` exists) and
neuron-side client processes (CPU 1) that join it with the real handshake (Hello,
Challenge, Join with the HMAC proof of the join token, Welcome) over ``ws://``:

1. **Round trips.** One client sends ``Ping`` and the cortex answers ``Pong``: sequential
   round trips for p50/p99 latency, then a pipelined window of pings in flight on the same
   connection for round trips (and frames) per second.
2. **Neurons per cortex.** Simulated neurons (:mod:`swarm`: the real handshake, then a
   real ``Heartbeat`` with metrics, one GPU and one model status every second, each on its
   own phase; every redial on the neuron's own backoff with jitter) are added in steps up
   to ``--neurons``. After each step: the time the batch took to join, failed attempts by
   kind, the cortex's and the simulators' CPU share over ``--steady`` seconds of steady
   state, then ``GET /admin/fleet`` (healthy count, oldest heartbeat) and a few hundred
   ping round trips under that load.
3. **A restart storm** (``--restart``): the cortex is killed with SIGKILL under its whole
   fleet and started again on the same sockets and data directory; every neuron redials on
   its own. Reported: the time until the last one is back, those that never were within
   ``--rejoin-deadline``, the cortex's CPU for the storm and the time its event loop waited
   for a CPU, then its CPU per heartbeat at 1 s (less its idle CPU). ``--profile`` samples
   the cortex with py-spy over the last ramp step's steady state (no joins in it) and over
   the storm (collapsed stacks kept in its data directory); ``--native`` adds the
   interpreter's own frames (the garbage collector), at the cost of pausing the cortex to
   sample it.

Usage (other engineers benchmark on this machine too, so take the lock)::

    flock /tmp/helexa-bench.lock .venv/bin/python benchmarks/control_plane_bench.py \\
        [--pings 3000] [--window 32] [--pipeline-seconds 5] \\
        [--neurons 100,250,500,1000] [--steady 10] [--sims 1] \\
        [--restart [--rejoin-deadline 180]] [--profile [--native]] [--keep] [--no-pin]

Figures go to stdout as Markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run by path: `import helexa` from this checkout

from helexa.protocol import (  # noqa: E402
    MIN_PROTOCOL_VERSION,
    PROTOCOL_VERSION,
    Challenge,
    GpuInfo,
    GpuUsage,
    Hardware,
    Heartbeat,
    Hello,
    Join,
    ModelState,
    ModelStatus,
    NeuronDescriptor,
    NeuronMetrics,
    Ping,
    Pong,
    Refused,
    Welcome,
    auth,
)
from helexa.transport import websocket as ws_transport  # noqa: E402

GiB = 1024**3


# --- the lean neuron (used by both client modes) ------------------------------------------


def descriptor(node_id: str) -> NeuronDescriptor:
    return NeuronDescriptor(
        node_id=node_id,
        hardware=Hardware(
            cpu_cores=16,
            ram_total=64 * GiB,
            cpu_model="Simulated CPU @ 3.0GHz",
            platform="Linux x86_64",
            gpus=(GpuInfo(0, "NVIDIA RTX 4090", 24 * GiB, 20 * GiB, "8.9", f"GPU-{node_id}"),),
        ),
        hostname=node_id,
        software="helexa control-plane bench",
    )


MODEL = ModelStatus("smollm2-135m-instruct", ModelState.LOADED, "llama_cpp", memory_bytes=300 * 1024**2)


def heartbeat(seq: int, rng: random.Random) -> Heartbeat:
    return Heartbeat(
        seq,
        NeuronMetrics(
            cpu_percent=rng.uniform(0, 100),
            ram_used=int(rng.uniform(4, 60) * GiB),
            ram_total=64 * GiB,
            gpus=(GpuUsage(0, 4 * GiB, 20 * GiB, rng.uniform(0, 100)),),
        ),
        (MODEL,),
    )


async def join(channel, node_id: str, token: str) -> Welcome:  # noqa: ANN001
    """The neuron's side of the handshake, as :class:`Neuron` does it."""
    nonce = auth.new_nonce()
    await channel.send(Hello(node_id, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION, nonce, "bench"))
    challenge = await channel.receive()
    if not isinstance(challenge, Challenge):
        raise RuntimeError(f"{node_id}: expected challenge, got {challenge!r}")
    proof = auth.join_proof(token, challenge.nonce, nonce, node_id)
    await channel.send(Join(proof, descriptor(node_id), (MODEL,)))
    welcome = await channel.receive()
    if isinstance(welcome, Refused) or not isinstance(welcome, Welcome):
        raise RuntimeError(f"{node_id}: not welcomed: {welcome!r}")
    if not auth.verify(auth.welcome_proof(token, challenge.nonce, nonce, node_id), welcome.proof):
        raise RuntimeError(f"{node_id}: the cortex's welcome proof does not verify")
    return welcome


async def sim_main(url: str, token: str, prefix: str) -> None:
    """Simulator process: a :class:`swarm.Swarm`; reads ``add N`` / ``rejoin`` / ``stats`` /
    ``quit`` lines on stdin and answers each with one JSON line."""
    from swarm import Swarm, heartbeat_body_check

    heartbeat_body_check(heartbeat(1, random.Random(1)))
    swarm = Swarm(url, token, prefix, descriptor=descriptor, models=(MODEL,), heartbeat=heartbeat)
    cpu0 = time.process_time()

    async def all_joined(deadline: float) -> None:
        with trio.move_on_after(deadline):
            while swarm.joined_in_generation < len(swarm.neurons):
                await trio.sleep(0.05)

    def failures() -> dict[str, int]:
        out = dict(swarm.attempt_failures.most_common(8))
        swarm.attempt_failures.clear()
        return out

    async with trio.open_nursery() as nursery:
        nursery.start_soon(swarm.run_timetable)
        while True:
            line = await trio.to_thread.run_sync(sys.stdin.readline)
            cmd = line.split()
            if not cmd or cmd[0] == "quit":
                nursery.cancel_scope.cancel()
                return
            if cmd[0] == "stats":
                print(json.dumps({"alive": swarm.alive, "drops": swarm.drops, "heartbeats": swarm.heartbeats,
                                  "held_back": swarm.held_back, "max_lag": swarm.max_lag,
                                  "cpu_s": time.process_time() - cpu0}), flush=True)
                swarm.max_lag = 0.0
            elif cmd[0] == "add":
                t0 = time.perf_counter()
                swarm.take_join_times()
                swarm.add(nursery, int(cmd[1]))
                await all_joined(120)
                times = swarm.take_join_times()
                print(json.dumps({"seconds": time.perf_counter() - t0, "ok": swarm.joined_in_generation,
                                  "missing": len(swarm.neurons) - swarm.joined_in_generation,
                                  "attempt_failures": failures(),
                                  "join_p50": _pct(times, 50), "join_p99": _pct(times, 99)}), flush=True)
            elif cmd[0] == "rejoin":  # the cortex is being restarted: every neuron must join again
                swarm.take_join_times()
                swarm.next_generation()
                failures()
                await all_joined(float(cmd[1]) if len(cmd) > 1 else 180)
                times = swarm.take_join_times()
                print(json.dumps({"last_join_wall": swarm.last_join_wall, "ok": swarm.joined_in_generation,
                                  "missing": len(swarm.neurons) - swarm.joined_in_generation,
                                  "attempt_failures": failures(),
                                  "join_p50": _pct(times, 50), "join_p99": _pct(times, 99)}), flush=True)


# --- the round-trip client -------------------------------------------------------------------


def _pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


async def rtt_main(url: str, token: str, node_id: str, pings: int, window: int, seconds: float) -> None:
    """Round-trip client process: joins, heartbeats, and times Ping -> Pong."""
    async with ws_transport.connect(url, timeout=10) as channel:
        with trio.fail_after(10):
            welcome = await join(channel, node_id, token)
        waiting: dict[int, float] = {}
        rtts: list[float] = []
        arrived = trio.Event()
        got = [0]

        async def reader() -> None:
            nonlocal arrived
            while True:
                msg = await channel.receive()
                if isinstance(msg, Pong):
                    sent = waiting.pop(msg.nonce, None)
                    if sent is not None:
                        rtts.append(time.perf_counter() - sent)
                        got[0] += 1
                        arrived.set()
                        arrived = trio.Event()

        async def heartbeats() -> None:
            rng = random.Random(node_id)
            seq = 0
            while True:
                seq += 1
                await channel.send(heartbeat(seq, rng))
                await trio.sleep(welcome.heartbeat_interval)

        result: dict[str, float] = {}
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            nursery.start_soon(heartbeats)
            nonce = 0
            for _ in range(min(200, pings)):  # warm up
                nonce += 1
                waiting[nonce] = time.perf_counter()
                await channel.send(Ping(nonce))
                while nonce in waiting:
                    await arrived.wait()
            rtts.clear()
            t0 = time.perf_counter()
            for _ in range(pings):
                nonce += 1
                waiting[nonce] = time.perf_counter()
                await channel.send(Ping(nonce))
                with trio.fail_after(5):
                    while nonce in waiting:
                        await arrived.wait()
            seq_wall = time.perf_counter() - t0
            result.update(p50_ms=_pct(rtts, 50) * 1e3, p99_ms=_pct(rtts, 99) * 1e3,
                          max_ms=max(rtts) * 1e3, seq_per_s=pings / seq_wall, n=len(rtts))
            if window > 0 and seconds > 0:
                rtts.clear()
                got[0] = 0
                t0 = time.perf_counter()
                deadline = t0 + seconds
                while time.perf_counter() < deadline:
                    while len(waiting) < window:
                        nonce += 1
                        waiting[nonce] = time.perf_counter()
                        await channel.send(Ping(nonce))
                    await arrived.wait()
                with trio.fail_after(5):
                    while waiting:
                        await arrived.wait()
                wall = time.perf_counter() - t0
                result.update(pipe_per_s=got[0] / wall, pipe_p50_ms=_pct(rtts, 50) * 1e3,
                              pipe_p99_ms=_pct(rtts, 99) * 1e3)
            nursery.cancel_scope.cancel()
    print(json.dumps(result), flush=True)


# --- the orchestrator ------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pinned(cpu: int | None, argv: list[str]) -> list[str]:
    if cpu is None:
        return argv
    return ["taskset", "-c", str(cpu), *argv]


def fleet(gateway: str, data_dir: Path) -> dict:
    """``/admin/fleet`` with the cortex's admin token (read from its data directory)."""
    import httpx

    token = (data_dir / "admin-token").read_text().strip()
    return httpx.get(gateway + "/admin/fleet", timeout=30, headers={"authorization": f"Bearer {token}"}).json()


def wait_for_cortex(cortex: subprocess.Popen, gateway: str, data: Path, *, timeout: float, poll: float) -> None:
    """Return once the cortex answers its fleet view; raise if it exited or took ``timeout`` s."""
    deadline = time.time() + timeout
    while True:
        try:
            fleet(gateway, data / "cortex")
            return
        except Exception:
            if cortex.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"the cortex did not start; see {data / 'cortex.log'}") from None
            time.sleep(poll)


def machine_busy() -> float:
    """CPU seconds spent by everything on the machine (to show what else was running)."""
    import psutil

    t = psutil.cpu_times()
    return t.user + t.nice + t.system + getattr(t, "irq", 0) + getattr(t, "softirq", 0)


def cpu_seconds(procs: list) -> float:  # noqa: ANN001
    total = 0.0
    for p in procs:
        t = p.cpu_times()
        total += t.user + t.system
    return total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pings", type=int, default=3000, help="sequential round trips")
    ap.add_argument("--window", type=int, default=32, help="pings in flight in the pipelined mode (0: skip)")
    ap.add_argument("--pipeline-seconds", type=float, default=5.0)
    ap.add_argument("--neurons", default="100,250,500,1000", help="simulated fleet sizes, ascending (empty: skip)")
    ap.add_argument("--steady", type=float, default=10.0, help="seconds of steady state measured per step")
    ap.add_argument("--settle", type=float, default=3.0, help="seconds after a batch joins before measuring")
    ap.add_argument("--sims", type=int, default=1, help="simulator processes")
    ap.add_argument("--rejoin-deadline", type=float, default=180.0,
                    help="seconds the simulators wait for every neuron to rejoin after the restart")
    ap.add_argument("--probe-pings", type=int, default=300, help="round trips measured under each load")
    ap.add_argument("--restart", action="store_true",
                    help="after the ramp, kill -9 the cortex, start it again and time every neuron's rejoin")
    ap.add_argument("--no-pin", action="store_true", help="do not pin the cortex and the clients to CPUs")
    ap.add_argument("--keep", action="store_true", help="keep the cortex's data dir and log")
    ap.add_argument("--profile", action="store_true",
                    help="sample the cortex with py-spy over the last step's steady state and, with --restart, over "
                         "the storm (collapsed stacks kept in its data dir; implies --keep)")
    ap.add_argument("--native", action="store_true",
                    help="with --profile: sample native frames too (the interpreter's garbage collector, say)")
    # internal: the client processes
    ap.add_argument("--_role", choices=["rtt", "sim"], help=argparse.SUPPRESS)
    ap.add_argument("--_url", help=argparse.SUPPRESS)
    ap.add_argument("--_token-file", help=argparse.SUPPRESS)
    ap.add_argument("--_id", default="bench", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args._role:
        token = Path(args._token_file).read_text().strip()
        if args._role == "rtt":
            trio.run(rtt_main, args._url, token, args._id, args.pings, args.window, args.pipeline_seconds)
        else:
            trio.run(sim_main, args._url, token, args._id)
        return 0
    return orchestrate(args)


def orchestrate(args: argparse.Namespace) -> int:
    import psutil

    pin = not args.no_pin and shutil.which("taskset") is not None and (os.cpu_count() or 1) >= 2
    cortex_cpu, client_cpu = (0, 1) if pin else (None, None)
    if pin:
        os.sched_setaffinity(0, {1})
    helexa_bin = Path(sys.executable).parent / "helexa"
    data = Path(tempfile.mkdtemp(prefix="helexa-cpbench-"))
    cport, gport = free_port(), free_port()
    url, gateway = f"ws://127.0.0.1:{cport}", f"http://127.0.0.1:{gport}"
    log = open(data / "cortex.log", "w")
    cortex_cmd = pinned(cortex_cpu, [str(helexa_bin), "cortex", "--data-dir", str(data / "cortex"),
                                     "--control-socket", f"127.0.0.1:{cport}", "--gateway-socket",
                                     f"127.0.0.1:{gport}"])
    cortex = subprocess.Popen(cortex_cmd, stdout=log, stderr=subprocess.STDOUT)
    sims: list[subprocess.Popen] = []
    me = [sys.executable, str(Path(__file__).resolve())]
    token_file = data / "cortex" / "join-token"
    out: list[str] = []

    def say(line: str = "") -> None:
        print(line, flush=True)
        out.append(line)

    def client(role: str, node_id: str, *extra: str, **kw) -> subprocess.Popen:  # noqa: ANN003
        return subprocess.Popen(
            pinned(client_cpu, [*me, "--_role", role, "--_url", url, "--_token-file", str(token_file),
                                "--_id", node_id, *extra]),
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL if role == "rtt" else None, text=True, **kw,
        )

    def rtt(node_id: str, pings: int, window: int, seconds: float) -> dict:
        p = client("rtt", node_id, "--pings", str(pings), "--window", str(window),
                   "--pipeline-seconds", str(seconds))
        stdout, _ = p.communicate(timeout=300)
        if p.returncode != 0:
            raise RuntimeError(f"rtt client {node_id} failed ({p.returncode})")
        return json.loads(stdout.strip().splitlines()[-1])

    try:
        wait_for_cortex(cortex, gateway, data, timeout=30, poll=0.2)
        cproc = psutil.Process(cortex.pid)
        if pin:  # taskset execs the cortex in place: this pid is the cortex
            assert cproc.cpu_affinity() == [cortex_cpu]

        say(f"machine: {os.cpu_count()} CPUs ({_cpu_model()}), load average before start "
            f"{os.getloadavg()[0]:.2f}; cortex {'on CPU 0, clients on CPU 1' if pin else 'unpinned'}")
        say()
        say("### Round trips (one neuron connection, Ping -> Pong, across processes)")
        say()
        m0, t0 = machine_busy(), time.perf_counter()
        r = rtt("bench-rtt", args.pings, args.window, args.pipeline_seconds)
        busy = 100 * (machine_busy() - m0) / (time.perf_counter() - t0)
        say("| mode | round trips | p50 ms | p99 ms | round trips/s | frames/s |")
        say("|---|---|---|---|---|---|")
        say(f"| sequential | {r['n']} | {r['p50_ms']:.3f} | {r['p99_ms']:.3f} | {r['seq_per_s']:.0f} "
            f"| {2 * r['seq_per_s']:.0f} |")
        if "pipe_per_s" in r:
            say(f"| pipelined, {args.window} in flight, {args.pipeline_seconds:g} s | - | {r['pipe_p50_ms']:.3f} "
                f"| {r['pipe_p99_ms']:.3f} | {r['pipe_per_s']:.0f} | {2 * r['pipe_per_s']:.0f} |")
        say()
        say(f"Whole machine busy {busy:.0f}% of one core during the round trips (cortex + client + anything else).")
        say()

        sizes = [int(x) for x in args.neurons.split(",") if x.strip()]
        # The cortex's own background work with no neuron at all, to take off per heartbeat.
        c0, t0 = cpu_seconds([cproc]), time.perf_counter()
        time.sleep(5)
        args.idle_cpu = (cpu_seconds([cproc]) - c0) / (time.perf_counter() - t0)
        say(f"Cortex CPU with no neuron joined: {100 * args.idle_cpu:.1f}% of a core.")
        say()
        if sizes:
            sims = [client("sim", f"sim{k}", stdin=subprocess.PIPE) for k in range(args.sims)]
            sprocs = [psutil.Process(p.pid) for p in sims]
            spy = None
            say("### Neurons held by one cortex at a 1 s heartbeat (simulated neurons, real handshake "
                "and heartbeats)")
            say()
            say("| neurons | batch joined in s (p99 per join ms) | cortex CPU % | cortex CPU ms per heartbeat "
                "(less its idle CPU) | simulators CPU % | healthy "
                "| oldest heartbeat s | dropped | ping p50 / p99 ms under load | other processes CPU % |")
            say("|---|---|---|---|---|---|---|---|---|---|")
            have = 0
            for size in sizes:
                add = size - have
                shares = [add // len(sims) + (1 if k < add % len(sims) else 0) for k in range(len(sims))]
                for p, n in zip(sims, shares):
                    p.stdin.write(f"add {n}\n")
                    p.stdin.flush()
                joins = [json.loads(p.stdout.readline()) for p in sims]
                have = size
                join_s = max(j["seconds"] for j in joins)
                join_p99 = max(j["join_p99"] for j in joins) * 1e3
                failed = sum(j["missing"] for j in joins)
                retried = _merge(j["attempt_failures"] for j in joins)
                time.sleep(args.settle)
                if size == sizes[-1]:  # the steady state of the last step, without the joins
                    spy = _spy(args, cortex.pid, data / "steady.collapsed")
                h0 = sum(s["heartbeats"] for s in _stats(sims))
                c0, s0, m0, t0 = cpu_seconds([cproc]), cpu_seconds(sprocs), machine_busy(), time.perf_counter()
                time.sleep(args.steady)
                c1, s1, m1, t1 = cpu_seconds([cproc]), cpu_seconds(sprocs), machine_busy(), time.perf_counter()
                beats = max(1, sum(s["heartbeats"] for s in _stats(sims)) - h0)
                if spy is not None:
                    spy.send_signal(signal.SIGINT)
                    spy.wait(timeout=60)
                    spy = None
                others = (m1 - m0) - (c1 - c0) - (s1 - s0)
                wall = t1 - t0
                view = fleet(gateway, data / "cortex")["neurons"]
                now = time.time()
                sim_view = [n for n in view if n["node_id"].startswith("sim")]
                healthy = sum(1 for n in sim_view if n["health"] == "healthy")
                # Over the healthy ones: a dropped neuron's last heartbeat only ages (it is counted apart).
                oldest = max((now - n["last_heartbeat"] for n in sim_view if n["health"] == "healthy"),
                             default=float("nan"))
                for p in sims:
                    p.stdin.write("stats\n")
                    p.stdin.flush()
                st = [json.loads(p.stdout.readline()) for p in sims]
                drops = sum(s["drops"] for s in st)
                try:
                    probe = rtt(f"bench-probe-{size}", args.probe_pings, 0, 0) if args.probe_pings else None
                    probe_txt = f"{probe['p50_ms']:.2f} / {probe['p99_ms']:.2f}" if probe else "-"
                except RuntimeError:
                    probe_txt = "timed out"
                say(f"| {size} | {join_s:.2f} ({join_p99:.0f}){f', {failed} never joined' if failed else ''} "
                    f"| {100 * (c1 - c0) / wall:.0f} | {1e3 * (c1 - c0) / beats:.3f} "
                    f"({1e3 * (c1 - c0 - args.idle_cpu * wall) / beats:.3f}) "
                    f"| {100 * (s1 - s0) / wall:.0f} | {healthy}/{size} "
                    f"| {oldest:.2f} | {drops} | {probe_txt} | {100 * max(0.0, others) / wall:.0f} |")
                if retried:
                    say(f"(attempts that failed and were retried, by kind: {retried})")
                if healthy < size * 0.9:
                    say(f"(stopping the ramp: only {healthy} of {size} healthy)")
                    break
            say()
            say(f"Simulator heartbeat lag (its own scheduling, worst): {max(s['max_lag'] for s in st):.3f} s; "
                f"cortex RSS at the end: {cproc.memory_info().rss / 2**20:.0f} MiB.")
            if spy is not None:
                spy.send_signal(signal.SIGINT)
                spy.wait(timeout=60)
            if args.restart:
                cortex, cproc = restart_storm(args, sims, sprocs, cortex, cortex_cmd, log, gateway, data, have, say)
        return 0
    finally:
        for p in sims:
            try:
                p.stdin.write("quit\n")
                p.stdin.flush()
            except (BrokenPipeError, ValueError):
                pass
        for p in sims:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        cortex.send_signal(signal.SIGTERM)
        try:
            cortex.wait(timeout=30)
        except subprocess.TimeoutExpired:
            cortex.kill()
        log.close()
        if args.keep or args.profile:
            print(f"(cortex data and log kept in {data})", file=sys.stderr)
        else:
            shutil.rmtree(data, ignore_errors=True)


def restart_storm(args, sims, sprocs, cortex, cortex_cmd, log, gateway, data, size, say):  # noqa: ANN001, ANN201
    """Kill -9 the cortex holding ``size`` neurons, start it again on the same sockets and
    data directory, and time every neuron's rejoin (each redials on its own, with the
    neuron's backoff and jitter); then the CPU per heartbeat at 1 s."""
    import psutil

    cortex.kill()
    cortex.wait()
    t_kill = time.perf_counter()
    for p in sims:
        p.stdin.write(f"rejoin {args.rejoin_deadline}\n")
        p.stdin.flush()
    cortex = subprocess.Popen(cortex_cmd, stdout=log, stderr=subprocess.STDOUT)
    cproc = psutil.Process(cortex.pid)
    spy = _spy(args, cortex.pid, data / "storm.collapsed")
    wait_for_cortex(cortex, gateway, data, timeout=60, poll=0.1)
    t_up, t_up_wall = time.perf_counter(), time.time()
    c_up, w_up = cpu_seconds([cproc]), sched_wait(cortex.pid)
    joins = [json.loads(p.stdout.readline()) for p in sims]
    missing = sum(j["missing"] for j in joins)
    c_joined, w_joined = cpu_seconds([cproc]), sched_wait(cortex.pid)
    last = max(j["last_join_wall"] for j in joins)
    if spy is not None:
        spy.send_signal(signal.SIGINT)
        spy.wait(timeout=60)
    time.sleep(args.settle)
    stats = _stats(sims)
    c0, w0, t0, h0 = cpu_seconds([cproc]), sched_wait(cortex.pid), time.perf_counter(), sum(s["heartbeats"] for s in stats)
    s0 = sum(s["cpu_s"] for s in stats)
    load0 = os.getloadavg()[0]
    time.sleep(args.steady)
    c1, w1, t1 = cpu_seconds([cproc]), sched_wait(cortex.pid), time.perf_counter()
    st = _stats(sims)
    beats = sum(s["heartbeats"] for s in st) - h0
    s1 = sum(s["cpu_s"] for s in st)
    load1 = os.getloadavg()[0]
    view = fleet(gateway, data / "cortex")["neurons"]
    now = time.time()
    view = [n for n in view if n["node_id"].startswith("sim")]
    healthy = sum(1 for n in view if n["health"] == "healthy")
    oldest = max((now - n["last_heartbeat"] for n in view if n["health"] == "healthy"), default=float("nan"))
    wall = t1 - t0
    say()
    say("### A cortex restarted (kill -9) under its whole fleet: every neuron rejoins")
    say()
    say("| neurons | cortex up again s | all rejoined s after it was up (p99 per neuron ms) | never rejoined "
        "| cortex CPU s for the storm (waited for a CPU s) | healthy after | cortex CPU % at 1 s heartbeats "
        "(waited %) | cortex CPU ms per heartbeat (less its idle CPU) | oldest heartbeat s | simulators CPU % (worst lag s) "
        "| load average |")
    say("|---|---|---|---|---|---|---|---|---|---|---|")
    say(f"| {size} | {t_up - t_kill:.2f} | {last - t_up_wall:.2f} ({max(j['join_p99'] for j in joins) * 1e3:.0f}) "
        f"| {missing} | {c_joined - c_up:.2f} ({w_joined - w_up:.2f}) | {healthy}/{size} "
        f"| {100 * (c1 - c0) / wall:.0f} ({100 * (w1 - w0) / wall:.0f}) "
        f"| {1e3 * (c1 - c0) / max(1, beats):.3f} ({1e3 * (c1 - c0 - args.idle_cpu * wall) / max(1, beats):.3f}) "
        f"| {oldest:.2f} "
        f"| {100 * (s1 - s0) / wall:.0f} ({max(s['max_lag'] for s in st):.3f}) | {load0:.1f}-{load1:.1f} |")
    retried = _merge(j["attempt_failures"] for j in joins)
    if retried:
        say(f"(attempts that failed and were retried, by kind: {retried})")
    return cortex, cproc


def _merge(counts) -> dict[str, int]:  # noqa: ANN001
    out: dict[str, int] = {}
    for c in counts:
        for k, n in c.items():
            out[k] = out.get(k, 0) + n
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def _stats(sims) -> list[dict]:  # noqa: ANN001
    for p in sims:
        p.stdin.write("stats\n")
        p.stdin.flush()
    return [json.loads(p.stdout.readline()) for p in sims]


def sched_wait(pid: int) -> float:
    """Seconds the process's main thread (the cortex's event loop) has spent runnable but
    waiting for a CPU (``/proc/PID/schedstat``)."""
    try:
        return int(Path(f"/proc/{pid}/schedstat").read_text().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return float("nan")


def _spy(args, pid: int, out: Path):  # noqa: ANN001, ANN202
    """py-spy sampling ``pid`` into collapsed stacks at ``out`` (with ``--profile``)."""
    exe = shutil.which("py-spy", path=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
    if not args.profile or exe is None:
        return None
    return subprocess.Popen([exe, "record", "--pid", str(pid), "--format", "raw", "--rate", "50",
                             *(["--native"] if args.native else ["--nonblocking"]), "--output", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "?"


if __name__ == "__main__":
    sys.exit(main())
