"""A neuron removed from the fleet leaves nothing behind in the cortex.

Fleets whose neurons come and go under new node ids (containers, autoscaled machines, a
``--node-id $(hostname)`` pod) used to keep, for every neuron that ever joined, its load
records, its residency and provisioning records and ~170 series in ``/metrics`` (found by
a 15-minute soak: 8 neuron restarts, 8 × 172 lines in every scrape, for good). Here real
neurons join a real cortex one after the other under new ids, each serves a request (a
cold load on it) and leaves; once each is removed, nothing of it is kept."""

from __future__ import annotations

from pathlib import Path

import httpx
import trio

from helexa.roles.cortex.config import CortexConfig
from helexa.roles.cortex.node import Cortex
from helexa.roles.neuron.agent import Neuron
from helexa.roles.neuron.config import NeuronConfig


async def test_neurons_that_left_leave_no_state_and_no_metrics_series(tmp_path: Path) -> None:
    models = tmp_path / "models.toml"
    models.write_text('[models.synth]\nbackend = "synthetic"\nmemory_mb = 10\n'
                      '[models.synth.config]\nmetadata = { tokens = 3 }\n')
    config = CortexConfig(data_dir=tmp_path / "cortex", control_socket="127.0.0.1:0", gateway_socket="127.0.0.1:0",
                          usage_store=":memory:", models_file=models, heartbeat_interval=0.2, remove_after=0.2)
    cortex = Cortex(config)
    orchestrator = cortex.orchestrator
    async with trio.open_nursery() as nursery:
        addrs = await nursery.start(cortex.run)
        token = (tmp_path / "cortex" / "join-token").read_text().strip()
        async with httpx.AsyncClient(base_url=addrs.gateway_url, timeout=30) as http:
            for i in range(5):
                node_id = f"pod-{i}"
                neuron = Neuron(NeuronConfig(cortex=addrs.control_url, node_id=node_id, join_token=token,
                                             data_dir=tmp_path / node_id))
                scope = trio.CancelScope()
                nursery.start_soon(_run, neuron, scope)
                with trio.fail_after(20):
                    while not cortex.fleet.usable():
                        await trio.sleep(0.05)
                    r = await http.post("/v1/chat/completions", json={
                        "model": "synth", "messages": [{"role": "user", "content": "x"}]})
                    assert r.status_code == 200, r.text
                    assert f'neuron="{node_id}"' in orchestrator.metrics.render().decode()
                scope.cancel()
                with trio.fail_after(20):
                    while node_id in cortex.fleet or (node_id, "synth") in orchestrator.provisioner.loaded_at:
                        await trio.sleep(0.05)
        metrics = orchestrator.metrics.render().decode()
        cortex.stop()
        nursery.cancel_scope.cancel()
    assert "pod-" not in metrics
    assert not orchestrator.metrics._children
    assert not orchestrator.live.nodes and not orchestrator.live.last_used and not orchestrator.live.model_in_flight
    assert not orchestrator.provisioner.loaded_at and not orchestrator.provisioner.provisioned


async def _run(neuron: Neuron, scope: trio.CancelScope) -> None:
    with scope:
        await neuron.run()


async def test_a_request_waiting_for_a_load_on_a_neuron_that_dies_is_told_the_neuron_left(tmp_path: Path) -> None:
    """Its only neuron dies mid-load: the request's 503 says the neuron left (no_capacity,
    Retry-After), not that the model could not be loaded (nothing is wrong with the model,
    and the operator was told nothing of it)."""
    models = tmp_path / "models.toml"
    models.write_text('[models.synth]\nbackend = "synthetic"\nmemory_mb = 10\n'
                      '[models.synth.config]\nmetadata = { tokens = 3, load_seconds = 30 }\n')
    config = CortexConfig(data_dir=tmp_path / "cortex", control_socket="127.0.0.1:0", gateway_socket="127.0.0.1:0",
                          usage_store=":memory:", models_file=models, heartbeat_interval=0.2)
    cortex = Cortex(config)
    async with trio.open_nursery() as nursery:
        addrs = await nursery.start(cortex.run)
        token = (tmp_path / "cortex" / "join-token").read_text().strip()
        neuron = Neuron(NeuronConfig(cortex=addrs.control_url, node_id="only", join_token=token,
                                     data_dir=tmp_path / "only"))
        scope = trio.CancelScope()
        nursery.start_soon(_run, neuron, scope)
        async with httpx.AsyncClient(base_url=addrs.gateway_url, timeout=30) as http:
            with trio.fail_after(20):
                while not cortex.fleet.usable():
                    await trio.sleep(0.05)
                answers = []

                async def ask() -> None:
                    answers.append(await http.post("/v1/chat/completions", json={
                        "model": "synth", "messages": [{"role": "user", "content": "x"}]}))

                async with trio.open_nursery() as requests:
                    requests.start_soon(ask)
                    while not cortex.orchestrator.provisioner.loading("synth"):
                        await trio.sleep(0.05)
                    await trio.sleep(0.3)
                    scope.cancel()  # the neuron dies mid-load
        cortex.stop()
        nursery.cancel_scope.cancel()
    [r] = answers
    assert r.status_code == 503 and "retry-after" in r.headers, r.text
    error = r.json()["error"]
    assert error["code"] == "no_capacity" and "could not be loaded" not in error["message"], error
    assert "left" in error["message"], error
    assert cortex.orchestrator.provisioner.backoff.view("synth", trio.current_time()) == {}  # not the model's fault
