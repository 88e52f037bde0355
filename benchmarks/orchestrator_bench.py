"""The orchestrator's policies against real processes (a cortex and its neurons, as a user
starts them), each A/B interleaved in rounds on fresh processes:

    flock /tmp/helexa-bench.lock .venv/bin/python benchmarks/orchestrator_bench.py [--part cache|swap|swap-replay|all]
        [--rounds 2] [--conversations 4] [--turns 4] [--think 2] [--no-slot-affinity] [--cache-max-skew N]
        [--requests 60]

``cache``: multi-turn conversations over two neurons with real SmolLM2 (a long system
prompt every conversation shares, a document of its own, short questions; users start
``--think`` seconds apart and read each answer for about as long before the next turn), routed
cache-aware (``routing = "cache"``) against least-busy (``routing = "least_busy"``): time
to first token, p50 and p90, over every turn and over the follow-up turns alone.

``swap``: a burst of requests for three ``synthetic`` models (a pretend 2 s load each;
memory for two of them at a time), popularity 50/30/20 %, under each eviction policy
(``cost`` with its default holds, ``lru``, ``fifo``): loads, latency p50/p99 from arrival
to answer, and requests answered within a deadline.

``swap-replay``: the same workload on trio's virtual clock, through the cortex's own
orchestrator over a neuron double (no processes, no noise from a shared machine:
deterministic figures for the policies' decisions alone; ``--rounds 8`` takes seconds).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "e2e"))
sys.path.insert(1, str(Path(__file__).resolve().parents[1] / "tests" / "cortex"))  # swap-replay's neuron double
from procs import Cortex, ProcGroup  # noqa: E402

CHAT = "smollm2-135m-instruct"
CLIENT = httpx.Client(timeout=600)

# --- (a) cache-aware routing -----------------------------------------------------------------



def cache_models(slot_affinity: bool) -> str:
    return f"""
