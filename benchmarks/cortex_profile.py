#!/usr/bin/env python3
"""Where a running cortex's Python calls go, per request, end to end: by step of the
request path and by function.

A cortex and a neuron (``gateway_vs_litellm.start_helexa``: both on ``--gateway-cpus``,
model ``synth`` on the synthetic backend) serve ``wrk`` (non-streamed chat completions,
``--conc`` connections). ``cProfile`` runs inside the cortex only while ``wrk`` runs: a
``sitecustomize`` in a temporary folder on the processes' ``PYTHONPATH`` (outside the
repository, so nothing of this is in the cortex's own code) starts it on ``SIGUSR1`` and
writes its statistics on ``SIGUSR2``. The calls are divided by the requests ``wrk``
completed.

Each function's calls are counted under a step of the request path, by the module that
holds it (:data:`STEPS`). A built-in, the standard library, or code generated at run time
(a dataclass's ``__init__``) counts under the step of its caller, split by the calls each
caller made, so that ``object.__setattr__`` in a frozen dataclass counts where the
dataclass was built.

Usage (under the benchmark lock)::

    flock /tmp/helexa-bench.lock /tmp/venv-be/bin/python benchmarks/cortex_profile.py \\
        [--conc 16] [--dur 5] [--top 40] [--src TREE ...] [--neuron-cpu-policy batch]

``--src``: the same from other source trees (``git archive OLD | tar -x -C /tmp/old``), in
the same run (a pair per tree is started, each profiled in turn), printed side by side.
"""

from __future__ import annotations

import argparse
import os
import pstats
import signal
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

_SITECUSTOMIZE = '''\
import os, signal
_out = os.environ.get("HELEXA_PROFILE_OUT")
if _out:
    import cProfile
    _profile = None

    def _start(signum, frame):
        global _profile
        _profile = cProfile.Profile()
        _profile.enable()

    def _stop(signum, frame):
        global _profile
        if _profile is not None:
            _profile.disable()
            _profile.dump_stats(f"{_out}.{os.getpid()}")
            _profile = None

    signal.signal(signal.SIGUSR1, _start)
    signal.signal(signal.SIGUSR2, _stop)
'''

STEPS: list[tuple[str, tuple[str, ...]]] = [
    ("HTTP server: read, parse the head, frame and write the answer", ("/helexa/roles/cortex/http/",)),
    ("ASGI glue: routing, the exchange, the responder, disconnect watch, in-flight count",
     ("/helexa/roles/cortex/asgi.py", "/helexa/roles/cortex/gateway.py", "/helexa/roles/cortex/disconnect_watch.py",
      "/helexa/roles/cortex/shutdown.py", "/helexa/logs.py", "/helexa/telemetry")),
    ("request parsing: pydantic, openai_api (body -> GenerateRequest)",
     ("/helexa/roles/cortex/openai_api.py", "/helexa/roles/cortex/openai_requests.py", "/pydantic/",
      "/pydantic_core/")),
    ("the surface and the choices (openai_surface, choices, the answer's JSON)",
     ("/helexa/roles/cortex/openai_surface.py", "/helexa/roles/cortex/choices.py", "/helexa/roles/cortex/sse.py",
      "/helexa/roles/cortex/openai_answers.py", "/orjson")),
    ("request limits, metering, quotas, metrics, traffic",
     ("/helexa/roles/cortex/request_limits.py", "/helexa/roles/cortex/token_counter.py",
      "/helexa/roles/cortex/portal/", "/helexa/roles/cortex/metrics.py", "/helexa/roles/cortex/metric_families.py",
      "/helexa/roles/cortex/web/")),
    ("orchestrator: decide, schedule, prefix index, routing log",
     ("/helexa/roles/cortex/orchestrator.py", "/helexa/roles/cortex/scheduler.py", "/helexa/roles/cortex/prefix.py",
      "/helexa/roles/cortex/admission.py", "/helexa/roles/cortex/routing_log.py",
      "/helexa/roles/cortex/provisioner.py", "/helexa/roles/cortex/fleet.py", "/helexa/roles/cortex/queue.py")),
    ("dispatch: attempt, deadlines, feedback", ("/helexa/roles/cortex/dispatch.py",)),
    ("neuron link: the request's frame out, the reply's frame in (codec, websocket)",
     ("/helexa/roles/cortex/neuron_link.py", "/helexa/roles/cortex/control_server.py", "/helexa/transport/",
      "/helexa/protocol/", "/msgpack/", "/wsproto/")),
    ("trio: scheduler, cancel scopes, clock, sockets", ("/trio/", "/outcome/", "/sniffio/", "/attr/", "/attrs/")),
]

