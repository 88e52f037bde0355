"""Provisioning commands on the neuron (helexa/roles/neuron/commands.py): every command
is answered once with its id; a load reports progress; failures name their reason."""

from __future__ import annotations

import pytest
import trio

from hand_cortex import HandCortex, neuron_for

from helexa.protocol import (
    GenerateRequest,
    GenerateResult,
    InferenceError,
    LoadModel,
    LoadProgress,
    ModelConfig,
    ModelState,
    ProvisioningResponse,
    SamplingParams,
    Task,
    UnloadModel,
    UpsertModelConfig,
)


async def joined(nursery):
    cortex = HandCortex()
    neuron = neuron_for(cortex)
    nursery.start_soon(neuron.run)
    return neuron, await cortex.join()


async def answer(channel, command_id: str, seen: list | None = None) -> ProvisioningResponse:
    while True:
        msg = await channel.receive()
        if seen is not None:
            seen.append((trio.current_time(), msg))
        if isinstance(msg, ProvisioningResponse) and msg.command_id == command_id:
            return msg


async def test_upsert_load_unload_are_each_answered_with_the_new_state(nursery, autojump_clock):
    neuron, channel = await joined(nursery)
    await channel.send(UpsertModelConfig("c1", ModelConfig("s", "synthetic", metadata={"load_seconds": 4})))
    assert (await answer(channel, "c1")).status.state is ModelState.CONFIGURED
    t0 = trio.current_time()
    await channel.send(LoadModel("c2", "s"))
    seen: list = []
    loaded = await answer(channel, "c2", seen)
    assert loaded.ok and loaded.status.state is ModelState.LOADED
    assert trio.current_time() - t0 == pytest.approx(4.0)
    # Progress travels beside the answer, so the last report may come just after it.
    while not any(isinstance(m, LoadProgress) and m.done == 1 for _, m in seen):
        seen.append((trio.current_time(), await channel.receive()))
    progress = [(t - t0, m.done, m.total) for t, m in seen if isinstance(m, LoadProgress)]
    assert progress == [(0.0, 0, 1), (pytest.approx(4.0), 1, 1)]
    await channel.send(UnloadModel("c3", "s"))
    unloaded = await answer(channel, "c3")
    assert unloaded.ok and unloaded.status.state is ModelState.CONFIGURED
    assert neuron.registry.status("s").state is ModelState.CONFIGURED


async def test_a_load_that_fails_is_answered_with_its_reason_and_the_neuron_carries_on(nursery, autojump_clock):
    neuron, channel = await joined(nursery)
    await channel.send(UpsertModelConfig("c1", ModelConfig("bad", "no_such_backend")))
    await answer(channel, "c1")
    await channel.send(LoadModel("c2", "bad"))
    failed = await answer(channel, "c2")
    assert not failed.ok and failed.error and failed.status.state is ModelState.FAILED
    await channel.send(LoadModel("c3", "never-configured"))
    missing = await answer(channel, "c3")
    assert not missing.ok and missing.code == "not_configured" and missing.status is None


async def test_an_unload_lets_running_requests_finish_within_its_grace(nursery, autojump_clock):
    neuron, channel = await joined(nursery)
    slow = ModelConfig("s", "synthetic", metadata={"tokens": 100, "tokens_per_second": 10})
    await channel.send(UpsertModelConfig("c1", slow))
    await answer(channel, "c1")

    async def generate_then_unload(rid: str, tokens: int, grace: float) -> tuple[float, list]:
        await channel.send(LoadModel(f"load-{rid}", "s"))
        assert (await answer(channel, f"load-{rid}")).ok
        await channel.send(GenerateRequest(rid, "s", Task.CHAT, messages=({"role": "user", "content": "hi"},),
                                           sampling=SamplingParams(max_tokens=tokens)))
        t0 = trio.current_time()
        await channel.send(UnloadModel(f"unload-{rid}", "s", grace=grace))
        await channel.send(GenerateRequest(f"{rid}-late", "s", Task.CHAT, messages=({"role": "user", "content": "x"},)))
        seen: list = []
        unloaded = await answer(channel, f"unload-{rid}", seen)
        assert unloaded.ok and unloaded.status.state is ModelState.CONFIGURED
        return trio.current_time() - t0, [m for _, m in seen]

    # 20 tokens at 10/s: the unload waits the 2 s they take, the stream ends whole.
    took, seen = await generate_then_unload("r1", 20, grace=60.0)
    assert took == pytest.approx(2.0)
    result = next(m for m in seen if isinstance(m, GenerateResult) and m.request_id == "r1")
    assert result.usage.completion_tokens == 20
    late = next(m for m in seen if isinstance(m, InferenceError) and m.request_id == "r1-late")
    assert late.retryable  # refused while draining: the cortex sends it elsewhere

    # 100 tokens would take 10 s; the grace is 3 s: the unload goes on at 3 s.
    took, _ = await generate_then_unload("r2", 100, grace=3.0)
    assert took == pytest.approx(3.0)


async def test_a_load_cut_off_by_its_connection_ending_says_so_and_leaves_the_model_configured(
        nursery, autojump_clock, caplog):
    """After a partition the neuron's connection ends when it heals; a load it was carrying
    out for that connection stopped without a word (the operator saw a download vanish)."""
    caplog.set_level("INFO", logger="helexa.roles.neuron.commands")
    neuron, channel = await joined(nursery)
    await channel.send(UpsertModelConfig("c1", ModelConfig("s", "synthetic", metadata={"load_seconds": 30})))
    await answer(channel, "c1")
    await channel.send(LoadModel("c2", "s"))
    await trio.sleep(2)
    await channel.aclose(1006, "gone")
    await trio.sleep(1)
    assert neuron.registry.status("s").state is ModelState.CONFIGURED
    assert "load of s stopped: the connection to the cortex that asked for it ended" in caplog.text
