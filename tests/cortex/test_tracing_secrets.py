"""A trace carries no secret a client put in a path or a model name: traces leave the host
(to an OTLP collector, or printed by the console exporter) and are read by whoever runs
that, so a key pasted into a URL or a ``model`` field is masked there as it is in the logs,
and a megabyte of made-up name is cut. Real sockets, tracing on (the ``spans`` fixture)."""

from __future__ import annotations

import httpx
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from helexa.roles.cortex.fleet import Fleet
from neuron_double import NeuronDouble
from portals import portals
from serving import ADMIN_TOKEN

KEY = "sk-hlx-0123456789abcdef_" + "S" * 43
JOIN_TOKEN = "hlx1." + "J" * 43


async def test_a_key_in_a_path_or_a_model_name_is_masked_in_every_span(spans: InMemorySpanExporter) -> None:
    fleet = Fleet()
    NeuronDouble("n1", fleet, loaded=("chat",))
    async with portals(fleet, {}) as (_, urls):
        async with httpx.AsyncClient(base_url=urls["default"], timeout=30) as http:
            for secret in (KEY, ADMIN_TOKEN, JOIN_TOKEN):
                assert (await http.get("/v1/models/" + secret)).status_code == 404
                assert (await http.get("/nowhere/" + secret)).status_code == 404
                body = {"model": secret, "messages": [{"role": "user", "content": "x"}]}
                assert (await http.post("/v1/chat/completions", json=body)).status_code == 404
            body = {"model": "m" * 1_000_000, "messages": [{"role": "user", "content": "x"}]}
            assert (await http.post("/v1/chat/completions", json=body)).status_code == 404
    finished = spans.get_finished_spans()
    assert {s.name for s in finished} >= {"GET /v1/models/", "GET", "POST /v1/chat/completions",
                                          "orchestrator.decide"}
    for span in finished:
        exported = span.to_json()
        for secret in (KEY, ADMIN_TOKEN, JOIN_TOKEN):
            assert secret not in exported and secret[-20:] not in exported, span.name
        assert len(exported) < 10_000, span.name
    paths = [s.attributes["url.path"] for s in finished if "url.path" in (s.attributes or {})]
    assert "/v1/models/sk-hlx-***" in paths  # the operator still sees what was asked
