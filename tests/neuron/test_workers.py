"""A neuron whose models run in worker processes (helexa/runtime/worker), against a cortex
driven by hand: real worker processes, real llama.cpp, real signals.

These run on the real clock: the worker processes live outside the test's event loop, so a
virtual clock would jump past their work. The deadlines' arithmetic is tested on its own
(tests/protocol/test_worker_protocol.py); here nothing waits a fixed time and then looks.
"""

from __future__ import annotations

import signal

import psutil
import pytest
import trio

from hand_cortex import HandCortex, neuron_for

from helexa.protocol import (
    GenerateRequest,
    GenerateResult,
    Heartbeat,
    InferenceError,
    LoadModel,
    LoadProgress,
    ModelConfig,
    ModelState,
    ModelStatusChanged,
    ProvisioningResponse,
    SamplingParams,
    Task,
    TokenChunk,
    UnloadModel,
    UpsertModelConfig,
)
from helexa.roles.neuron.registry import ModelRegistry
from helexa.runtime.testing import tiny_llama_config
from helexa.runtime.worker import WorkerSettings, backend_for

pytestmark = pytest.mark.slow


def worker_of(model_id: str) -> psutil.Process:
    """The worker process running ``model_id``, found as an operator would (``ps``)."""
    for child in psutil.Process().children(recursive=True):
        try:
            argv = child.cmdline()
        except psutil.NoSuchProcess:
            continue
        if "helexa.runtime.worker" in argv and argv[argv.index("--model") + 1] == model_id:
            return child
    raise AssertionError(f"no worker process runs {model_id!r}")


def chat(rid: str, model: str, max_tokens: int = 8) -> GenerateRequest:
    return GenerateRequest(rid, model, Task.CHAT, messages=({"role": "user", "content": "hi"},),
                           sampling=SamplingParams(max_tokens=max_tokens))


async def provision(channel, config: ModelConfig, cid: str) -> list[object]:
    """Configure and load ``config`` on the neuron; returns every frame seen meanwhile."""
    await channel.send(UpsertModelConfig(f"{cid}-up", config))
    await channel.send(LoadModel(cid, config.model_id))
    return await until(channel, lambda m: isinstance(m, ProvisioningResponse) and m.command_id == cid)


async def until(channel, done) -> list[object]:  # type: ignore[no-untyped-def]
    """Every frame up to and including the first for which ``done(frame)`` is true."""
    seen = []
    while True:
        msg = await channel.receive()
        seen.append(msg)
        if done(msg):
            return seen


async def answer(channel, rid: str) -> object:
    """The frame that ends request ``rid``."""
    frames = await until(channel, lambda m: isinstance(m, (GenerateResult, InferenceError)) and m.request_id == rid)
    return frames[-1]


async def joined_neuron(nursery, settings: WorkerSettings | None = None, **config):
    cortex = HandCortex(**config)
    registry = ModelRegistry(factory=lambda c: backend_for(c, settings))
    neuron = neuron_for(cortex)
    neuron = type(neuron)(neuron.config, registry=registry, connector=cortex.connect)
    nursery.start_soon(neuron.run)
    return neuron, await cortex.join()


def doomed_config() -> ModelConfig:
    # A synthetic model in a worker of its own: a slow, endless stream to kill in the middle.
    return ModelConfig("doomed", "synthetic", metadata={"isolate": True, "tokens": 100_000,
                                                        "tokens_per_second": 200})


