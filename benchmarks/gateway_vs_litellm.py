#!/usr/bin/env python3
"""helexa's gateway vs LiteLLM's proxy, in front of the same fake OpenAI backend, in one run.

Targets, measured interleaved (every round visits each in turn) with the harness in
``benchmarks/litellm_harness/`` (a copy of ``../shared/bench/``: wrk for non-streaming
requests, an aiohttp closed-loop client for streams, medians over rounds):

* ``direct``       the fake backend itself (uvicorn + uvloop + httptools, CPU 0);
* ``litellm``      LiteLLM's proxy, one worker on CPU 1, in front of the fake backend;
* ``helexa-proxy`` helexa cortex -> neuron (both on CPU 1), model ``fake`` on the
                   ``openai_proxy`` backend pointing at the fake backend;
* ``helexa-synth`` the same cortex and neuron, model ``synth`` on the ``synthetic``
                   backend (no upstream HTTP hop: the fabric alone);
* ``base-proxy``, ``base-synth`` the same from another source tree (``--baseline-src``,
                   e.g. ``git archive OLD | tar -x -C /tmp/old``): before and after a change
                   in one interleaved run.

The load generators run on CPU 0 beside the fake backend (which is never the bottleneck:
~7,000 requests/s on one core), as in the harness README. CPU per request/stream is the
gateway's utime+stime (the cortex's and the neuron's summed for helexa), per completed
request.

Set-up (separate virtual environments, never the project's)::

    apt-get install -y wrk
    python3 -m venv /tmp/venv-be && /tmp/venv-be/bin/pip install uvicorn uvloop httptools aiohttp orjson
    python3 -m venv /tmp/venv-litellm && /tmp/venv-litellm/bin/pip install 'litellm[proxy]'

Run (other people benchmark on this machine too: always under the lock)::

    flock /tmp/helexa-bench.lock /tmp/venv-be/bin/python benchmarks/gateway_vs_litellm.py

Prints a Markdown table of medians (and the per-round lines on stderr); ``--json`` keeps
the raw figures.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import signal
import socket
import statistics as st
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
HARNESS = HERE / "litellm_harness"
REPO = HERE.parent
sys.path.insert(0, str(HARNESS))
import bench  # noqa: E402  (the shared harness: wrk, stream, cpu_s)

TARGETS = ("direct", "litellm", "helexa-proxy", "helexa-synth")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float, proc: subprocess.Popen, log: Path) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            sys.exit(f"{url}: the process exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return time.monotonic() - t0
        except OSError:
            pass
        time.sleep(0.1)
    sys.exit(f"{url} not ready after {timeout:g}s:\n{log.read_text()[-3000:]}")


def post(url: str, body: dict, key: str = "sk-fake", timeout: float = 60) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"content-type": "application/json", "authorization": "Bearer " + key})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


class Procs:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[subprocess.Popen] = []

    def start(self, name: str, args: list[str], env: dict | None = None) -> tuple[subprocess.Popen, Path]:
        log = self.workdir / f"{name}.log"
        p = subprocess.Popen(args, stdout=open(log, "wb"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             env={**os.environ, **(env or {})}, start_new_session=True)
        self.procs.append(p)
        return p, log

    def stop_all(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in reversed(self.procs):
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            p.wait()


def start_all(a: argparse.Namespace, procs: Procs, targets: list[str]) -> dict[str, tuple[str, str, str, list[int]]]:
    """Start what ``targets`` need; returns name -> (base url, model, key, pids to charge)."""
    out: dict[str, tuple[str, str, str, list[int]]] = {}
    be_port = free_port()
    be, be_log = procs.start("fake-backend", ["taskset", "-c", a.backend_cpus, f"{a.be_venv}/bin/uvicorn",
                                              "fake_backend:app", "--app-dir", str(HARNESS), "--host", "127.0.0.1",
                                              "--port", str(be_port), "--loop", "uvloop", "--http", "httptools",
                                              "--no-access-log", "--log-level", "warning"])
    be_url = f"http://127.0.0.1:{be_port}"
    wait_http(be_url + "/health", 30, be, be_log)
    out["direct"] = (be_url, "fake-model", "sk-fake", [be.pid])
    if "litellm" in targets:
        port, key = free_port(), "sk-" + secrets.token_hex(16)
        cfg = procs.workdir / "litellm_config.yaml"
        cfg.write_text(f"""model_list:
  - model_name: fake
    litellm_params:
      model: openai/fake-model
      api_base: {be_url}/v1
      api_key: sk-fake
