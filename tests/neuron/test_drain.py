"""The neuron's graceful stop (helexa/roles/neuron/shutdown.py), against a cortex driven by
hand, on the virtual clock: every step happens at an exact time, driven by events."""

from __future__ import annotations

import pytest
import trio

from hand_cortex import HandCortex, load_synthetic, neuron_for, next_frame

from helexa.protocol import (
    GenerateRequest,
    GenerateResult,
    InferenceError,
    ModelState,
    Shutdown,
    Task,
    TokenChunk,
)
from helexa.transport import ChannelClosed

RATE = 3.0  # tokens per second: a token every 1/3 s, so no step lands on a polling tick


def generate(rid: str) -> GenerateRequest:
    return GenerateRequest(rid, "s", Task.CHAT, messages=({"role": "user", "content": "hi"},))


async def test_drain_waits_for_the_in_flight_request_then_unloads_and_leaves(nursery, autojump_clock):
    cortex = HandCortex()
    neuron = neuron_for(cortex, shutdown_grace=10.0)
    run_ended = trio.Event()

    async def run():
        await neuron.run()
        run_ended.set()

    nursery.start_soon(run)
    channel = await cortex.join()
    await load_synthetic(channel, tokens=5, tokens_per_second=RATE)
    t0 = trio.current_time()
    await channel.send(generate("r1"))
    assert isinstance(await next_frame(channel), TokenChunk)
    assert trio.current_time() - t0 == pytest.approx(1 / RATE)

    drained_at: list[float] = []

    async def drain():
        await neuron.drain("maintenance")
        drained_at.append(trio.current_time())

    nursery.start_soon(drain)
    assert await next_frame(channel) == Shutdown("maintenance", 10.0)
    await channel.send(generate("r2"))  # new work during the drain is refused, as retryable
    seen: list[tuple[float, object]] = []
    try:
        while True:
            msg = await next_frame(channel)
            seen.append((trio.current_time() - t0, msg))
    except ChannelClosed:
        closed_at = trio.current_time() - t0
        state_at_close = neuron.registry.status("s").state
    refused = [m for _, m in seen if isinstance(m, InferenceError)]
    assert refused == [InferenceError("r2", "draining", "this neuron is shutting down", retryable=True)]
    (done_at, _), = [(t, m) for t, m in seen if isinstance(m, GenerateResult) and m.request_id == "r1"]
    assert done_at == pytest.approx(5 / RATE)  # the request finished in full
    # Unloaded and closed the moment the last request ended, not at a polling tick after.
    assert closed_at == pytest.approx(5 / RATE, abs=1e-9)
    assert state_at_close is ModelState.CONFIGURED
    await run_ended.wait()
    assert drained_at == [pytest.approx(t0 + 5 / RATE)]
    assert cortex.dials == [pytest.approx(0.0)]  # left for good: no redial


async def test_drain_cancels_what_outlives_the_grace_period(nursery, autojump_clock):
    cortex = HandCortex()
    neuron = neuron_for(cortex, shutdown_grace=1.0)
    nursery.start_soon(neuron.run)
    channel = await cortex.join()
    await load_synthetic(channel, tokens=100, tokens_per_second=RATE)
    await channel.send(generate("long"))
    assert isinstance(await next_frame(channel), TokenChunk)
    t0 = trio.current_time()
    nursery.start_soon(neuron.drain)
    results = []
    try:
        while True:
            if isinstance(msg := await next_frame(channel), GenerateResult):
                results.append(msg)
    except ChannelClosed:
        closed_at = trio.current_time() - t0
    assert results == []  # cut off at the end of the grace period, not finished
    assert closed_at == pytest.approx(1.0, abs=1e-9)
    assert neuron.registry.status("s").state is ModelState.CONFIGURED
    assert neuron.serving.in_flight == 0 and neuron.registry.in_flight == 0


async def test_drain_with_nothing_in_flight_takes_no_time(nursery, autojump_clock):
    cortex = HandCortex()
    neuron = neuron_for(cortex, shutdown_grace=10.0)
    nursery.start_soon(neuron.run)
    channel = await cortex.join()
    await load_synthetic(channel)
    t0 = trio.current_time()
    await neuron.drain()
    assert trio.current_time() == t0
    assert neuron.registry.status("s").state is ModelState.CONFIGURED


async def test_a_drain_does_not_wait_on_an_in_process_engine_that_cannot_end_a_request(
        nursery, autojump_clock, caplog):
    """What outlives the grace is stopped; an engine that does not end it within its
    cancel_grace marks the model failed (one ERROR), and the drain ends then instead of
    waiting on the engine (1000 s here)."""
    cortex = HandCortex()
    neuron = neuron_for(cortex, shutdown_grace=1.0)
    nursery.start_soon(neuron.run)
    channel = await cortex.join()
    await load_synthetic(channel, tokens=1000, tokens_per_second=RATE, cancel_seconds=1000, cancel_grace=2)
    await channel.send(generate("long"))
    assert isinstance(await next_frame(channel), TokenChunk)
    t0 = trio.current_time()
    with trio.fail_after(60):
        await neuron.drain()
    assert trio.current_time() - t0 == pytest.approx(1 + 2, abs=0.1)  # the grace, then cancel_grace
    status = neuron.registry.status("s")
    assert status.state is ModelState.FAILED
    assert "request long did not end within 2s of the neuron's drain stopping it (cancel_grace)" in status.error
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "model s:" in errors[0]
