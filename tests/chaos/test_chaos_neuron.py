"""A neuron frozen with SIGSTOP, and a cortex killed with SIGKILL under load, between real
``helexa cortex`` / ``helexa neuron`` processes and the official ``openai`` client.

The model is ``synthetic`` (fixed tokens at a fixed rate), kept warm, and may run on either
of two neurons: one holds it; when that one fails, the cortex loads it on the other."""

from __future__ import annotations

import signal
import threading
import time

import openai
import pytest

from procs import Cortex, ProcGroup, wait_until

pytestmark = pytest.mark.slow

MODELS = """
[models."steady"]
backend = "synthetic"
pinned_on = ["n1", "n2"]
keep_warm = true
[models."steady".config]
metadata = { tokens = 300, tokens_per_second = 100 }
"""
ASK = [{"role": "user", "content": "go"}]


def openai_client(cortex: Cortex, timeout: float = 30) -> openai.OpenAI:
    return openai.OpenAI(base_url=cortex.gateway_url + "/v1", api_key="unused", timeout=timeout, max_retries=0)


def loaded_on(cortex: Cortex, model: str) -> set[str]:
    return {n["node_id"] for n in cortex.fleet()["neurons"]
            if n["health"] == "healthy" and n["models"].get(model, {}).get("state") == "loaded"}


def stream_on(client: openai.OpenAI, out: dict) -> None:
    """One streamed answer; ``out`` gets its tokens, its error and when it ended."""
    out["chunks"] = 0
    try:
        for chunk in client.chat.completions.create(model="steady", messages=ASK, stream=True, max_tokens=300):
            out["chunks"] += 1
            out.setdefault("neuron", getattr(chunk, "system_fingerprint", None))
        out["error"] = None
    except openai.APIError as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
    out["ended"] = time.monotonic()


def load(client: openai.OpenAI, stop: threading.Event, results: list[str | None]) -> None:
    """Short requests back to back until ``stop``; each result: None (ok) or the error."""
    while not stop.is_set():
        try:
            client.chat.completions.create(model="steady", messages=ASK, max_tokens=5)
            results.append(None)
        except openai.APIError as exc:
            results.append(f"{type(exc).__name__}: {exc}")


@pytest.fixture
def fleet(tmp_path):
    with ProcGroup(tmp_path) as procs:
        cortex = procs.cortex(models=MODELS)
        n1 = procs.neuron(cortex, "n1")
        n2 = procs.neuron(cortex, "n2")
        (holder,) = wait_until(lambda: loaded_on(cortex, "steady"), 30, "steady loaded", proc=cortex)
        yield (procs, cortex, n1, n2) if holder == "n1" else (procs, cortex, n2, n1)


def test_a_frozen_neuron_is_marked_unhealthy_its_requests_fail_over_and_it_rejoins(fleet, figure) -> None:
    procs, cortex, n1, n2 = fleet  # n1 holds the model
    client = openai_client(cortex)
    # Long streams on n1, then freeze it.
    streams = [{} for _ in range(4)]
    threads = [threading.Thread(target=stream_on, args=(client, s)) for s in streams]
    for t in threads:
        t.start()
    time.sleep(0.5)
    stop, results = threading.Event(), []
    loader = threading.Thread(target=load, args=(client, stop, results))
    loader.start()
    time.sleep(0.3)
    n1.signal(signal.SIGSTOP)
    frozen = time.monotonic()
    wait_until(lambda: cortex.neuron_view(n1.node_id)["health"] != "healthy", 15, "n1 marked unhealthy",
               proc=cortex)
    detect = time.monotonic() - frozen
    for t in threads:
        t.join(timeout=30)
    failed_streams = [s for s in streams if s["error"]]
    time.sleep(2.0)  # requests keep coming while n1 is frozen: they go to n2
    during = len(results)
    n1.signal(signal.SIGCONT)
    thawed = time.monotonic()
    wait_until(lambda: cortex.neuron_view(n1.node_id)["health"] == "healthy", 30, "n1 healthy again", proc=cortex)
    recover = time.monotonic() - thawed
    time.sleep(0.5)
    stop.set()
    loader.join(timeout=30)
    lost = [r for r in results if r is not None]
    figure("frozen neuron: time to detect (SIGSTOP to unhealthy)", detect, "s")
    figure("frozen neuron: streams in flight that ended in an error (of 4)", len(failed_streams))
    figure("frozen neuron: stream end after the freeze (slowest)",
           max((s["ended"] - frozen for s in failed_streams), default=0.0), "s")
    figure("frozen neuron: short requests during the freeze, ok / failed", f"{during - len(lost)} / {len(lost)}")
    figure("frozen neuron: time to recover (SIGCONT to healthy)", recover, "s")
    assert detect < 5  # 3 missed 1 s heartbeats, checked every 0.5 s
    assert all(s["ended"] - frozen < 10 for s in failed_streams)  # an error, not a hang
    assert len(lost) <= 1, lost  # at most the one request already on n1 when it froze
    assert recover < 20
    assert n2.node_id in loaded_on(cortex, "steady")  # it failed over by a load on the other neuron


def test_a_cortex_killed_under_load_gives_errors_not_hangs_and_neurons_rejoin_without_reloading(
        fleet, figure) -> None:
    procs, cortex, n1, n2 = fleet
    client = openai_client(cortex, timeout=20)
    streams = [{} for _ in range(3)]
    threads = [threading.Thread(target=stream_on, args=(client, s)) for s in streams]
    stop, results = threading.Event(), []
    loader = threading.Thread(target=load, args=(client, stop, results))
    for t in (*threads, loader):
        t.start()
    time.sleep(1.0)
    cortex.kill()
    killed = time.monotonic()
    for t in threads:
        t.join(timeout=30)
    stop.set()
    loader.join(timeout=30)
    assert all(not t.is_alive() for t in (*threads, loader)), "a client hung after the cortex died"
    errors_by = max(s["ended"] for s in streams) - killed
    assert all(s["error"] for s in streams)
    # The same data directory, so the same join token: the neurons redial it.
    control = cortex.control_url.rsplit(":", 1)[1]
    restarted = procs.cortex(name="cortex", data_dir=cortex.data_dir, models=MODELS,
                             extra_args=["--control-socket", f"127.0.0.1:{control}"])
    t0 = time.monotonic()
    wait_until(lambda: {n["node_id"] for n in restarted.fleet()["neurons"] if n["health"] == "healthy"}
               == {"n1", "n2"} and loaded_on(restarted, "steady"), 60, "both neurons back, the model loaded",
               proc=restarted)
    rejoin = time.monotonic() - t0
    answer = openai_client(restarted).chat.completions.create(model="steady", messages=ASK, max_tokens=5)
    assert answer.choices[0].message.content
    figure("cortex kill -9: slowest client error after the kill", errors_by, "s")
    figure("cortex kill -9: streams ended with an error / hung", f"{len(streams)} / 0")
    figure("cortex kill -9: time for both neurons to rejoin the restarted cortex", rejoin, "s")
    assert errors_by < 5
    assert all(n.alive for n in (n1, n2))
    # The neuron that held the model reported it when it rejoined; nothing was loaded again.
    assert f"neuron {n1.node_id} joined" in restarted.log() and "(1 models reported)" in restarted.log()
    assert "loaded steady" not in restarted.log(), "a model was reloaded after the rejoin"