[models."{CHAT}"]
backend = "llama_cpp"
memory_mb = 300
max_context = 4096
[models."{CHAT}".config]
metadata = {{ n_ctx = 8192, n_parallel = 2, slot_affinity = {str(slot_affinity).lower()} }}
"""


SYSTEM = ("You are the archivist of a small museum. Answer visitors' questions about the documents they "
          "bring, briefly and exactly, quoting figures from the document when asked. " +
          " ".join(f"Rule {i}: when a visitor mentions item {i}, give its catalogue number {1000 + i} and the room "
                   f"where it is shown, room {i % 7}." for i in range(24)))
QUESTIONS = ["What is the first fact?", "And the second one?", "Which fact mentions the largest number?",
             "Summarise the document in five words.", "What is the last fact?", "Any fact about the colour blue?"]


def document(k: int) -> str:
    rng = random.Random(k)
    facts = [f"Fact {i}: the {rng.choice(['red', 'blue', 'green', 'grey'])} box number {rng.randint(1, 999)} "
             f"weighs {rng.randint(1, 90)} kilograms." for i in range(18)]
    return f"Document {k} of the visitor. " + " ".join(facts)


def stream_ttft(url: str, messages: list[dict]) -> tuple[float, str]:
    """Time to the first content chunk of a streamed chat, and the whole answer."""
    body = {"model": CHAT, "messages": messages, "max_tokens": 16, "temperature": 0, "stream": True}
    start = time.monotonic()
    first: float | None = None
    parts: list[str] = []
    with CLIENT.stream("POST", url + "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            delta = json.loads(line[6:])["choices"][0]["delta"] if json.loads(line[6:])["choices"] else {}
            if delta.get("content"):
                if first is None:
                    first = time.monotonic() - start
                parts.append(delta["content"])
    return (first if first is not None else time.monotonic() - start), "".join(parts)


def conversation(url: str, k: int, turns: int, think: float, out: list[tuple[int, float]]) -> None:
    """One user: a first question about their document, then follow-ups, each after reading
    the answer for ``think`` seconds on average (0: at once). Users start ``think`` apart."""
    rng = random.Random(1000 + k)
    time.sleep(k * think)
    messages = [{"role": "system", "content": SYSTEM},
                {"role": "user", "content": document(k) + " " + QUESTIONS[0]}]
    for turn in range(turns):
        if turn and think:
            time.sleep(rng.uniform(0.5, 1.5) * think)
        ttft, answer = stream_ttft(url, messages)
        out.append((turn, ttft))
        messages += [{"role": "assistant", "content": answer},
                     {"role": "user", "content": QUESTIONS[(turn + 1) % len(QUESTIONS)]}]


def loaded_on(cortex: Cortex, model: str) -> list[str]:
    return [n["node_id"] for n in cortex.fleet()["neurons"]
            if n["models"].get(model, {}).get("state") == "loaded"]


def cache_arm(routing: str, work: Path, conversations: int, turns: int, think: float,
              slot_affinity: bool, max_skew: int | None = None) -> list[tuple[int, float]]:
    skew = "" if max_skew is None else f"cache_max_skew = {max_skew}\n"
    with ProcGroup(work) as procs:
        cortex = procs.cortex(models=cache_models(slot_affinity),
                              config=f'[orchestrator]\nrouting = "{routing}"\n{skew}')
        for n in ("n1", "n2"):
            procs.neuron(cortex, n)
        # Three at once on two slots: the third waits, and the queue copies the model to n2.
        with ThreadPoolExecutor(3) as pool:
            list(pool.map(lambda i: stream_ttft(cortex.gateway_url, [{"role": "user", "content": f"Hi {i}"}]),
                          range(3)))
        cortex.wait_for(lambda f: len(loaded_on(cortex, CHAT)) == 2, "the model on both neurons", timeout=120)
        out: list[tuple[int, float]] = []
        threads = [threading.Thread(target=conversation, args=(cortex.gateway_url, k, turns, think, out))
                   for k in range(conversations)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        hits = _metric_sum(cortex, r'helexa_prefix_blocks_total\{kind="hit"[^}]*\} (\S+)')
        total = hits + _metric_sum(cortex, r'helexa_prefix_blocks_total\{kind="miss"[^}]*\} (\S+)')
        per_neuron = {n: _metric_sum(cortex, r'helexa_requests_total\{[^}]*neuron="' + n + r'"[^}]*\} (\S+)')
                      for n in ("n1", "n2")}
        print(f"    {routing}: requests per neuron {per_neuron}" + (
            f"; the cortex routed {hits:.0f}/{total:.0f} prompt blocks to a neuron holding them" if total else ""))
        return out


def part_cache(rounds: int, conversations: int, turns: int, think: float, slot_affinity: bool,
               max_skew: int | None = None) -> None:
    print(f"(a) {conversations} conversations x {turns} turns over two neurons, SmolLM2, think time "
          f"{think:g} s, slot affinity {'on' if slot_affinity else 'off'}, cache_max_skew "
          f"{2 if max_skew is None else max_skew}; TTFT in seconds; load average {_load()}")
    results: dict[str, list[tuple[int, float]]] = {"cache": [], "least_busy": []}
    for r in range(rounds):
        for routing in (("cache", "least_busy") if r % 2 == 0 else ("least_busy", "cache")):
            with tempfile.TemporaryDirectory(prefix="orch-bench-") as tmp:
                got = cache_arm(routing, Path(tmp), conversations, turns, think, slot_affinity, max_skew)
            results[routing] += got
            print(f"  round {r + 1} {routing:10s}: p50 {_p(got, 50):6.2f}  follow-ups p50 "
                  f"{_p([x for x in got if x[0] > 0], 50):6.2f}  (load average {_load()})")
    print("\n| routing | requests | TTFT p50 | TTFT p90 | follow-up turns p50 | follow-up p90 |")
    print("|---|---|---|---|---|---|")
    for routing, got in results.items():
        follow = [x for x in got if x[0] > 0]
        print(f"| {routing} | {len(got)} | {_p(got, 50):.2f} s | {_p(got, 90):.2f} s | {_p(follow, 50):.2f} s | "
              f"{_p(follow, 90):.2f} s |")
    ratio = _p(results["least_busy"], 50) / max(1e-9, _p(results["cache"], 50))
    print(f"\nTTFT p50 least-busy / cache-aware: {ratio:.2f}x")


# --- (b) swaps -------------------------------------------------------------------------------

def swap_models(load_seconds: float) -> str:
    share = int(psutil.virtual_memory().total / 2**20 * 0.4)  # two fit (with 90 % headroom), three do not
    return "\n".join(f"""
