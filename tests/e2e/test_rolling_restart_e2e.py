"""A rolling restart of neurons as docs/operations.md describes it ("Stopping, restarting,
upgrading"): SIGTERM one neuron, start it again, wait until it is healthy, then the next,
under steady load from the official ``openai`` client, with the model pinned on both.

Real ``helexa cortex`` and ``helexa neuron`` processes. No request may fail (the model is
always held by another neuron), and what the cortex shows must be true: a neuron that said it
was going away and stopped holds no model any more (it showed its last report, ``unloading``,
until it was removed 30 s later)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import openai
import pytest

from procs import ProcGroup

pytestmark = pytest.mark.slow

MODELS = """
[models."synth"]
backend = "synthetic"
memory_mb = 10
[models."synth".config]
metadata = { isolate = true, tokens = 12, tokens_per_second = 40 }
"""


class Load:
    """``clients`` threads asking for ``synth``, streamed and not, until stopped."""

    def __init__(self, base_url: str, clients: int = 3) -> None:
        self.ok = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._client = openai.OpenAI(base_url=base_url, api_key="unused", timeout=30, max_retries=0)
        self._threads = [threading.Thread(target=self._run, args=(i,)) for i in range(clients)]
        for t in self._threads:
            t.start()

    def _run(self, i: int) -> None:
        k = 0
        while not self._stop.is_set():
            k += 1
            msgs = [{"role": "user", "content": f"client {i} request {k}"}]
            try:
                if k % 2:
                    finish = None
                    for chunk in self._client.chat.completions.create(model="synth", messages=msgs, max_tokens=12,
                                                                      stream=True):
                        if chunk.choices and chunk.choices[0].finish_reason:
                            finish = chunk.choices[0].finish_reason
                    assert finish is not None, "the stream ended without a finish_reason"
                else:
                    self._client.chat.completions.create(model="synth", messages=msgs, max_tokens=12)
                self.ok += 1
            except Exception as exc:  # every failure is a finding: keep going, report them all
                self.errors.append(f"{type(exc).__name__}: {exc}")

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(60)
        self._client.close()


def test_a_rolling_restart_under_load_fails_nothing_and_a_stopped_neuron_holds_nothing(tmp_path: Path) -> None:
    with ProcGroup(tmp_path) as procs:
        cortex = procs.cortex(models=MODELS)
        neurons = {n: procs.neuron(cortex, n) for n in ("n1", "n2")}
        for n in neurons:
            assert cortex.admin("POST", "/admin/models/synth/pin", json={"neuron": n}).status_code == 200
            cortex.wait_model(n, "synth", timeout=30)
        load = Load(cortex.gateway_url + "/v1")
        try:
            time.sleep(2)
            for name in ("n1", "n2"):
                old = neurons[name]
                old.terminate()
                assert old.popen.wait(30) == 0
                # Gone, said goodbye: listed (until remove_after) but holding nothing.
                def gone(fleet, name=name):  # type: ignore[no-untyped-def]
                    view = next((v for v in fleet["neurons"] if v["node_id"] == name), None)
                    return view is not None and view["health"] != "healthy" and view["models"] == {}

                cortex.wait_for(gone, f"{name} listed with no model after its stop", timeout=5)
                neurons[name] = procs.neuron(cortex, name)
                cortex.wait_model(name, "synth", timeout=30)  # the pin loads it again
                time.sleep(2)
        finally:
            load.stop()
        assert load.errors == []
        assert load.ok > 10
