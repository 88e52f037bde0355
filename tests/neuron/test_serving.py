"""Requests on the neuron (helexa/roles/neuron/serving.py), against a cortex driven by hand,
on the virtual clock."""

from __future__ import annotations

import pytest
import trio

from hand_cortex import HandCortex, load_synthetic, neuron_for, next_frame

from helexa.protocol import (
    Cancel,
    EmbedRequest,
    GenerateRequest,
    GenerateResult,
    InferenceError,
    Task,
    TokenChunk,
)


def generate(rid: str, *, stream: bool = True) -> GenerateRequest:
    return GenerateRequest(rid, "s", Task.CHAT, messages=({"role": "user", "content": "hi"},), stream=stream)


async def joined(nursery, **metadata):
    cortex = HandCortex()
    neuron = neuron_for(cortex)
    nursery.start_soon(neuron.run)
    channel = await cortex.join()
    await load_synthetic(channel, **metadata)
    return neuron, channel


async def test_a_cancel_stops_a_running_request_at_once(nursery, autojump_clock):
    neuron, channel = await joined(nursery, tokens=1000, tokens_per_second=10)
    await channel.send(generate("r1"))
    assert isinstance(await next_frame(channel), TokenChunk)
    assert neuron.serving.in_flight == 1 and neuron.registry.in_flight == 1
    cancelled_at = trio.current_time()
    await channel.send(Cancel("r1"))
    await neuron.serving.wait_idle()
    assert trio.current_time() == cancelled_at  # stopped, not finished 99.9 s later
    assert neuron.registry.in_flight == 0  # the backend was released
    # Nothing more comes for it (heartbeats aside), and other work still runs.
    await channel.send(generate("r2", stream=False))
    msg = await next_frame(channel)
    assert isinstance(msg, GenerateResult) and msg.request_id == "r2"


async def test_a_cancel_for_an_unknown_request_changes_nothing(nursery, autojump_clock):
    neuron, channel = await joined(nursery, tokens=3)
    await channel.send(Cancel("nobody"))
    await channel.send(generate("r1", stream=False))
    msg = await next_frame(channel)
    assert isinstance(msg, GenerateResult) and msg.text == "tok0 tok1 tok2"


async def test_a_request_for_a_model_not_loaded_fails_as_retryable(nursery, autojump_clock):
    neuron, channel = await joined(nursery)
    await channel.send(GenerateRequest("r1", "other", Task.CHAT, messages=({"role": "user", "content": "x"},)))
    msg = await next_frame(channel)
    assert isinstance(msg, InferenceError) and msg.code == "model_not_loaded" and msg.retryable


async def test_an_embedding_from_a_chat_model_fails_naming_the_model(nursery, autojump_clock):
    neuron, channel = await joined(nursery)
    await channel.send(EmbedRequest("e1", "s", ("text",)))
    msg = await next_frame(channel)
    assert isinstance(msg, InferenceError) and "'s' does not do embeddings" in msg.message
    await neuron.serving.wait_idle()
    assert neuron.registry.in_flight == 0


async def test_requests_end_with_their_connection(nursery, autojump_clock):
    neuron, channel = await joined(nursery, tokens=1000, tokens_per_second=10)
    await channel.send(generate("r1"))
    assert isinstance(await next_frame(channel), TokenChunk)
    dropped_at = trio.current_time()
    await channel.aclose()
    await neuron.serving.wait_idle()
    assert trio.current_time() == pytest.approx(dropped_at)
    assert neuron.registry.in_flight == 0


async def wait_for_status(channel, model_id: str, state) -> object:  # noqa: ANN001
    from helexa.protocol import ModelStatusChanged

    while True:
        msg = await channel.receive()
        if isinstance(msg, ModelStatusChanged) and msg.status.model_id == model_id and msg.status.state is state:
            return msg.status