[models."{m}"]
backend = "synthetic"
memory_mb = {share}
[models."{m}".config]
metadata = {{ tokens = 16, tokens_per_second = 32, load_seconds = {load_seconds}, n_parallel = 2 }}
""" for m in ("A", "B", "C"))


def burst(requests: int, seconds: float, seed: int) -> list[tuple[float, str]]:
    """Arrivals uniform over ``seconds``; exactly 50/30/20 % of them for A, B and C, in a
    random order (drawing each request's model instead gave B more requests than A in the
    first two rounds)."""
    rng = random.Random(seed)
    arrivals = sorted(rng.uniform(0, seconds) for _ in range(requests))
    models = [m for m, share in zip("ABC", (50, 30, 20)) for _ in range(round(requests * share / 100))]
    models += ["A"] * (requests - len(models))
    rng.shuffle(models)
    return list(zip(arrivals, models))


def swap_arm(policy: str, work: Path, plan: list[tuple[float, str]], load_seconds: float,
             deadline: float) -> tuple[int, list[float | None]]:
    # The cost policy's defaults: residency and drain held at most one measured load time.
    config = f'[orchestrator]\nswap_policy = "{policy}"\nqueue_timeout = 120\n'

    with ProcGroup(work) as procs:
        cortex = procs.cortex(models=swap_models(load_seconds), config=config)
        procs.neuron(cortex, "n1")
        latencies: list[float | None] = [None] * len(plan)
        start = time.monotonic() + 0.5

        def one(i: int) -> None:
            at, model = plan[i]
            time.sleep(max(0.0, start + at - time.monotonic()))
            body = {"model": model, "messages": [{"role": "user", "content": f"request {i}"}], "stream": False}
            r = CLIENT.post(cortex.gateway_url + "/v1/chat/completions", json=body)
            if r.status_code == 200:
                latencies[i] = time.monotonic() - (start + at)

        with ThreadPoolExecutor(len(plan)) as pool:
            list(pool.map(one, range(len(plan))))
        loads = int(_metric_sum(cortex, r"helexa_cold_loads_total\{[^}]*\} (\S+)"))
        return loads, latencies


def replay_arm(policy: str, work: Path, plan: list[tuple[float, str]], load_seconds: float,
               deadline: float) -> tuple[int, list[float | None]]:
    """:func:`swap_arm` on trio's virtual clock: the cortex's real orchestrator over a
    neuron double (``tests/cortex/neuron_double.py``) that answers and loads as the
    synthetic backend does, so the policies' decisions alone set the figures."""
    import trio
    import trio.testing
    from helexa.protocol import GenerateRequest, SamplingParams, Task
    from helexa.roles.cortex.catalogue import Catalogue, CatalogueEntry
    from helexa.roles.cortex.fleet import Fleet
    from helexa.roles.cortex.orchestrator import Orchestrator
    from neuron_double import NeuronDouble, hardware
    from serving import cortex_config

    catalogue = Catalogue([CatalogueEntry(id=m, backend="synthetic", memory_mb=4000,
                                          config={"metadata": {"n_parallel": 2}}) for m in "ABC"])
    config = cortex_config(orchestrator={"swap_policy": policy, "queue_timeout": 120})  # two fit in 90 % of 10 GB
    latencies: list[float | None] = [None] * len(plan)

    async def main() -> int:
        fleet = Fleet()
        neuron = NeuronDouble("n1", fleet, hw=hardware(ram_gb=10), tokens=16, token_delay=1 / 32,
                              load_delay=load_seconds)
        orch = Orchestrator(config, fleet, catalogue)

        async def one(i: int) -> None:
            at, model = plan[i]
            await trio.sleep_until(start + at)
            request = GenerateRequest(f"r{i}", model, Task.CHAT, sampling=SamplingParams(),
                                      messages=({"role": "user", "content": f"request {i}"},))
            async with orch.generate(request) as gen:
                async for _ in gen:
                    pass
            latencies[i] = trio.current_time() - (start + at)

        async with trio.open_nursery() as nursery:
            await nursery.start(orch.run)
            start = trio.current_time() + 0.5
            async with trio.open_nursery() as clients:
                for i in range(len(plan)):
                    clients.start_soon(one, i)
            nursery.cancel_scope.cancel()
        return len(neuron.loads())

    return trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0)), latencies


