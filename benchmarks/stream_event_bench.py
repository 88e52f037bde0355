#!/usr/bin/env python3
"""What each streamed event costs the cortex and the neuron: CPU and Python calls per stream.

One cortex and one neuron (both on CPU 1, as in ``gateway_vs_litellm.py``, whose start-up
this uses), a closed-loop client at one stream (CPU 0), two synthetic models:

* ``synth``: 64 tokens as fast as the neuron's loop goes; the relay joins them into ~8
  frames, so ~8 SSE events per stream, back to back;
* ``paced``: 32 tokens at 500 tokens/s; each token is its own frame and SSE event (~35
  per stream with the role chunk, the final chunk and ``[DONE]``), and each wakes the
  neuron and the cortex from idle, as a real model's tokens do (they come 2 ms apart here,
  15-20 ms with SmolLM2).

Figures per stream: the client's time to first token and total time, the SSE events, and
the CPU time of the cortex and of the neuron (their threads' ``schedstat``, in ns;
``/proc``'s utime/stime are samples of 10 ms ticks, too coarse for a few hundred streams).
``--baseline-src TREE`` starts a second cortex and neuron from another source tree (a ``git
archive`` of main), measured in the same rounds, interleaved; ``NAME=TREE,NAME=TREE`` more
than one (each commit of a series, say).

``--calls`` runs one more round with ``cProfile`` switched on in every cortex and neuron for
its duration (through a ``sitecustomize`` the benchmark writes and ``SIGUSR1``) and prints
the Python calls per stream of each: a count that does not move with the machine's load.

Usage::

    flock /tmp/helexa-bench.lock /tmp/venv-be/bin/python benchmarks/stream_event_bench.py \\
        [--baseline-src /tmp/base] [--models synth,paced] [--rounds 4] [--dur 5] [--calls]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics as st
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import gateway_vs_litellm as g  # noqa: E402  (the cortex and neuron start-up, the stream client)

PACED = {"paced": {"tokens": 32, "tokens_per_second": 500}}
TOKENS = {"synth": 64, "paced": 32}

_SITECUSTOMIZE = """\
import os, signal
if os.environ.get("HELEXA_BENCH_CPROF"):
    import cProfile
    _p = [None]
    def _toggle(signum, frame):
        if _p[0] is None:
            _p[0] = cProfile.Profile()
            _p[0].enable()
        else:
            _p[0].disable()
            _p[0].create_stats()
            calls = sum(v[1] for v in _p[0].stats.values())
            with open(os.environ["HELEXA_BENCH_CPROF"] + f".{os.getpid()}", "w") as f:
                f.write(str(calls))
            _p[0] = None
    signal.signal(signal.SIGUSR1, _toggle)
"""


def threads_ns(pid: int) -> dict[str, int]:
    """Run time of each of ``pid``'s threads, in ns."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            out[tid] = int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])
        except OSError:  # the thread ended
            pass
    return out