async def test_a_request_an_in_process_engine_cannot_end_marks_the_model_failed(nursery, autojump_clock, caplog):
    """A model run in the neuron's own process (``isolate = false``) whose engine does not
    end a cancelled request within ``cancel_grace`` cannot be killed (a worker's would be):
    the model goes to failed, the cortex is told, so nothing more is routed to the wedged
    engine, and one ERROR names the model and says ``isolate = true`` recovers such a model.
    A load brings it back."""
    from helexa.protocol import LoadModel, ModelState, ProvisioningResponse

    neuron, channel = await joined(nursery, tokens=1000, tokens_per_second=10, cancel_seconds=1000, cancel_grace=2)
    await channel.send(generate("r1"))
    assert isinstance(await next_frame(channel), TokenChunk)
    cancelled_at = trio.current_time()
    await channel.send(Cancel("r1"))
    with trio.fail_after(30):
        status = await wait_for_status(channel, "s", ModelState.FAILED)
    assert trio.current_time() - cancelled_at == pytest.approx(2, abs=0.1)  # the grace, not the engine's 1000 s
    assert "request r1 did not end within 2s of its cancel (cancel_grace)" in status.error
    assert "metadata.isolate = true" in status.error
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "model s:" in errors[0].getMessage() and "isolate = true" in errors[0].getMessage()
    # No new request runs on the wedged engine: retryable elsewhere.
    await channel.send(generate("r2"))
    msg = await next_frame(channel)
    assert isinstance(msg, InferenceError) and msg.code == "model_not_loaded" and msg.retryable
    # The next load replaces the backend, and it serves.
    await channel.send(LoadModel("c2", "s"))
    while not isinstance(msg := await next_frame(channel), ProvisioningResponse):
        pass
    assert msg.ok and msg.status.state is ModelState.LOADED
    await channel.send(generate("r3", stream=False))
    assert isinstance(await next_frame(channel), GenerateResult)


async def test_a_cancelled_request_that_ends_within_the_grace_leaves_the_model_loaded(nursery, autojump_clock):
    from helexa.protocol import ModelState

    neuron, channel = await joined(nursery, tokens=1000, tokens_per_second=10, cancel_seconds=1.5, cancel_grace=2)
    await channel.send(generate("r1"))
    assert isinstance(await next_frame(channel), TokenChunk)
    await channel.send(Cancel("r1"))
    await neuron.serving.wait_idle()
    await trio.sleep(5)
    assert neuron.registry.status("s").state is ModelState.LOADED


WEDGED = {"tokens": 1000, "tokens_per_second": 10, "cancel_seconds": 1000, "cancel_grace": 2}
"""A model whose engine takes 1000 s to end a request left before its end (a step it cannot
cancel), in the neuron's own process, judged wedged 2 s after the request is stopped."""


async def test_a_request_an_in_process_engine_cannot_end_when_its_link_drops_marks_the_model_failed(
        nursery, autojump_clock, caplog):
    """The client vanished with the link, no Cancel came: the request is stopped all the
    same, watched, and its model marked failed at the grace; the wedged request does not
    hold the neuron off its cortex either (it redials at once, not when the engine returns)."""
    from helexa.protocol import ModelState
    from helexa.protocol.join import Admitted

    cortex = HandCortex()
    neuron = neuron_for(cortex)
    nursery.start_soon(neuron.run)
    channel = await cortex.join()
    await load_synthetic(channel, **WEDGED)
    await channel.send(generate("r1"))
    assert isinstance(await next_frame(channel), TokenChunk)
    dropped_at = trio.current_time()
    await channel.aclose()
    with trio.fail_after(30):
        again = await cortex.accept()
        session = await cortex.handshake(again)
    assert isinstance(session.verdict, Admitted)
    assert trio.current_time() - dropped_at < 2  # redialed on its backoff, before the engine was judged
    with trio.fail_after(30):
        status = await wait_for_status(again, "s", ModelState.FAILED)
    assert trio.current_time() - dropped_at == pytest.approx(2, abs=0.1)
    assert "request r1 did not end within 2s of the connection to the cortex dropping (cancel_grace)" in status.error
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "model s:" in errors[0] and "isolate = true" in errors[0]


async def test_an_unload_stops_a_request_its_in_process_engine_cannot_end_and_leaves_the_model_failed(
        nursery, autojump_clock):
    """The unload's drain is over with the request still running: it is stopped (the cortex
    told), and when it has not ended within the grace the unload returns, the model failed
    (not waiting on the engine, nor freeing the backend under its thread); a load brings it back."""
    from helexa.protocol import LoadModel, ModelState, ProvisioningResponse, UnloadModel

    neuron, channel = await joined(nursery, **WEDGED)
    await channel.send(generate("r1"))
    assert isinstance(await next_frame(channel), TokenChunk)
    t0 = trio.current_time()
    await channel.send(UnloadModel("u1", "s", grace=1.0))
    seen = []
    with trio.fail_after(30):
        while not isinstance(msg := await next_frame(channel), ProvisioningResponse):
            seen.append((trio.current_time() - t0, msg))
    assert trio.current_time() - t0 == pytest.approx(1 + 2, abs=0.1)  # its drain, then the grace
    assert msg.command_id == "u1" and msg.status.state is ModelState.FAILED
    assert "did not end within 2s of its model's unload stopping it" in msg.status.error
    (cut_at, cut), = [(t, m) for t, m in seen if isinstance(m, InferenceError)]
    assert cut.request_id == "r1" and cut.code == "model_not_loaded" and not cut.retryable
    assert cut_at == pytest.approx(1, abs=0.1)
    assert all(t <= cut_at for t, m in seen if isinstance(m, TokenChunk))  # nothing after the cut
    await channel.send(LoadModel("c2", "s"))
    while not isinstance(msg := await next_frame(channel), ProvisioningResponse):
        pass
    assert msg.ok and msg.status.state is ModelState.LOADED
    await channel.send(generate("r3", stream=False))
    assert isinstance(await next_frame(channel), GenerateResult)