_OWN = "other helexa code"
_UNPLACED = "other (the profiler's own, unattributed)"


def step_of(filename: str) -> str | None:
    """The step a function of ``filename`` belongs to; None: count it under its callers'."""
    if filename == "~" or filename.startswith("<") or "/lib/python3" in filename and "site-packages" not in filename:
        return None
    for name, parts in STEPS:
        if any(p in filename for p in parts):
            return name
    if "/helexa/" in filename:
        return _OWN
    return None


def attribute(stats: pstats.Stats) -> dict[str, float]:
    """Calls by step (see the module docstring)."""
    table = stats.stats  # type: ignore[attr-defined]
    memo: dict[tuple, dict[str, float]] = {}

    def shares(func: tuple, seen: frozenset) -> dict[str, float]:
        """How one call of ``func`` divides among the steps."""
        if func in memo:
            return memo[func]
        step = step_of(func[0])
        if step is not None:
            out = {step: 1.0}
        else:
            callers = table.get(func, (0, 0, 0, 0, {}))[4]
            total = sum(v[1] if isinstance(v, tuple) else v for v in callers.values())
            out = defaultdict(float)
            if not total or func in seen:
                out[_UNPLACED] = 1.0
            else:
                for caller, v in callers.items():
                    n = v[1] if isinstance(v, tuple) else v
                    for s, w in shares(caller, seen | {func}).items():
                        out[s] += w * n / total
            out = dict(out)
        if not seen:
            memo[func] = out
        return out

    by: dict[str, float] = defaultdict(float)
    for func, (_, nc, *_rest) in table.items():
        for s, w in shares(func, frozenset()).items():
            by[s] += nc * w
    return by


def step_table(results: dict[str, tuple[pstats.Stats, int]]) -> None:
    """Print the calls per request by step, one column per tree."""
    names = list(results)
    steps = {t: attribute(s) for t, (s, _) in results.items()}
    order = [name for name, _ in STEPS] + [_OWN, _UNPLACED]
    print("| step | " + " | ".join(names) + " |")
    print("|---|" + "---:|" * len(names))
    for step in order:
        if any(steps[t].get(step) for t in names):
            print(f"| {step} | " + " | ".join(f"{steps[t].get(step, 0) / results[t][1]:.1f}" for t in names) + " |")
    print("| **all** | " + " | ".join(f"**{sum(steps[t].values()) / results[t][1]:.0f}**" for t in names) + " |")
    print("| task steps (trio's run loop resuming a task) | "
          + " | ".join(f"{task_steps(s) / n:.2f}" for s, n in results.values()) + " |")


def task_steps(stats: pstats.Stats) -> int:
    """How many times trio's run loop resumed a task (``Context.run`` called from
    ``unrolled_run``): the scheduler passes."""
    for func, (_, _, _, _, callers) in stats.stats.items():  # type: ignore[attr-defined]
        if func[0] == "~" and func[2] == "<method 'run' of '_contextvars.Context' objects>":
            return sum(v[1] for c, v in callers.items() if c[2] == "unrolled_run")
    return 0


def top_table(label: str, stats: pstats.Stats, requests: int, top: int) -> None:
    """Print the ``top`` functions called most, per request."""
    rows = sorted(stats.stats.items(), key=lambda kv: -kv[1][1])[:top]  # type: ignore[attr-defined]
    print()
    print(f"{label}: the {top} functions called most, per request")
    print()
    print("| calls | function | where | step |")
    print("|---:|---|---|---|")
    for (filename, line, name), (_, nc, *_rest) in rows:
        where = filename.split("site-packages/")[-1].split("/helexa/", 1)[-1] if filename != "~" else "built-in"
        step = step_of(filename) or "(its callers')"
        print(f"| {nc / requests:.2f} | `{name}` | {where}:{line} | {step.split(':')[0]} |")


