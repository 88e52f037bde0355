"""A short structure-aware fuzz run at the gateway (the long one: ``scripts/fuzz_gateway.py``).

A few hundred generated requests (OpenAI's shapes with hostile values, and garbage) go to a
real gateway on a socket, with neuron doubles that check what reaches them as a real
neuron's backend would (``openai_shapes.validate`` with the backend's features) after a
trip through the codec. Every answer must be a 2xx or a 4xx in OpenAI's envelope, never a
5xx; nothing that reached a neuron may be something its backend would refuse; and no
traceback may be logged.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from contextlib import asynccontextmanager

import httpx
import pytest
import trio
from hypothesis import HealthCheck, given, settings

from fuzz_bodies import requests
from helexa.roles.cortex.catalogue import BACKEND_FEATURES, Catalogue, CatalogueEntry, Workload
from helexa.roles.cortex.fleet import Fleet, RemoteError
from helexa.runtime import BackendError, openai_shapes
from neuron_double import NeuronDouble
from serving import serving

CATALOGUE = Catalogue([
    CatalogueEntry(id="chat", backend="synthetic", memory_mb=100, max_output=64, max_context=512),
    CatalogueEntry(id="smollm2-135m-instruct", backend="llama_cpp", memory_mb=300),
    CatalogueEntry(id="embed", backend="embeddings", memory_mb=100, workloads=(Workload.EMBEDDING,)),
])
MODELS = ["chat", "smollm2-135m-instruct", "embed"]


class StrictNeuron(NeuronDouble):
    """Refuses, as a real neuron would, anything its model's backend would refuse; and
    records it, since the edge should have refused it first."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.refused: list[str] = []

    @asynccontextmanager
    async def generate(self, request):
        entry = CATALOGUE.get(request.model_id)
        try:
            openai_shapes.validate(request, features=BACKEND_FEATURES[entry.backend] if entry else None)
        except BackendError as exc:
            self.refused.append(f"{request.model_id}: {exc}")
            raise RemoteError(exc.code, str(exc)) from None
        async with super().generate(request) as events:
            yield events


class Tracebacks(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info:
            self.records.append(record)


@pytest.fixture(scope="module")
def gateway():
    """A gateway and its neuron in a trio loop of their own thread (hypothesis drives the
    requests from this thread, one example at a time)."""
    ready: queue.Queue = queue.Queue()
    stop = threading.Event()

    def serve() -> None:
        async def main() -> None:
            fleet = Fleet()
            neuron = StrictNeuron("n1", fleet, loaded=("chat", "smollm2-135m-instruct", "embed"), tokens=3)
            async with serving(fleet, CATALOGUE) as (_, url):
                ready.put((url, neuron))
                while not stop.is_set():
                    await trio.sleep(0.05)

        trio.run(main)

    tracebacks = Tracebacks()
    logging.getLogger().addHandler(tracebacks)
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    url, neuron = ready.get(timeout=30)
    with httpx.Client(base_url=url, timeout=30) as client:
        yield client, neuron, tracebacks
    stop.set()
    thread.join(10)
    logging.getLogger().removeHandler(tracebacks)


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(requests(MODELS, chat_models=["chat", "smollm2-135m-instruct"]))
def test_no_request_gets_a_server_error_or_reaches_a_neuron_malformed(gateway, request) -> None:
    client, neuron, tracebacks = gateway
    path, body = request
    r = client.post(path, content=body, headers={"content-type": "application/json"})
    assert r.status_code < 500, (r.status_code, r.text, body[:500])
    if r.status_code >= 400:
        error = r.json()["error"]
        assert error["type"] and error["message"], r.text
    elif r.headers["content-type"].startswith("text/event-stream"):
        assert b'"error"' not in r.content or b"data: [DONE]" in r.content, r.text
    else:
        json.loads(r.content)
    assert neuron.refused == [], neuron.refused
    assert not tracebacks.records, [t.getMessage() for t in tracebacks.records]
