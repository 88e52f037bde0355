"""OpenTelemetry traces across the path, with an in-memory exporter: a real cortex and a
real neuron agent in this process (websocket control plane, synthetic backend), then two
operators over the in-memory mesh. Every span of one request shares its trace id, and each
hop's span is the child of the hop before it (the context rides in the request frame)."""

from __future__ import annotations

from pathlib import Path

import httpx
import trio
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from helexa import telemetry
from helexa.roles.cortex.config import CortexConfig
from helexa.roles.cortex.node import Cortex
from helexa.roles.cortex.portal.store import SqliteStore
from helexa.roles.neuron.agent import Neuron
from helexa.roles.neuron.config import NeuronConfig
from portals import bearer, new_key
from test_portal_federation import CHAT, keyed, two_operators

CLIENT_TRACE = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
"""A client's own span, sent as the ``traceparent`` header (the W3C spec's example)."""


def by_name(exporter: InMemorySpanExporter) -> dict[str, list]:
    out: dict[str, list] = {}
    for span in exporter.get_finished_spans():
        out.setdefault(span.name, []).append(span)
    return out


async def test_one_trace_runs_from_the_gateway_through_the_orchestrator_to_the_neuron(
        tmp_path: Path, spans: InMemorySpanExporter) -> None:
    models = tmp_path / "models.toml"
    models.write_text('[models.synth]\nbackend = "synthetic"\nmemory_mb = 10\n'
                      '[models.synth.config]\nmetadata = { tokens = 3 }\n')
    config = CortexConfig(data_dir=tmp_path / "cortex", control_socket="127.0.0.1:0", gateway_socket="127.0.0.1:0",
                          usage_store=":memory:", models_file=models)
    cortex = Cortex(config)
    async with trio.open_nursery() as nursery:
        addrs = await nursery.start(cortex.run)
        token = (tmp_path / "cortex" / "join-token").read_text().strip()
        neuron = Neuron(NeuronConfig(cortex=addrs.control_url, node_id="n1", join_token=token,
                                     data_dir=tmp_path / "n1"))
        nursery.start_soon(neuron.run)
        with trio.fail_after(10):
            while not cortex.fleet.usable():
                await trio.sleep(0.05)
        async with httpx.AsyncClient(base_url=addrs.gateway_url, timeout=30) as http:
            r = await http.post("/v1/chat/completions", headers={"traceparent": CLIENT_TRACE}, json={
                "model": "synth", "stream": True, "messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 200, r.text
        cortex.stop()
        nursery.cancel_scope.cancel()
    named = by_name(spans)
    (gateway,) = named["POST /v1/chat/completions"]
    (cold,) = named["orchestrator.cold_load"]
    dispatches = named["dispatch"]
    (served,) = named["neuron.generate"]
    trace_id = int(CLIENT_TRACE.split("-")[1], 16)
    assert {s.context.trace_id for s in (gateway, cold, *dispatches, served)} == {trace_id}
    assert gateway.parent.span_id == int(CLIENT_TRACE.split("-")[2], 16)
    assert cold.parent.span_id == gateway.context.span_id
    assert all(d.parent.span_id == gateway.context.span_id for d in dispatches)
    assert served.parent.span_id == dispatches[-1].context.span_id
    assert dispatches[-1].attributes["helexa.neuron"] == "n1"
    assert served.attributes["helexa.model"] == "synth"
    assert [e.name for e in served.events] == ["first_output"]
    # Its wait on the neuron before the backend started (the synthetic backend has no queue).
    (queued,) = named["neuron.queue"]
    assert queued.parent.span_id == served.context.span_id and queued.context.trace_id == trace_id
    assert queued.attributes["helexa.queue.ended_by"] == "backend_start"
    assert queued.attributes["helexa.queue.busy_at_entry"] == 0 and queued.attributes["helexa.model"] == "synth"
    assert "helexa.queue.slots" not in queued.attributes
    assert any(s.attributes["helexa.decision"] == "cold_load" for s in named["orchestrator.decide"])
    # The cold load it waited for: the provisioner's load command, and the neuron carrying it out.
    (load,) = named["provisioner.load"]
    (loaded,) = named["neuron.load"]
    assert load.parent.span_id == cold.context.span_id and loaded.parent.span_id == load.context.span_id
    assert load.context.trace_id == loaded.context.trace_id == trace_id
    assert [e.name for e in loaded.events] == ["load"]


async def test_a_federated_request_is_one_trace_across_both_cortexes_to_the_peers_neuron(
        spans: InMemorySpanExporter) -> None:
    store = SqliteStore(":memory:")
    key = new_key(store, "acme")
    async with two_operators({"acme": keyed()}, store) as (urls, fed_a, fed_b, neuron):
        async with httpx.AsyncClient(base_url=urls["acme"], headers=bearer(key)) as http:
            r = await http.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 200
    named = by_name(spans)
    (gateway,) = named["POST /v1/chat/completions"]
    a_dispatch, b_dispatch = sorted(named["dispatch"], key=lambda s: s.start_time)
    (served,) = named["federation.serve"]
    assert {s.context.trace_id for s in (gateway, a_dispatch, served, b_dispatch)} == {gateway.context.trace_id}
    assert a_dispatch.parent.span_id == gateway.context.span_id  # A sends to the peer...
    assert served.parent.span_id == a_dispatch.context.span_id  # ...B serves it under A's span...
    assert b_dispatch.parent.span_id == served.context.span_id  # ...and dispatches to its neuron
    assert b_dispatch.attributes["helexa.neuron"] == "b1"
    assert served.attributes["helexa.operator"] == "A"
    # The neuron's frame carries B's dispatch span as its parent.
    (arrived,) = neuron.requests
    assert arrived.trace.split("-")[1:3] == [f"{gateway.context.trace_id:032x}", f"{b_dispatch.context.span_id:016x}"]


async def test_with_tracing_off_nothing_travels(tmp_path: Path) -> None:
    store = SqliteStore(":memory:")
    key = new_key(store, "acme")
    assert not telemetry.enabled()
    async with two_operators({"acme": keyed()}, store) as (urls, fed_a, fed_b, neuron):
        async with httpx.AsyncClient(base_url=urls["acme"], headers=bearer(key)) as http:
            r = await http.post("/v1/chat/completions", json=CHAT, headers={"traceparent": CLIENT_TRACE})
    assert r.status_code == 200
    assert neuron.requests[0].trace == ""