async def test_a_killed_worker_fails_only_its_models_requests_is_reported_and_reloads(nursery, tiny_gguf):
    neuron, channel = await joined_neuron(nursery)
    with trio.fail_after(60):
        seen = await provision(channel, tiny_llama_config(tiny_gguf), "c1")
        assert seen[-1].ok, seen[-1]
        assert (await provision(channel, doomed_config(), "c2"))[-1].ok
        victim = worker_of("doomed")
        await channel.send(chat("r1", "doomed", max_tokens=50_000))
        await until(channel, lambda m: isinstance(m, TokenChunk) and m.request_id == "r1")
        victim.send_signal(signal.SIGKILL)
        frames = await until(channel, lambda m: isinstance(m, InferenceError) and m.request_id == "r1")
        error = frames[-1]
        assert error.code == "backend_crashed" and not error.retryable  # the answer had started
        assert "SIGKILL" in error.message and "doomed" in error.message
        # The cortex hears that the model failed, and why.
        if not any(isinstance(m, ModelStatusChanged) and m.status.state is ModelState.FAILED for m in frames):
            await until(channel, lambda m: isinstance(m, ModelStatusChanged) and m.status.model_id == "doomed")
        status = neuron.registry.status("doomed")
        assert status.state is ModelState.FAILED and "SIGKILL" in status.error
        # The other model never noticed.
        await channel.send(chat("r2", "tiny-llama"))
        assert isinstance(await answer(channel, "r2"), GenerateResult)
        # Requests for the failed model are refused as retryable elsewhere, until it is reloaded.
        await channel.send(chat("r3", "doomed"))
        refused = await answer(channel, "r3")
        assert isinstance(refused, InferenceError) and refused.retryable
        await channel.send(LoadModel("c3", "doomed"))
        reloaded = (await until(channel, lambda m: isinstance(m, ProvisioningResponse) and m.command_id == "c3"))[-1]
        assert reloaded.ok and reloaded.status.state is ModelState.LOADED
        assert worker_of("doomed").pid != victim.pid
        await channel.send(chat("r4", "doomed", max_tokens=3))
        assert isinstance(await answer(channel, "r4"), GenerateResult)


async def test_a_frozen_worker_is_killed_at_its_ping_deadline(nursery):
    settings = WorkerSettings(ping_interval=0.1, ping_timeout=1.0)
    neuron, channel = await joined_neuron(nursery, settings)
    with trio.fail_after(60):
        assert (await provision(channel, doomed_config(), "c1"))[-1].ok
        victim = worker_of("doomed")
        await channel.send(chat("r1", "doomed", max_tokens=50_000))
        await until(channel, lambda m: isinstance(m, TokenChunk) and m.request_id == "r1")
        victim.send_signal(signal.SIGSTOP)
        try:
            error = (await until(channel, lambda m: isinstance(m, InferenceError) and m.request_id == "r1"))[-1]
        finally:
            if victim.is_running():
                victim.send_signal(signal.SIGCONT)
    assert error.code == "backend_crashed"
    assert "did not answer for" in error.message and "killed" in error.message
    assert not victim.is_running() or victim.status() == psutil.STATUS_ZOMBIE
    assert neuron.registry.status("doomed").state is ModelState.FAILED


async def test_unloading_a_model_ends_its_worker_and_returns_its_memory(nursery, tiny_gguf):
    neuron, channel = await joined_neuron(nursery)
    with trio.fail_after(60):
        assert (await provision(channel, tiny_llama_config(tiny_gguf), "c1"))[-1].ok
        worker = worker_of("tiny-llama")
        held = worker.memory_info().rss
        mine = psutil.Process().memory_info().rss
        await channel.send(UnloadModel("c2", "tiny-llama"))
        done = (await until(channel, lambda m: isinstance(m, ProvisioningResponse) and m.command_id == "c2"))[-1]
    assert done.ok and done.status.state is ModelState.CONFIGURED
    assert not psutil.pid_exists(worker.pid)  # exited and reaped: all of its memory is back
    assert held > 20 * 2**20  # what it held: an interpreter, llama.cpp and the weights
    assert psutil.Process().memory_info().rss < mine + held / 2  # none of it moved to the neuron