def cpu_ms_since(pid: int, before: dict[str, int]) -> float:
    """CPU ms of ``pid`` since ``before`` (:func:`threads_ns`), thread by thread: a thread
    that ended meanwhile (trio's idle worker threads do, after 10 s) takes only its own
    count away, not the difference between two sums."""
    return sum(ns - before.get(tid, 0) for tid, ns in threads_ns(pid).items()) / 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="synth,paced")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--dur", type=float, default=5, help="seconds per model and tree in a round")
    ap.add_argument("--conc", type=int, default=1, help="streams at a time (1: each event wakes the processes)")
    ap.add_argument("--calls", action="store_true", help="also count Python calls per stream (one more round)")
    ap.add_argument("--baseline-src", help="other source trees, TREE or NAME=TREE,...: their cortex and "
                    "neuron are measured too")
    ap.add_argument("--helexa", default=str(HERE.parent / ".venv" / "bin" / "helexa"))
    ap.add_argument("--be-venv", default="/tmp/venv-be")
    ap.add_argument("--backend-cpus", default="0")
    ap.add_argument("--gateway-cpus", default="1")
    ap.add_argument("--cpus", default="0", help="CPUs of the client")
    a = ap.parse_args()
    models = a.models.split(",")
    work = Path(tempfile.mkdtemp(prefix="stream-event-bench-"))
    if a.calls:
        (work / "site").mkdir()
        (work / "site" / "sitecustomize.py").write_text(_SITECUSTOMIZE)
        os.environ["PYTHONPATH"] = str(work / "site")
        os.environ["HELEXA_BENCH_CPROF"] = str(work / "calls")
    procs = g.Procs(work)
    start = g.start_helexa
    g.start_helexa = lambda *args: start(*args, extra=PACED)  # type: ignore[assignment]
    try:
        baselines = dict(t.split("=", 1) if "=" in t else ("main", t) for t in (a.baseline_src or "").split(",") if t)
        a.baseline_src = None
        tgt = g.start_all(a, procs, ["direct", "helexa-synth"])
        be_url = tgt.pop("direct")[0]
        trees = {"tok": (tgt["helexa-synth"][0], tgt["helexa-synth"][2], tgt["helexa-synth"][3])}
        for name, path in baselines.items():
            base, _, key, pids = start(a, procs, be_url, name, {"HELEXA_SRC": str(Path(path).resolve())},
                                       extra=PACED)[f"{name}-synth"]
            trees[name] = (base, key, pids)
        for base, key, _ in trees.values():
            for m in models:
                g.bench.stream(base, a.conc, 1, m, key, TOKENS[m], a.cpus)  # warm-up, not recorded
        rows: dict[tuple[str, str], list[tuple[float, ...]]] = {}
        for r in range(a.rounds):
            for m in models:
                for tree, (base, key, pids) in trees.items():
                    c0 = [threads_ns(p) for p in pids]
                    res = g.bench.stream(base, a.conc, a.dur, m, key, TOKENS[m], a.cpus)
                    each = [cpu_ms_since(p, c) / max(res["n"], 1) for p, c in zip(pids, c0)]
                    rows.setdefault((m, tree), []).append(
                        (res["ttfc_p50"], res["tot_p50"], res["events"], each[0], each[1]))
                    print(f"# r{r} {m:6s} {tree:5s} n={res['n']} ttft={res['ttfc_p50']:.2f} "
                          f"total={res['tot_p50']:.2f} events={res['events']:.1f} "
                          f"cortex={each[0]:.3f} neuron={each[1]:.3f} ms/stream errors={res['errors']}",
                          file=sys.stderr, flush=True)
        calls: dict[tuple[str, str], tuple[float, float]] = {}
        if a.calls:
            for m in models:
                for tree, (base, key, pids) in trees.items():
                    for p in pids:
                        os.kill(p, signal.SIGUSR1)
                    time.sleep(0.5)
                    res = g.bench.stream(base, a.conc, a.dur, m, key, TOKENS[m], a.cpus)
                    for p in pids:
                        os.kill(p, signal.SIGUSR1)
                    counted = [work / f"calls.{p}" for p in pids]
                    t0 = time.monotonic()
                    while not all(f.exists() for f in counted) and time.monotonic() - t0 < 10:
                        time.sleep(0.1)
                    n = max(res["n"], 1)
                    calls[(m, tree)] = tuple(int(f.read_text()) / n for f in counted)  # type: ignore[assignment]
                    for f in counted:
                        f.unlink()
    finally:
        procs.stop_all()
    print(f"\nMedians of {a.rounds} interleaved rounds, {a.dur:g}s each, {a.conc} stream(s) at a time; cortex and "
          f"neuron on CPU {a.gateway_cpus}, the client on CPU {a.cpus}.\n")
    head = "| model | tree | TTFT p50 ms | total p50 ms | SSE events | cortex CPU ms/stream | neuron CPU ms/stream |"
    if calls:
        head += " cortex Python calls/stream | neuron Python calls/stream |"
    print(head)
    print("|---|---|" + "---:|" * (5 + 2 * bool(calls)))
    for (m, tree), v in rows.items():
        med = [st.median(x[i] for x in v) for i in range(5)]
        line = f"| {m} | {tree} | {med[0]:.2f} | {med[1]:.2f} | {med[2]:.1f} | {med[3]:.3f} | {med[4]:.3f} |"
        if calls:
            line += f" {calls[(m, tree)][0]:.0f} | {calls[(m, tree)][1]:.0f} |"
        print(line)


if __name__ == "__main__":
    main()