def part_swap(rounds: int, requests: int, load_seconds: float = 2.0, deadline: float = 30.0,
              replay: bool = False) -> None:
    print(f"(b) {requests} requests over 15 s for three synthetic models (load {load_seconds:g} s, two fit), "
          f"deadline {deadline:g} s" + (", replayed on virtual time" if replay else f"; load average {_load()}"))
    results: dict[str, list] = {"cost": [], "lru": [], "fifo": []}
    loads: dict[str, list[int]] = {p: [] for p in results}
    for r in range(rounds):
        plan = burst(requests, 15.0, seed=r)
        order = list(results)[r % 3:] + list(results)[:r % 3]
        for policy in order:
            with tempfile.TemporaryDirectory(prefix="orch-bench-") as tmp:
                n, got = (replay_arm if replay else swap_arm)(policy, Path(tmp), plan, load_seconds, deadline)
            loads[policy].append(n)
            results[policy] += got
            done = [x for x in got if x is not None]
            print(f"  round {r + 1} {policy:5s}: loads {n:3d}  p50 {_q(done, 50):6.2f}  p99 {_q(done, 99):6.2f}  "
                  f"within {deadline:g} s {sum(1 for x in done if x <= deadline)}/{len(got)}")
    print("\n| policy | loads (per round) | latency p50 | p90 | p99 | mean | answered within the deadline |")
    print("|---|---|---|---|---|---|---|")
    for policy, got in results.items():
        done = [x for x in got if x is not None]
        within = sum(1 for x in done if x <= deadline)
        print(f"| {policy} | {statistics.mean(loads[policy]):.2f} ({', '.join(map(str, loads[policy]))}) | "
              f"{_q(done, 50):.2f} s | {_q(done, 90):.2f} s | {_q(done, 99):.2f} s | {statistics.mean(done):.2f} s | "
              f"{within}/{len(got)} |")
    if not replay:
        print(f"load average {_load()}")


# --- helpers -----------------------------------------------------------------------------------

def _load() -> str:
    return " ".join(f"{x:.1f}" for x in psutil.getloadavg())


def _metric_sum(cortex: Cortex, pattern: str) -> float:
    return sum(float(v) for v in re.findall(pattern, cortex.admin("GET", "/metrics").text))  # behind the admin token


def _q(values: list[float], pct: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(pct / 100 * len(ordered) + 0.5) - 1))]


def _p(pairs: list[tuple[int, float]], pct: float) -> float:
    return _q([t for _, t in pairs], pct)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("cache", "swap", "swap-replay", "all"), default="all")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--conversations", type=int, default=4)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--requests", type=int, default=60)
    ap.add_argument("--think", type=float, default=2.0,
                    help="(a) mean seconds a user reads an answer before the next turn (0: closed loop)")
    ap.add_argument("--cache-max-skew", type=int, default=None,
                    help="(a) the cache-aware arm's cache_max_skew (default: the config's, 2); 0: a neuron "
                         "holding the prefix only when it is as idle as the least busy one")
    ap.add_argument("--no-slot-affinity", action="store_true",
                    help="(a) let llama.cpp choose each request's slot (the neurons' behaviour before slot affinity)")
    args = ap.parse_args()
    if args.part in ("cache", "all"):
        part_cache(args.rounds, args.conversations, args.turns, args.think, not args.no_slot_affinity,
                   args.cache_max_skew)
    if args.part in ("swap", "all"):
        part_swap(args.rounds, args.requests)
    if args.part == "swap-replay":
        part_swap(args.rounds, args.requests, replay=True)


if __name__ == "__main__":
    main()