litellm_settings:
  telemetry: false
general_settings:
  master_key: os.environ/LITELLM_MASTER_KEY
""")
        ll, ll_log = procs.start("litellm", ["taskset", "-c", a.gateway_cpus, f"{a.litellm_venv}/bin/litellm",
                                             "--config", str(cfg), "--host", "127.0.0.1", "--port", str(port),
                                             "--num_workers", "1"],
                                 env={"LITELLM_MASTER_KEY": key, "LITELLM_LOCAL_MODEL_COST_MAP": "True"})
        took = wait_http(f"http://127.0.0.1:{port}/health/liveliness", 180, ll, ll_log)
        print(f"# litellm ready after {took:.1f}s (pid {ll.pid})", file=sys.stderr)
        out["litellm"] = (f"http://127.0.0.1:{port}", "fake", key, [ll.pid])
    if any(t.startswith("helexa") for t in targets):
        out.update(start_helexa(a, procs, be_url, "helexa", {}))
    if any(t.startswith("base") for t in targets):
        # The same commands from another source tree (--baseline-src): before/after a change
        # in one interleaved run.
        out.update(start_helexa(a, procs, be_url, "base", {"HELEXA_SRC": str(Path(a.baseline_src).resolve())}))
    return {t: out[t] for t in targets}


_FROM_SRC = """\
import sys
src = sys.argv.pop(1)
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f)]
sys.path.insert(0, src)
import helexa
assert helexa.__file__.startswith(src), f"helexa from {helexa.__file__}, not {src}"
from helexa.cli import main
sys.argv[0] = "helexa"
sys.exit(main())
"""
"""Runs helexa's CLI from the source tree given as its first argument (``--baseline-src``)."""


def start_helexa(a: argparse.Namespace, procs: Procs, be_url: str, tag: str,
                 env: dict[str, str], extra: dict[str, dict[str, float]] | None = None,
                 ) -> dict[str, tuple[str, str, str, list[int]]]:
    """A cortex and a neuron (both on the gateway CPUs) serving ``fake`` (openai_proxy in
    front of the fake backend) and ``synth`` (synthetic); targets ``TAG-proxy``, ``TAG-synth``.
    ``extra``: more synthetic models, name -> metadata (``stream_event_bench.py``'s paced one)."""
    workdir = procs.workdir / tag
    workdir.mkdir()
    models = workdir / "models.toml"
    models.write_text(f"""
[models."fake"]
backend = "openai_proxy"
[models."fake".config]
listen_endpoint = "{be_url}"
metadata = {{ upstream_model = "fake-model", dialect = "openai" }}

[models."synth"]
backend = "synthetic"
[models."synth".config]
metadata = {{ tokens = 64 }}
""" + "".join(f"""
[models."{name}"]
backend = "synthetic"
[models."{name}".config]
metadata = {{ {", ".join(f"{k} = {v}" for k, v in md.items())} }}
""" for name, md in (extra or {}).items()))
    helexa = [str(Path(a.helexa))]
    if "HELEXA_SRC" in env:
        # Another source tree: put it first on the path of helexa's own interpreter, and drop
        # the editable install's import hook, which would otherwise import the checkout's
        # helexa whatever PYTHONPATH says.
        helexa = [str(Path(a.helexa).parent / "python"), "-c", _FROM_SRC, env["HELEXA_SRC"]]
    cx, cx_log = procs.start(f"{tag}-cortex", ["taskset", "-c", a.gateway_cpus, *helexa, "cortex", "--data-dir",
                                               str(workdir / "cortex"), "--control-socket", "127.0.0.1:0",
                                               "--gateway-socket", "127.0.0.1:0", "--models", str(models)],
                             env={"HELEXA_LOG_LEVEL": "info", **env})
    t0 = time.monotonic()
    while not (m := re.search(r"cortex ready: control=(\S+) gateway=(\S+)", cx_log.read_text())):
        if cx.poll() is not None or time.monotonic() - t0 > 60:
            sys.exit("cortex did not start:\n" + cx_log.read_text()[-3000:])
        time.sleep(0.1)
    control, gateway = m.group(1), m.group(2)
    nr, nr_log = procs.start(f"{tag}-neuron", ["taskset", "-c", a.gateway_cpus, *helexa, "neuron", "--cortex", control,
                                               "--node-id", "bench", "--join-token-file",
                                               str(workdir / "cortex" / "join-token")],
                             env={"HELEXA_LOG_LEVEL": "warning", "HELEXA_CPU_POLICY": getattr(a, "neuron_cpu_policy", "normal"), **env})
    t0 = time.monotonic()
    while True:
        try:
            token_file = workdir / "cortex" / "admin-token"  # absent on a cortex from before portals
            auth = {"authorization": f"Bearer {token_file.read_text().strip()}"} if token_file.exists() else {}
            req = urllib.request.Request(gateway + "/admin/fleet", headers=auth)
            with urllib.request.urlopen(req, timeout=2) as r:
                if any(n["node_id"] == "bench" and n["health"] == "healthy" for n in json.loads(r.read())["neurons"]):
                    break
        except OSError:
            pass
        if nr.poll() is not None or time.monotonic() - t0 > 60:
            sys.exit("neuron did not join:\n" + nr_log.read_text()[-3000:])
        time.sleep(0.1)
    for model in ("fake", "synth", *(extra or {})):  # cold-load them all before measuring
        post(gateway + "/v1/chat/completions", {"model": model, "max_tokens": 4,
                                               "messages": [{"role": "user", "content": "hi"}]})
    print(f"# {tag} ready: cortex pid {cx.pid}, neuron pid {nr.pid}, gateway {gateway}", file=sys.stderr)
    return {f"{tag}-proxy": (gateway, "fake", "sk-fake", [cx.pid, nr.pid]),
            f"{tag}-synth": (gateway, "synth", "sk-fake", [cx.pid, nr.pid])}