async def test_a_neuron_heartbeats_at_its_interval_while_smollm2_loads_in_a_worker(nursery, tiny_gguf):
    """xllamacpp holds the interpreter lock for the whole of ``xllamacpp.Server(...)``, which
    the llama_cpp backend brackets with progress 0 and progress 100 %. In a worker, the
    neuron's loop runs on meanwhile: every heartbeat interval inside that window has its
    heartbeat, and the model the neuron already holds keeps answering."""
    from helexa.runtime.llama_cpp import default_gguf_path

    interval = 0.02  # a warm page cache loads SmolLM2 in half a second: beats must be denser
    neuron, channel = await joined_neuron(nursery, heartbeat_interval=interval)
    with trio.fail_after(120):
        assert (await provision(channel, tiny_llama_config(tiny_gguf), "c1"))[-1].ok
        smollm2 = ModelConfig("smollm2", "llama_cpp", metadata={"path": str(default_gguf_path()), "n_threads": 1})
        await channel.send(UpsertModelConfig("c2-up", smollm2))
        await channel.send(LoadModel("c2", "smollm2"))
        await channel.send(chat("r1", "tiny-llama", max_tokens=64))
        timeline: list[tuple[float, object]] = []

        def loads() -> list[float]:
            return [t for t, m in timeline if isinstance(m, LoadProgress) and m.stage == "load"]

        # The answer may overtake the last progress frame: wait for both.
        while len(loads()) < 2 or not any(isinstance(m, ProvisioningResponse) for _, m in timeline):
            timeline.append((trio.current_time(), await channel.receive()))
    response = next(m for _, m in timeline if isinstance(m, ProvisioningResponse))
    assert response.ok, response
    start, end = loads()  # progress 0 and 100 % bracket xllamacpp's load
    beats = [t for t, m in timeline if isinstance(m, Heartbeat) and start <= t <= end]
    loading = [m for _, m in timeline if isinstance(m, Heartbeat)
               and any(s.model_id == "smollm2" and s.state is ModelState.LOADING for s in m.models)]
    window = end - start
    assert window > 10 * interval, "the load was too quick to tell anything"
    # In the neuron's own process the loop would stand still for most of the window (one
    # or two heartbeats, one gap as long as the load); here it keeps its pace, give or
    # take a machine shared with other work.
    gaps = [b - a for a, b in zip([start, *beats], [*beats, end])]
    assert max(gaps) < window / 4, (max(gaps), window)
    assert len(beats) >= window / interval / 3, (len(beats), window)
    assert loading, "the cortex saw the model loading"
    # The model already held answered while the other one loaded.
    answered = [t for t, m in timeline if isinstance(m, GenerateResult) and m.request_id == "r1"]
    assert answered and answered[0] < end


async def test_a_request_the_engine_cannot_cancel_gets_its_worker_killed_and_the_model_reloads(nursery, tiny_gguf):
    """The cortex gives up on a request whose schema llama.cpp's grammar converter never
    returns from (refused at the edge today; sent here by hand, as a peer's or a future
    schema form could) and sends Cancel: past ``cancel_grace`` the neuron kills the wedged
    worker, the model goes to failed, and a load brings it back serving."""
    from helexa.protocol import Cancel, OutputFormat, ResponseFormat

    neuron, channel = await joined_neuron(nursery)
    config = tiny_llama_config(tiny_gguf, cancel_grace=2)
    with trio.fail_after(90):
        assert (await provision(channel, config, "c1"))[-1].ok
        victim = worker_of("tiny-llama")
        hanging = ResponseFormat(OutputFormat.JSON_SCHEMA, {"type": "string", "minLength": 5, "maxLength": 2})
        await channel.send(GenerateRequest("wedge", "tiny-llama", Task.CHAT,
                                           messages=({"role": "user", "content": "hi"},),
                                           sampling=SamplingParams(max_tokens=8), response_format=hanging))
        with trio.move_on_after(2):  # nothing comes back: the converter never returns
            frames = await until(channel, lambda m: getattr(m, "request_id", None) == "wedge"
                                 and isinstance(m, (GenerateResult, InferenceError, TokenChunk)))
            raise AssertionError(f"the schema no longer hangs llama.cpp: {frames[-1]}")
        cancelled = trio.current_time()
        await channel.send(Cancel("wedge"))
        await until(channel, lambda m: isinstance(m, ModelStatusChanged) and m.status.model_id == "tiny-llama"
                    and m.status.state is ModelState.FAILED)
        assert trio.current_time() - cancelled < 2 + 5  # the grace, and a margin for the kill and the reaping
        status = neuron.registry.status("tiny-llama")
        assert "request wedge" in status.error and "wedged" in status.error
        assert not victim.is_running() or victim.status() == psutil.STATUS_ZOMBIE
        await channel.send(LoadModel("c2", "tiny-llama"))
        reloaded = (await until(channel, lambda m: isinstance(m, ProvisioningResponse) and m.command_id == "c2"))[-1]
        assert reloaded.ok and reloaded.status.state is ModelState.LOADED
        assert worker_of("tiny-llama").pid != victim.pid
        await channel.send(chat("ok", "tiny-llama", max_tokens=3))
        assert isinstance(await answer(channel, "ok"), GenerateResult)