def print_profile(label: str, stats: pstats.Stats, requests: int, top: int) -> None:
    """The step table and the top functions of one profile (``cpu_per_request --top``)."""
    print()
    step_table({label: (stats, requests)})
    top_table(label, stats, requests, top)


def profile_pair(g: Any, tag: str, base: str, model: str, key: str, cortex: int, out: str, a: argparse.Namespace
                 ) -> tuple[pstats.Stats, int]:
    g.bench.wrk(base, a.conc, 2, model, key, a.cpus)  # warm
    os.kill(cortex, signal.SIGUSR1)
    time.sleep(0.2)
    res = g.bench.wrk(base, a.conc, a.dur, model, key, a.cpus)
    os.kill(cortex, signal.SIGUSR2)
    written = Path(f"{os.environ['HELEXA_PROFILE_OUT']}.{cortex}")
    path = Path(f"{out}.{cortex}")
    t0 = time.monotonic()
    while not written.exists() or written.stat().st_size == 0:
        if time.monotonic() - t0 > 60:
            sys.exit(f"{tag}: no profile written at {written}")
        time.sleep(0.2)
    time.sleep(0.5)  # the write finishes
    written.rename(path)
    n = max(res["n"], 1)
    print(f"# {tag}: {res['rps']:.0f} requests/s under the profiler, {n} requests, errors {res['errors']}",
          file=sys.stderr, flush=True)
    return pstats.Stats(str(path)), n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--conc", type=int, default=16)
    ap.add_argument("--dur", type=int, default=5)
    ap.add_argument("--top", type=int, default=40, help="functions listed by calls per request")
    ap.add_argument("--cpus", default="0", help="CPUs of wrk and the fake backend")
    ap.add_argument("--gateway-cpus", default="1")
    ap.add_argument("--src", action="append", default=[],
                    help="another source tree, profiled in the same run (repeatable)")
    ap.add_argument("--no-checkout", action="store_true", help="profile only the --src trees")
    ap.add_argument("--neuron-cpu-policy", default="normal", choices=("normal", "batch"))
    ap.add_argument("--save", help="keep the pstats files in this folder")
    ap.add_argument("--process", default="cortex", choices=("cortex", "neuron"),
                    help="profile the cortex (its steps) or the neuron (its own code counts as 'other helexa code')")
    a = ap.parse_args()
    import gateway_vs_litellm as g

    ns = argparse.Namespace(backend_cpus=a.cpus, gateway_cpus=a.gateway_cpus, be_venv="/tmp/venv-be",
                            litellm_venv="", helexa=str(g.REPO / ".venv" / "bin" / "helexa"),
                            baseline_src=None, cpus=a.cpus, neuron_cpu_policy=a.neuron_cpu_policy)
    hook = Path(tempfile.mkdtemp(prefix="helexa-profile-"))
    (hook / "sitecustomize.py").write_text(_SITECUSTOMIZE)
    if a.save:
        Path(a.save).mkdir(parents=True, exist_ok=True)
    out = str(Path(a.save).resolve() / "cortex") if a.save else str(hook / "cortex")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")]))
    os.environ["HELEXA_PROFILE_OUT"] = out  # the sitecustomize appends the pid: each pair's file is renamed below
    procs = g.Procs(Path(tempfile.mkdtemp(prefix="helexa-profile-run-")))
    results: dict[str, tuple[pstats.Stats, int]] = {}
    try:
        started = g.start_all(ns, procs, ["direct"] + ([] if a.no_checkout else ["helexa-synth"]))
        pairs = {} if a.no_checkout else {"checkout": started["helexa-synth"]}
        for i, src in enumerate(a.src):
            tag = f"src{i}"
            pairs[Path(src).name] = g.start_helexa(ns, procs, started["direct"][0], tag,
                                                   {"HELEXA_SRC": str(Path(src).resolve())})[f"{tag}-synth"]
        for t, (base, model, key, pids) in pairs.items():
            pid = pids[0] if a.process == "cortex" else pids[1]
            results[t] = profile_pair(g, t, base, model, key, pid, f"{out}-{t}", a)
    finally:
        procs.stop_all()
    print(f"Python calls per request in the {a.process}, c={a.conc}, by step of the request path")
    print()
    step_table(results)
    for t, (stats, n) in results.items():
        top_table(t, stats, n, a.top)


if __name__ == "__main__":
    main()
