"""A process that stops running for a while (``SIGSTOP``, a paused VM, a host swapping) and
resumes: its watchdogs must not blame the other side for the silence they could not see.

Real ``helexa cortex`` and ``helexa neuron`` processes, stopped and continued by signal. A
neuron frozen past its workers' ping deadline killed its healthy worker the moment it resumed
(the worker's answers sat unread in the socket), so the model loaded again; a cortex frozen
past its heartbeat deadline dropped every neuron the moment it resumed (their heartbeats sat
unread) and failed the requests running on them."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import openai
import psutil
import pytest

from procs import ProcGroup

pytestmark = pytest.mark.slow

MODELS = """
[models."synth"]
backend = "synthetic"
memory_mb = 10
[models."synth".config]
metadata = { isolate = true, tokens = 8, tokens_per_second = 0 }
"""


def _worker_pids(neuron_pid: int) -> set[int]:
    pids = set()
    for child in psutil.Process(neuron_pid).children(recursive=True):
        try:
            if "helexa.runtime.worker" in child.cmdline():
                pids.add(child.pid)
        except psutil.NoSuchProcess:
            continue
    return pids


def _ask(client: openai.OpenAI) -> str:
    resp = client.chat.completions.create(model="synth", messages=[{"role": "user", "content": "hi"}], max_tokens=8)
    return resp.choices[0].finish_reason


def test_a_neuron_frozen_past_the_ping_deadline_keeps_its_healthy_worker(tmp_path: Path) -> None:
    with ProcGroup(tmp_path) as procs:
        cortex = procs.cortex(models=MODELS)
        n1 = procs.neuron(cortex, "n1")
        client = openai.OpenAI(base_url=cortex.gateway_url + "/v1", api_key="unused", timeout=30, max_retries=0)
        assert _ask(client) in ("stop", "length")
        cortex.wait_model("n1", "synth")
        workers = _worker_pids(n1.pid)
        assert len(workers) == 1
        n1.signal(signal.SIGSTOP)
        try:
            time.sleep(12.5)  # past the workers' ping_timeout (10 s); the worker keeps running
        finally:
            n1.signal(signal.SIGCONT)
        # The cortex rightly dropped the frozen neuron; it rejoins still holding the model.
        cortex.wait_neuron("n1", timeout=20)
        time.sleep(2.5)  # a few of the worker's pings go by
        assert "did not answer" not in n1.log(), n1.tail()
        assert _worker_pids(n1.pid) == workers  # the same worker process, not a new one
        assert cortex.wait_model("n1", "synth")
        assert _ask(client) in ("stop", "length")
        client.close()


def test_a_cortex_frozen_past_the_heartbeat_deadline_keeps_its_neurons(tmp_path: Path) -> None:
    with ProcGroup(tmp_path) as procs:
        cortex = procs.cortex(models=MODELS)
        neurons = [procs.neuron(cortex, f"n{i}") for i in (1, 2, 3)]
        time.sleep(1.5)
        cortex.signal(signal.SIGSTOP)
        try:
            time.sleep(5.0)  # past 3 missed heartbeats of 1 s; the neurons keep sending them
        finally:
            cortex.signal(signal.SIGCONT)
        time.sleep(3.0)
        assert "missed 3 heartbeats" not in cortex.log(), cortex.tail()
        for n in neurons:
            assert "connection to cortex lost" not in n.log(), n.tail()
            assert cortex.neuron_view(n.node_id)["health"] == "healthy"
