#!/usr/bin/env python3
"""The neuron's ``cpu_policy`` A/B on one shared core: one cortex and one neuron, the
neuron's threads switched between ``SCHED_OTHER`` and ``SCHED_BATCH`` (``chrt``) between
rounds, so both sides run in the same processes and only the policy differs.

The cortex and the neuron run on ``--gateway-cpus`` (one CPU: they share it), ``wrk`` and
the fake backend on CPU 0, as in ``gateway_vs_litellm.py`` (whose ``start_all`` starts
them); the model is ``synth`` (the synthetic backend: the fabric alone). Per round and
concurrency it prints requests/s, wrk's p50, each process's CPU per request and its
context switches per request (``/proc/PID/task/*/status``: how often the neuron is woken,
and how often it preempts the cortex), then the medians by policy.

Usage (under the benchmark lock)::

    flock /tmp/helexa-bench.lock /tmp/venv-be/bin/python benchmarks/cpu_policy_ab.py [--conc 1,16] [--rounds 8]

With ``--baseline-src TREE`` the same is measured for another source tree's cortex and
neuron in every round (the trees in alternating order), with ``--policy batch`` (or
``normal``) for both: a before/after of a change on one shared core.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics as st
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gateway_vs_litellm as g  # noqa: E402


def switches(pid: int) -> int:
    """Voluntary and involuntary context switches of all of ``pid``'s threads."""
    n = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        status = open(f"/proc/{pid}/task/{tid}/status").read()
        n += sum(int(x) for x in re.findall(r"^(?:non)?voluntary_ctxt_switches:\s+(\d+)", status, re.M))
    return n


def set_policy(pid: int, batch: bool) -> None:
    for tid in os.listdir(f"/proc/{pid}/task"):
        subprocess.run(["chrt", "-b" if batch else "-o", "-p", "0", tid], check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--conc", default="1,16")
    ap.add_argument("--rounds", type=int, default=8, help="alternating normal, batch, normal, ...")
    ap.add_argument("--dur", type=int, default=4)
    ap.add_argument("--gateway-cpus", default="1")
    ap.add_argument("--cpus", default="0", help="CPUs of wrk and the fake backend")
    ap.add_argument("--policy", default="alternate", choices=("alternate", "normal", "batch"),
                    help="the neuron's policy: switched round by round (the A/B of the policies), or one for all")
    ap.add_argument("--baseline-src", help="another source tree (`git archive OLD | tar -x -C /tmp/old`): its "
                    "cortex and neuron are measured in every round too, the two trees in alternating order")
    a = ap.parse_args()
    ns = argparse.Namespace(backend_cpus=a.cpus, gateway_cpus=a.gateway_cpus, be_venv="/tmp/venv-be", litellm_venv="",
                            helexa=str(g.REPO / ".venv" / "bin" / "helexa"), baseline_src=a.baseline_src, cpus=a.cpus,
                            neuron_cpu_policy="normal")
    procs = g.Procs(Path(tempfile.mkdtemp(prefix="helexa-cpu-policy-")))
    rows: dict[tuple[str, str, int], list[dict]] = {}
    try:
        started = g.start_all(ns, procs, ["direct", "helexa-synth"] + (["base-synth"] if a.baseline_src else []))
        trees = {"checkout": started["helexa-synth"]}
        if a.baseline_src:
            trees["baseline"] = started["base-synth"]
        for base, model, key, _ in trees.values():
            g.bench.wrk(base, 4, 2, model, key, a.cpus)
        for r in range(a.rounds):
            policy = a.policy if a.policy != "alternate" else "batch" if r % 2 else "normal"
            for tree in (list(trees) if r % 2 == 0 else list(trees)[::-1]):
                base, model, key, pids = trees[tree]
                set_policy(pids[1], policy == "batch")
                for c in (int(x) for x in a.conc.split(",")):
                    sw0, cpu0 = [switches(p) for p in pids], [g.bench.cpu_s(p) for p in pids]
                    res = g.bench.wrk(base, c, a.dur, model, key, a.cpus)
                    n = max(res["n"], 1)
                    row = dict(rps=res["rps"], p50=res.get("p50_ms", 0.0),
                               cpu=[(g.bench.cpu_s(p) - x) * 1e3 / n for p, x in zip(pids, cpu0)],
                               sw=[(switches(p) - x) / n for p, x in zip(pids, sw0)])
                    rows.setdefault((tree, policy, c), []).append(row)
                    print(f"# r{r} {tree:8s} {policy:6s} c={c:<3d} {row['rps']:8.1f} requests/s  p50 {row['p50']:.3f} ms"
                          f"  CPU ms/request cortex {row['cpu'][0]:.3f} neuron {row['cpu'][1]:.3f}  switches/request "
                          f"{row['sw'][0]:.2f} / {row['sw'][1]:.2f}", file=sys.stderr, flush=True)
    finally:
        procs.stop_all()
    print("| tree | policy | c | requests/s | p50 ms | CPU ms/request cortex + neuron | context switches/request cortex / neuron |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for (tree, policy, c), v in sorted(rows.items(), key=lambda kv: (kv[0][2], kv[0][1] != "normal", kv[0][0])):
        med = lambda f: st.median(f(x) for x in v)  # noqa: E731
        print(f"| {tree} | {policy} | {c} | {med(lambda x: x['rps']):,.0f} | {med(lambda x: x['p50']):.3f} | "
              f"{med(lambda x: x['cpu'][0]):.3f} + {med(lambda x: x['cpu'][1]):.3f} | "
              f"{med(lambda x: x['sw'][0]):.2f} / {med(lambda x: x['sw'][1]):.2f} |")


if __name__ == "__main__":
    main()
