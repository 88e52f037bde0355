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


async def test_an_unload_cancelled_while_its_requests_drain_leaves_the_model_loaded_and_wakes_its_waiters(
        autojump_clock):
    # The neuron's drain cancels its unloads when its own deadline (max(grace, 5 s)) fires,
    # which can be the instant the registry's 5 s wait for in-flight requests ends. Before,
    # a cancel there left the model `unloading` for good and whoever waited for that unload
    # (a load, another unload) waiting for ever.
    seen: list[ModelState] = []
    reg = ModelRegistry(on_status=lambda st: seen.append(st.state))
    reg.upsert(ModelConfig("s", "synthetic"))
    await reg.load("s", lambda *a: None)
    reg.acquire("s")
    scope = trio.CancelScope()
    loaded = []

    async def unload() -> None:
        with scope:
            await reg.unload("s", drain_timeout=5.0)

    async def load() -> None:
        loaded.append(await reg.load("s", lambda *a: None))

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(unload)
            await trio.sleep(4.0)
            assert reg.status("s").state is ModelState.UNLOADING
            nursery.start_soon(load)  # waits for the unload to settle
            await trio.sleep(0.5)
            scope.cancel()  # the drain's deadline, just before the unload's own (at 5 s) here: deterministic
    assert reg.status("s").state is ModelState.LOADED
    assert [st.state for st in loaded] == [ModelState.LOADED]
    assert seen[-2:] == [ModelState.UNLOADING, ModelState.LOADED]
    reg.release("s")
    with trio.fail_after(60):
        assert (await reg.unload("s")).state is ModelState.CONFIGURED


async def test_a_model_failed_for_a_wedged_engine_is_abandoned_not_unloaded():
    # Its engine's thread is stuck in the backend (ModelRegistry.wedged): unloading it
    # would free what that thread uses, or wait on it for ever. Unloading the failed model
    # and loading it again both leave the old backend alone and build a new one.
    built: list[str] = []
    reg = ModelRegistry(factory=counting_factory(built))
    reg.upsert(ModelConfig("s", "synthetic"))
    await reg.load("s", lambda *a: None)
    backend = reg.acquire("s")
    unloaded = []

    async def spy_unload() -> None:
        unloaded.append(backend)

    backend.unload = spy_unload
    reg.wedged("s", backend, "req-1", 1.0)
    assert reg.status("s").state is ModelState.FAILED
    assert (await reg.unload("s")).state is ModelState.CONFIGURED
    assert unloaded == []
    await reg.load("s", lambda *a: None)
    assert reg.status("s").state is ModelState.LOADED and built == ["s", "s"]
    assert reg.acquire("s") is not backend
    # Failed for a wedge again, then loaded again straight away: abandoned as well.
    backend2 = reg.acquire("s")
    backend2.unload = spy_unload
    reg.wedged("s", backend2, "req-2", 1.0)
    await reg.load("s", lambda *a: None)
    assert unloaded == [] and built == ["s", "s", "s"]
    reg.release("s")


class _Stubborn:
    """A backend of a worker process (as ``kills_wedged`` says): its requests end only
    when its process is killed, and ``hang_unload`` makes its unload wait for that too (or
    its 100 s ``unload_timeout``)."""

    kind = "stubborn"
    kills_wedged = True
    service_nursery = None
    status_listener = None
    hang_unload = False

    def __init__(self, config: ModelConfig, registry: list[ModelRegistry], killed: list[tuple[str, float]]) -> None:
        self.config, self._registry, self._killed = config, registry, killed
        self._dead = trio.Event()

    hang_load = False

    async def load(self, progress) -> None:
        if self.hang_load:  # a load that ends only when its process is killed (or after 100 s)
            with trio.move_on_after(100):
                await self._dead.wait()
            if self._dead.is_set():
                raise LoadFailed("the worker was killed")

    async def unload(self) -> None:
        if self.hang_unload:
            with trio.move_on_after(100):  # its unload_timeout
                await self._dead.wait()

    def kill(self) -> None:
        self._killed.append((self.config.model_id, trio.current_time()))
        self._dead.set()
        while self._registry[0].in_flight_of(self.config.model_id):  # its requests fail with the process
            self._registry[0].release(self.config.model_id)

    def memory_bytes(self) -> int:
        return 0

    def context_length(self) -> int | None:
        return None


@pytest.mark.parametrize("hang_unload", [False, True])
async def test_the_stops_kill_timer_ends_every_backend_even_one_whose_requests_still_drain(
        autojump_clock, hang_unload):
    """The neuron's stop (``unload_all``) ends every backend by its kill timer: one whose
    requests have not ended yet (so its unload had not begun) is killed too, as is one whose
    unload begins only then; it was left to drain past the timer, or loaded at the exit."""
    killed: list[tuple[str, float]] = []
    holder: list[ModelRegistry] = []

    def factory(config: ModelConfig):
        backend = _Stubborn(config, holder, killed)
        backend.hang_unload = hang_unload
        return backend

    reg = ModelRegistry(factory=factory)
    holder.append(reg)
    for model_id in ("a", "b"):
        reg.upsert(ModelConfig(model_id, "synthetic"))
        await reg.load(model_id, lambda *a: None)
    reg.acquire("a")  # a request that ends only with its process
    t0 = trio.current_time()
    with trio.fail_after(60):
        await reg.unload_all(kill_after=3.0)
    assert trio.current_time() - t0 == pytest.approx(3.0)
    if hang_unload:  # each unload waits for its kill: both killed at the timer
        assert {m for m, _ in killed} == {"a", "b"}
        assert [t - t0 for _, t in killed] == pytest.approx([3.0] * len(killed))
    assert [reg.status(m).state for m in ("a", "b")] == [ModelState.CONFIGURED] * 2


async def test_the_stops_kill_timer_ends_a_load_under_way(nursery, autojump_clock):
    """A model still loading when the neuron stops: its unload waited for the load to end,
    which the kill timer did not reach (the backend is the load's until it is loaded), so
    the stop waited out the whole load. At the timer the load's processes are killed: the
    model ends failed, by the timer; a load asked for after it is refused."""
    killed: list[tuple[str, float]] = []
    holder: list[ModelRegistry] = []

    def factory(config: ModelConfig):
        backend = _Stubborn(config, holder, killed)
        backend.hang_load = True
        return backend

    reg = ModelRegistry(factory=factory)
    holder.append(reg)
    reg.upsert(ModelConfig("a", "synthetic"))
    loads: list[BaseException] = []

    async def load() -> None:
        try:
            await reg.load("a", lambda *a: None)
        except LoadFailed as exc:
            loads.append(exc)

    nursery.start_soon(load)
    await trio.sleep(1)
    assert reg.status("a").state is ModelState.LOADING
    t0 = trio.current_time()
    with trio.fail_after(60):
        await reg.unload_all(kill_after=3.0)
    assert trio.current_time() - t0 == pytest.approx(3.0)
    assert killed == [("a", pytest.approx(t0 + 3.0))] and len(loads) == 1
    assert reg.status("a").state in (ModelState.FAILED, ModelState.CONFIGURED)
    with pytest.raises(LoadFailed):
        await reg.load("a", lambda *a: None)