def cpu(pids: list[int]) -> float:
    return sum(bench.cpu_s(p) for p in pids)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--targets", default=",".join(TARGETS))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dur", type=int, default=5, help="seconds per measurement")
    ap.add_argument("--conc", default="1,16,64")
    ap.add_argument("--sconc", default="1,16")
    ap.add_argument("--chunks", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--cpus", default="0", help="CPUs of the load generators")
    ap.add_argument("--backend-cpus", default="0")
    ap.add_argument("--gateway-cpus", default="1", help="CPUs of LiteLLM and of helexa's cortex + neuron")
    ap.add_argument("--be-venv", default="/tmp/venv-be")
    ap.add_argument("--litellm-venv", default="/tmp/venv-litellm")
    ap.add_argument("--helexa", default=str(REPO / ".venv" / "bin" / "helexa"))
    ap.add_argument("--baseline-src", help="another source tree (e.g. `git archive` of an older commit): "
                    "its cortex and neuron are targets base-proxy and base-synth")
    ap.add_argument("--neuron-cpu-policy", default="normal", choices=("normal", "batch"),
                    help="the neurons' cpu_policy (batch: a frame from the cortex does not preempt it on the shared core)")
    ap.add_argument("--json", help="write the raw figures here")
    a = ap.parse_args()
    targets = a.targets.split(",")
    if "direct" not in targets:
        targets.insert(0, "direct")
    conc, sconc = [int(c) for c in a.conc.split(",")], [int(c) for c in a.sconc.split(",")]
    procs = Procs(Path(tempfile.mkdtemp(prefix="helexa-vs-litellm-")))
    raw: dict[str, list[dict]] = {}
    try:
        tgt = start_all(a, procs, targets)
        for name, (base, model, key, _) in tgt.items():
            if a.warmup:
                bench.wrk(base, 4, a.warmup, model, key, a.cpus)
                bench.stream(base, 2, a.warmup, model, key, a.chunks, a.cpus)
        for r in range(a.rounds):
            for name, (base, model, key, pids) in tgt.items():
                for c in conc:
                    c0, each0 = cpu(pids), [bench.cpu_s(p) for p in pids]
                    res = bench.wrk(base, c, a.dur, model, key, a.cpus)
                    res["cpu_ms"] = (cpu(pids) - c0) * 1e3 / max(res["n"], 1)
                    if len(pids) > 1:  # helexa: the cortex's share and the neuron's
                        res["cpu_ms_each"] = [round((bench.cpu_s(p) - e) * 1e3 / max(res["n"], 1), 3)
                                              for p, e in zip(pids, each0)]
                    raw.setdefault(f"ns_c{c}|{name}", []).append(res)
                    print(f"# r{r} {name:12s} nonstream c={c:<3d} {res}", file=sys.stderr, flush=True)
                for c in sconc:
                    c0, each0 = cpu(pids), [bench.cpu_s(p) for p in pids]
                    res = bench.stream(base, c, a.dur, model, key, a.chunks, a.cpus)
                    res["cpu_ms"] = (cpu(pids) - c0) * 1e3 / max(res["n"], 1)
                    if len(pids) > 1:
                        res["cpu_ms_each"] = [round((bench.cpu_s(p) - e) * 1e3 / max(res["n"], 1), 3)
                                              for p, e in zip(pids, each0)]
                    raw.setdefault(f"st_c{c}|{name}", []).append(res)
                    print(f"# r{r} {name:12s} stream    c={c:<3d} {res}", file=sys.stderr, flush=True)
    finally:
        procs.stop_all()
    med = lambda t, n, k: st.median(x[k] for x in raw[f"{t}|{n}"])  # noqa: E731
    names = list(tgt)
    rows: list[tuple[str, list[float]]] = []
    for c in conc:
        rows.append((f"requests/s, c={c}", [med(f"ns_c{c}", n, "rps") for n in names]))
    c1 = f"ns_c{conc[0]}"
    for k in ("p50_ms", "p99_ms"):
        rows.append((f"latency {k[:3]} ms, c={conc[0]}", [med(c1, n, k) for n in names]))
        rows.append((f"added latency {k[:3]} ms, c={conc[0]}", [med(c1, n, k) - med(c1, "direct", k) for n in names]))
    rows.append((f"CPU ms/request, c={conc[-1]}", [med(f"ns_c{conc[-1]}", n, "cpu_ms") for n in names]))
    for c in sconc:
        rows.append((f"{a.chunks}-chunk stream: TTFT p50 ms, c={c}", [med(f"st_c{c}", n, "ttfc_p50") for n in names]))
        rows.append((f"{a.chunks}-chunk stream: TTFT p99 ms, c={c}", [med(f"st_c{c}", n, "ttfc_p99") for n in names]))
        rows.append((f"{a.chunks}-chunk stream: total p50 ms, c={c}", [med(f"st_c{c}", n, "tot_p50") for n in names]))
        rows.append((f"{a.chunks}-chunk streams/s, c={c}", [med(f"st_c{c}", n, "sps") for n in names]))
        rows.append((f"SSE events per stream, c={c}", [med(f"st_c{c}", n, "events") for n in names]))
        rows.append((f"CPU ms/stream, c={c}", [med(f"st_c{c}", n, "cpu_ms") for n in names]))
        rows.append((f"CPU µs/chunk, c={c}", [med(f"st_c{c}", n, "cpu_ms") * 1e3 / a.chunks for n in names]))
    errors = {n: sum(x.get("errors", 0) for k, v in raw.items() if k.endswith("|" + n) for x in v) for n in names}
    print(f"\nMedians of {a.rounds} interleaved rounds, {a.dur}s each; load generators on CPU {a.cpus}, "
          f"gateways on CPU {a.gateway_cpus}.\n")
    print("| metric | " + " | ".join(names) + " |")
    print("|---|" + "---:|" * len(names))
    for label, vals in rows:
        print(f"| {label} | " + " | ".join(f"{v:,.2f}" for v in vals) + " |")
    print("| errors | " + " | ".join(str(errors[n]) for n in names) + " |")
    if "litellm" in names:
        ll = names.index("litellm")
        print()
        for n in (n for n in names if n.startswith(("helexa", "base"))):
            h = names.index(n)
            ratio = lambda label: dict(rows)[label][h] / dict(rows)[label][ll]  # noqa: E731
            added = dict(rows)[f"added latency p50 ms, c={conc[0]}"]
            print(f"{n} vs litellm: added p50 {added[h]:.2f} ms vs {added[ll]:.2f} ms "
                  f"({added[h] / added[ll]:.3f}x); " +
                  ", ".join(f"req/s c={c} {ratio(f'requests/s, c={c}'):.1f}x" for c in conc) + ", " +
                  ", ".join(f"streams/s c={c} {ratio(f'{a.chunks}-chunk streams/s, c={c}'):.1f}x" for c in sconc))
    if a.json:
        Path(a.json).write_text(json.dumps(raw, indent=1))


if __name__ == "__main__":
    main()