# --- the tasks requests run in --------------------------------------------------------


class _Spawns(trio.abc.Instrument):
    def __init__(self) -> None:
        self.count = 0

    def task_spawned(self, task) -> None:  # noqa: ANN001
        self.count += 1


async def test_requests_one_after_another_run_in_one_kept_task(nursery, autojump_clock):
    neuron, channel = await joined(nursery, tokens=3)
    spawns = _Spawns()
    trio.lowlevel.add_instrument(spawns)
    try:
        for i in range(10):
            await channel.send(generate(f"r{i}", stream=False))
            msg = await next_frame(channel)
            assert isinstance(msg, GenerateResult) and msg.request_id == f"r{i}"
    finally:
        trio.lowlevel.remove_instrument(spawns)
    assert spawns.count <= 1  # the first request's task, kept for the nine after it
    await neuron.serving.wait_idle()
    assert neuron.registry.in_flight == 0


async def test_a_cancel_for_a_request_that_ended_does_not_reach_the_next_one_in_the_same_task(
        nursery, autojump_clock):
    neuron, channel = await joined(nursery, tokens=50, tokens_per_second=10)
    await channel.send(generate("r1", stream=False))
    assert isinstance(await next_frame(channel), GenerateResult)
    await channel.send(generate("r2"))  # run by the task that ran r1
    assert isinstance(await next_frame(channel), TokenChunk)
    await channel.send(Cancel("r1"))  # late: r1 is over
    while not isinstance(msg := await next_frame(channel), GenerateResult):
        assert isinstance(msg, TokenChunk)
    assert msg.request_id == "r2" and msg.finish_reason == "stop"  # all of it


async def test_after_a_cancelled_request_the_task_runs_the_next_in_a_new_scope(nursery, autojump_clock):
    neuron, channel = await joined(nursery, tokens=1000, tokens_per_second=10)
    for rid in ("r1", "r2"):
        await channel.send(generate(rid))
        assert isinstance(await next_frame(channel), TokenChunk)
        await channel.send(Cancel(rid))
        await neuron.serving.wait_idle()
        assert neuron.registry.in_flight == 0
    await channel.send(generate("r3", stream=False))  # not cancelled by r1's or r2's scope
    msg = await next_frame(channel)
    assert isinstance(msg, GenerateResult) and msg.request_id == "r3"


async def test_a_request_cancelled_before_its_task_ran_it_sends_nothing(nursery, autojump_clock):
    neuron, channel = await joined(nursery, tokens=3)
    await channel.send(generate("warm", stream=False))  # a task is kept, waiting
    assert isinstance(await next_frame(channel), GenerateResult)
    neuron.serving.start(generate("r1", stream=False), nursery)
    neuron.serving.cancel("r1")
    await neuron.serving.wait_idle()
    assert neuron.registry.in_flight == 0
    await channel.send(generate("r2", stream=False))
    msg = await next_frame(channel)
    assert isinstance(msg, GenerateResult) and msg.request_id == "r2"  # nothing came for r1


async def test_concurrent_requests_each_cancel_only_its_own(nursery, autojump_clock):
    neuron, channel = await joined(nursery, tokens=30, tokens_per_second=10)
    for rid in ("a", "b", "c"):
        await channel.send(generate(rid))
    await trio.sleep(0.5)
    await channel.send(Cancel("b"))
    results = {}
    with trio.fail_after(60):
        while len(results) < 2:
            msg = await next_frame(channel)
            if isinstance(msg, GenerateResult):
                results[msg.request_id] = msg
            elif isinstance(msg, TokenChunk):
                assert msg.request_id != "b" or trio.current_time() <= 0.6
    assert set(results) == {"a", "c"} and all(m.finish_reason == "stop" for m in results.values())
    await neuron.serving.wait_idle()
    assert neuron.registry.in_flight == 0
