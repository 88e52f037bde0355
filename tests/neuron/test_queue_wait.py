"""The neuron's ``neuron.queue`` span (helexa/roles/neuron/queue_wait.py): how long a request
waited before its backend started on it, with an in-memory exporter. A neuron driven by
hand, real worker processes, real llama.cpp; the spans are the neuron's (this process's),
and the start of each request comes back from the worker.

Real clock: the workers live outside the test's event loop. Nothing here compares a time
with a fixed window; the wait is judged by the order of events.
"""

from __future__ import annotations


import pytest
import trio
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from hand_cortex import HandCortex, neuron_for, next_frame

from helexa.protocol import (
    EmbedRequest,
    EmbedResult,
    GenerateRequest,
    GenerateResult,
    InferenceError,
    LoadModel,
    ModelConfig,
    ProvisioningResponse,
    SamplingParams,
    Task,
    UpsertModelConfig,
)
from helexa.runtime.testing import tiny_llama_config

pytestmark = pytest.mark.slow

TRACE = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
"""The cortex's dispatch span, as it rides in the request frame."""


async def joined(nursery):
    cortex = HandCortex()
    neuron = neuron_for(cortex)
    nursery.start_soon(neuron.run)
    return neuron, await cortex.join()


async def provision(channel, config: ModelConfig) -> None:
    await channel.send(UpsertModelConfig("c-up", config))
    await channel.send(LoadModel("c-load", config.model_id))
    while not (isinstance(msg := await next_frame(channel), ProvisioningResponse) and msg.command_id == "c-load"):
        pass
    assert msg.ok, msg


async def ends(channel, rids: set[str]) -> dict[str, object]:
    """The frame that ends each request of ``rids``."""
    out: dict[str, object] = {}
    while len(out) < len(rids):
        msg = await channel.receive()
        if isinstance(msg, (GenerateResult, EmbedResult, InferenceError)) and msg.request_id in rids:
            out[msg.request_id] = msg
    return out


def finished(exporter: InMemorySpanExporter, name: str) -> list:
    return [s for s in exporter.get_finished_spans() if s.name == name]


async def test_a_request_waiting_for_llama_cpps_one_slot_in_a_worker_waits_in_its_queue_span(
        nursery, tiny_gguf, spans: InMemorySpanExporter) -> None:
    neuron, channel = await joined(nursery)
    with trio.fail_after(120):
        await provision(channel, tiny_llama_config(tiny_gguf, n_parallel=1))
        for rid in ("r1", "r2"):
            await channel.send(GenerateRequest(rid, "tiny-llama", Task.CHAT, stream=True, trace=TRACE,
                                               messages=({"role": "user", "content": "hi"},),
                                               sampling=SamplingParams(max_tokens=24)))
        answers = await ends(channel, {"r1", "r2"})
        await neuron.serving.wait_idle()  # each span ends just after its request's last frame
    assert all(isinstance(a, GenerateResult) for a in answers.values()), answers
    generated = {s.attributes["helexa.request_id"]: s for s in finished(spans, "neuron.generate")}
    queued = {s.attributes["helexa.request_id"]: s for s in finished(spans, "neuron.queue")}
    assert set(queued) == set(generated) == {"r1", "r2"}
    for rid, wait in queued.items():
        assert wait.parent.span_id == generated[rid].context.span_id
        assert wait.context.trace_id == int(TRACE.split("-")[1], 16)
        # Ended by llama.cpp's first progress report, which crossed back from the worker.
        assert wait.attributes["helexa.queue.ended_by"] == "backend_start"
        assert wait.attributes["helexa.model"] == "tiny-llama"
        assert wait.attributes["helexa.queue.slots"] == 1
        assert wait.attributes["helexa.queue.wait_ms"] >= 0
    # One arrived while the other was in flight...
    assert sorted(w.attributes["helexa.queue.busy_at_entry"] for w in queued.values()) == [0, 1]
    # ...and with one slot, whichever started second waited past the other's first token.
    first, second = sorted(queued.values(), key=lambda s: s.end_time)
    (first_token,) = [e for e in generated[first.attributes["helexa.request_id"]].events
                      if e.name == "first_output"]
    assert second.end_time > first_token.timestamp
    assert second.attributes["helexa.queue.wait_ms"] > first.attributes["helexa.queue.wait_ms"]


async def test_an_embedding_in_a_worker_has_a_queue_span_ended_by_its_batch_starting(
        nursery, spans: InMemorySpanExporter) -> None:
    pytest.importorskip("onnxruntime")
    neuron, channel = await joined(nursery)
    with trio.fail_after(120):
        await provision(channel, ModelConfig("minilm", "embeddings"))
        await channel.send(EmbedRequest("e1", "minilm", inputs=("hello",), trace=TRACE))
        answer = (await ends(channel, {"e1"}))["e1"]
        await neuron.serving.wait_idle()
    assert isinstance(answer, EmbedResult), answer
    (embedded,) = finished(spans, "neuron.embed")
    (wait,) = finished(spans, "neuron.queue")
    assert wait.parent.span_id == embedded.context.span_id
    assert wait.attributes["helexa.queue.ended_by"] == "backend_start"
    assert wait.attributes["helexa.queue.slots"] == 1
    assert wait.attributes["helexa.queue.busy_at_entry"] == 0

