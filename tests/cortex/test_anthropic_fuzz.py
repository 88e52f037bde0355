"""A short structure-aware fuzz run of the Messages surface (as ``test_gateway_fuzz.py`` does
for OpenAI's): hostile Anthropic bodies and garbage at a real gateway over a neuron double
that refuses what a real backend would. Every answer must be a 2xx, or a 4xx in Anthropic's
error shape, never a 5xx; nothing malformed may reach a neuron; no traceback is logged."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, event, given, settings

from fuzz_anthropic import requests
from test_gateway_fuzz import MODELS, gateway  # noqa: F401  (the fixture)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(requests(MODELS))
def test_no_messages_request_gets_a_server_error_or_reaches_a_neuron_malformed(gateway, request) -> None:  # noqa: F811
    client, neuron, tracebacks = gateway
    path, body = request
    r = client.post(path, content=body, headers={"content-type": "application/json"})
    assert r.status_code < 500, (r.status_code, r.text, body[:500])
    event(f"{path} {r.status_code}")
    if r.status_code >= 400:
        obj = r.json()
        assert obj["type"] == "error" and obj["error"]["type"] and obj["error"]["message"], r.text
    elif r.headers["content-type"].startswith("text/event-stream"):
        assert b"event: error" not in r.content and r.content.endswith(b'data: {"type":"message_stop"}\n\n'), r.text
    else:
        json.loads(r.content)
    assert neuron.refused == [], neuron.refused
    assert not tracebacks.records, [t.getMessage() for t in tracebacks.records]
