"""The neuron's model registry with real backends (synthetic, and llama_cpp on a missing
file): state transitions, single-flight loads, failures that leave the neuron healthy."""

from __future__ import annotations

import pytest
import trio

from helexa.protocol import ModelConfig, ModelState
from helexa.roles.neuron.registry import ModelNotReady, ModelRegistry
from helexa.runtime import LoadFailed, create_backend


def counting_factory(counter: list[str]):
    def factory(config: ModelConfig):
        counter.append(config.model_id)
        return create_backend(config)

    return factory


async def test_a_model_moves_configured_loading_loaded_configured():
    seen: list[ModelState] = []
    reg = ModelRegistry(on_status=lambda st: seen.append(st.state))
    reg.upsert(ModelConfig("s", "synthetic", metadata={"tokens": 3}))
    assert reg.status("s").state is ModelState.CONFIGURED
    await reg.load("s", lambda *a: None)
    assert reg.status("s").state is ModelState.LOADED
    await reg.unload("s")
    assert seen == [ModelState.LOADING, ModelState.LOADED, ModelState.UNLOADING, ModelState.CONFIGURED]


async def test_concurrent_loads_of_one_model_load_it_once():
    built: list[str] = []
    reg = ModelRegistry(factory=counting_factory(built))
    reg.upsert(ModelConfig("s", "synthetic"))
    results = []

    async def load():
        results.append(await reg.load("s", lambda *a: None))

    async with trio.open_nursery() as nursery:
        for _ in range(10):
            nursery.start_soon(load)
    assert built == ["s"]
    assert all(r.state is ModelState.LOADED for r in results)


async def test_a_failed_load_reports_a_precise_reason_and_can_be_retried(tmp_path, nursery):
    reg = ModelRegistry()
    reg.service_nursery = nursery  # llama_cpp runs in a worker process
    missing = tmp_path / "nope.gguf"
    reg.upsert(ModelConfig("m", "llama_cpp", metadata={"path": str(missing)}))
    with pytest.raises(LoadFailed) as err:
        await reg.load("m", lambda *a: None)
    assert err.value.code == "model_not_found"
    status = reg.status("m")
    assert status.state is ModelState.FAILED and "nope.gguf" in status.error
    # A new config clears the failure; the registry still serves other models.
    reg.upsert(ModelConfig("m", "synthetic"))
    assert reg.status("m").state is ModelState.CONFIGURED
    await reg.load("m", lambda *a: None)
    assert reg.status("m").state is ModelState.LOADED


async def test_requests_need_a_loaded_model():
    reg = ModelRegistry()
    with pytest.raises(ModelNotReady):
        reg.acquire("ghost")
    reg.upsert(ModelConfig("s", "synthetic"))
    with pytest.raises(ModelNotReady) as err:
        reg.acquire("s")
    assert err.value.retryable


async def test_unload_waits_for_in_flight_requests(autojump_clock):
    reg = ModelRegistry()
    reg.upsert(ModelConfig("s", "synthetic"))
    await reg.load("s", lambda *a: None)
    reg.acquire("s")
    done_at = []

    async def unload():
        await reg.unload("s")
        done_at.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(unload)
        await trio.sleep(5)
        assert reg.status("s").state is ModelState.UNLOADING
        with pytest.raises(ModelNotReady):
            reg.acquire("s")
        reg.release("s")
    assert done_at == [pytest.approx(5.0)]
