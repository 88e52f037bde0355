"""A backend in a worker process (helexa/runtime/worker): how it fails, and its deadlines
(its frames on their way, the writer and the pipe: ``test_worker_pipe.py``).

Its behaviour when it works is the conformance suite's (test_conformance.py runs every
backend kind in a worker too). Real worker processes, so the real clock: each deadline here
is set short and the test waits for the outcome, never for a time.
"""

from __future__ import annotations

import os
import signal
import stat
import sys
from contextlib import aclosing, suppress

import pytest
import trio

from helexa.protocol import GenerateRequest, GenerateResult, ModelConfig, ModelState, SamplingParams, Task, TokenChunk
from helexa.runtime import BackendCrashed, LoadFailed
from helexa.runtime.synthetic import SyntheticBackend
from helexa.runtime.worker import WorkerBackend, WorkerSettings, backend_for, isolated


def slow(model_id: str = "s", **metadata) -> ModelConfig:
    return ModelConfig(model_id, "synthetic", metadata={"isolate": True, "tokens": 100_000,
                                                        "tokens_per_second": 200, **metadata})


def chat(rid: str = "r1", max_tokens: int | None = None) -> GenerateRequest:
    return GenerateRequest(rid, "s", Task.CHAT, messages=({"role": "user", "content": "hi"},),
                           sampling=SamplingParams(max_tokens=max_tokens))


async def loaded(nursery, config: ModelConfig, settings: WorkerSettings | None = None) -> WorkerBackend:
    backend = WorkerBackend(config, settings)
    backend.service_nursery = nursery
    await backend.load(lambda *a: None)
    return backend


# --- which models get a worker -------------------------------------------------------------


def test_engines_run_in_workers_and_the_fabric_only_kinds_in_process():
    assert isolated(ModelConfig("m", "llama_cpp"))
    assert isolated(ModelConfig("m", "embeddings"))
    assert isolated(ModelConfig("m", "exllamav2"))
    assert not isolated(ModelConfig("m", "synthetic"))
    assert not isolated(ModelConfig("m", "openai_proxy"))
    assert isolated(ModelConfig("m", "synthetic", metadata={"isolate": True}))
    assert not isolated(ModelConfig("m", "llama_cpp", metadata={"isolate": False}))
    assert isinstance(backend_for(ModelConfig("m", "synthetic")), SyntheticBackend)
    assert isinstance(backend_for(ModelConfig("m", "llama_cpp")), WorkerBackend)


def test_isolate_must_be_a_bool_and_an_unknown_kind_fails_without_a_process():
    with pytest.raises(LoadFailed) as err:
        isolated(ModelConfig("m", "llama_cpp", metadata={"isolate": "no"}))
    assert err.value.code == "invalid_config" and "metadata.isolate" in str(err.value)
    with pytest.raises(LoadFailed) as err:
        backend_for(ModelConfig("m", "teleporter"))
    assert err.value.code == "unknown_backend"


def test_a_worker_backend_needs_a_service_nursery():
    with pytest.raises(LoadFailed, match="service nursery"):
        trio.run(WorkerBackend(ModelConfig("m", "synthetic")).load, lambda *a: None)


# --- failures --------------------------------------------------------------------------------


async def test_a_failed_load_reports_the_backends_own_reason_and_the_worker_exits(nursery, tmp_path):
    backend = WorkerBackend(ModelConfig("m", "llama_cpp", metadata={"path": str(tmp_path / "nope.gguf")}))
    backend.service_nursery = nursery
    with pytest.raises(LoadFailed) as err:
        await backend.load(lambda *a: None)
    assert err.value.code == "model_not_found" and "nope.gguf" in str(err.value)
    pid = backend.pid
    await backend.unload()  # what the registry does after a failed load
    assert not _alive(pid)


async def test_progress_from_inside_the_worker_reaches_the_loader(nursery, tiny_gguf):
    from helexa.runtime.testing import tiny_llama_config

    seen = []
    backend = WorkerBackend(tiny_llama_config(tiny_gguf))
    backend.service_nursery = nursery
    await backend.load(lambda *args: seen.append(args))
    size = tiny_gguf.stat().st_size
    assert seen == [("load", 0, size, "bytes"), ("load", size, size, "bytes")]
    assert backend.memory_bytes() == size
    await backend.unload()
    assert backend.memory_bytes() == 0


async def test_a_worker_killed_mid_stream_ends_the_stream_and_reports_the_model_failed(nursery):
    backend = await loaded(nursery, slow())
    reported = []
    backend.status_listener = reported.append
    events = []
    with trio.fail_after(30), pytest.raises(BackendCrashed) as err:
        async with aclosing(backend.chat(chat())) as it:
            async for event in it:
                events.append(event)
                if len(events) == 1:
                    os.kill(backend.pid, signal.SIGKILL)
    assert events and all(isinstance(e, TokenChunk) for e in events)
    assert err.value.code == "backend_crashed" and "SIGKILL" in str(err.value)
    assert [(s.state, s.error) for s in reported] == [(ModelState.FAILED, str(err.value))]
    # Later requests fail at once, with the same reason.
    with pytest.raises(BackendCrashed):
        async with aclosing(backend.chat(chat("r2"))) as it:
            async for _ in it:
                pass
    await backend.unload()  # idempotent after a death


async def test_a_native_crash_is_named_by_its_signal(nursery):
    backend = await loaded(nursery, slow())
    with trio.fail_after(30), pytest.raises(BackendCrashed, match=r"crashed \(SIGSEGV\)"):
        async with aclosing(backend.chat(chat())) as it:
            async for _ in it:
                os.kill(backend.pid, signal.SIGSEGV)
    await backend.unload()


async def test_requests_waiting_on_a_worker_that_dies_are_retryable_elsewhere(nursery):
    # 2 s per token: the requests are in the worker, with nothing of their answers sent.
    backend = await loaded(nursery, slow(tokens_per_second=0.5))
    errors = []

    async def one(rid: str) -> None:
        try:
            async with aclosing(backend.chat(chat(rid))) as it:
                async for _ in it:
                    pass
        except BackendCrashed as exc:
            errors.append(exc)

    with trio.fail_after(30):
        async with trio.open_nursery() as inner:
            for i in range(3):
                inner.start_soon(one, f"r{i}")
            while backend.in_flight < 3:  # waiting for the requests to be sent, not for a time
                await trio.sleep(0.01)
            os.kill(backend.pid, signal.SIGKILL)
    assert len(errors) == 3 and all(e.retryable for e in errors)
    await backend.unload()


async def test_a_worker_that_dies_while_loading_fails_the_load(nursery):
    backend = WorkerBackend(slow(load_seconds=60))
    backend.service_nursery = nursery
    progress = trio.Event()
    errors: list[LoadFailed] = []

    async def load() -> None:
        try:
            await backend.load(lambda *a: progress.set())
        except LoadFailed as exc:
            errors.append(exc)

    with trio.fail_after(30):
        async with trio.open_nursery() as inner:
            inner.start_soon(load)
            await progress.wait()  # the load has begun in the worker
            os.kill(backend.pid, signal.SIGKILL)
    assert [e.code for e in errors] == ["backend_crashed"] and "SIGKILL" in str(errors[0])
    await backend.unload()


async def test_a_load_past_its_deadline_is_killed(nursery):
    backend = WorkerBackend(slow(load_seconds=60), WorkerSettings(load_timeout=0.5))
    backend.service_nursery = nursery
    with trio.fail_after(30), pytest.raises(LoadFailed) as err:
        await backend.load(lambda *a: None)
    assert err.value.code == "backend_crashed" and "did not load within 0.5 s" in str(err.value)
    assert not _alive(backend.pid)


async def test_a_worker_that_never_starts_is_killed_at_the_start_deadline(nursery, tmp_path):
    silent = tmp_path / "python"
    silent.write_text("#!/bin/sh\nexec sleep 60\n")
    silent.chmod(silent.stat().st_mode | stat.S_IEXEC)
    backend = WorkerBackend(slow(), WorkerSettings(python=str(silent), start_timeout=0.5))
    backend.service_nursery = nursery
    with trio.fail_after(30), pytest.raises(LoadFailed) as err:
        await backend.load(lambda *a: None)
    assert "did not start within 0.5 s" in str(err.value)
    assert not _alive(backend.pid)


async def test_a_worker_that_breaks_the_protocol_is_killed(nursery, tmp_path):
    rogue = tmp_path / "python"
    rogue.write_text(f"#!{sys.executable}\n"
                     "import socket, sys, time\n"
                     "s = socket.socket(fileno=int(sys.argv[sys.argv.index('--fd') + 1]))\n"
                     "s.sendall(b'\\x00\\x00\\x00\\x03\\xc1\\xc1\\xc1')\n"
                     "time.sleep(60)\n")
    rogue.chmod(rogue.stat().st_mode | stat.S_IEXEC)
    backend = WorkerBackend(slow(), WorkerSettings(python=str(rogue)))
    backend.service_nursery = nursery
    with trio.fail_after(30), pytest.raises(LoadFailed) as err:
        await backend.load(lambda *a: None)
    assert err.value.code == "backend_crashed" and "broke the protocol" in str(err.value)
    assert not _alive(backend.pid)


async def test_a_frozen_worker_is_killed_after_ping_timeout_and_its_stream_ends(nursery):
    backend = await loaded(nursery, slow(), WorkerSettings(ping_interval=0.1, ping_timeout=1.0))
    with trio.fail_after(30), pytest.raises(BackendCrashed) as err:
        async with aclosing(backend.chat(chat())) as it:
            async for _ in it:
                os.kill(backend.pid, signal.SIGSTOP)
    assert "did not answer for" in str(err.value) and "ping_timeout 1 s" in str(err.value)
    assert not _alive(backend.pid)
    await backend.unload()


async def test_a_busy_worker_is_not_mistaken_for_a_hung_one(nursery):
    # Pings are answered while a request streams: a deadline shorter than the stream holds.
    backend = await loaded(nursery, slow(), WorkerSettings(ping_interval=0.05, ping_timeout=0.5))
    with trio.fail_after(30):
        async with aclosing(backend.chat(chat(max_tokens=400))) as it:  # 2 s at 200 tokens/s
            events = [e async for e in it]
    assert isinstance(events[-1], GenerateResult) and events[-1].usage.completion_tokens == 400
    await backend.unload()


async def test_a_cancelled_load_leaves_no_process_behind(nursery):
    backend = WorkerBackend(slow(load_seconds=60))
    backend.service_nursery = nursery
    with trio.move_on_after(30):
        async with trio.open_nursery() as inner:
            started = trio.Event()
            inner.start_soon(backend.load, lambda *a: started.set())
            await started.wait()
            inner.cancel_scope.cancel()
    await backend.unload()  # what the registry does when a load is cancelled
    assert not _alive(backend.pid)


# --- the worker's logs ------------------------------------------------------------------------


def _alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(") ")[1][0] != "Z"


async def test_what_the_worker_and_its_native_code_write_comes_back_through_the_neurons_logger(
        nursery, tiny_gguf, caplog):
    from helexa.runtime.testing import tiny_llama_config

    config = tiny_llama_config(tiny_gguf)
    with caplog.at_level("INFO", logger="helexa.worker"):
        backend = WorkerBackend(config)
        backend.service_nursery = nursery
        await backend.load(lambda *args: None)
        await backend.unload()
    lines = [r.getMessage() for r in caplog.records if r.name == "helexa.worker"]
    assert lines and all(line.startswith(f"[{config.model_id}] ") for line in lines)
    assert any("llama" in line for line in lines), lines[:5]  # llama.cpp's own stderr, not only Python's


@pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="SCHED_BATCH is Linux's")
def test_under_batch_a_llama_cpp_worker_relays_in_batch_and_llama_cpps_loop_runs_normal(tiny_gguf):
    """A neuron under ``cpu_policy = "batch"`` (here: the thread that runs trio) starts its
    worker under it; in the worker, llama.cpp's loop thread (the thread that decoded: the
    most CPU after the main thread's start) runs under the normal policy, and the worker's own threads, those that relay
    each request's chunks among them, under batch."""
    import threading
    from pathlib import Path

    from helexa.runtime import cpu_policy
    from helexa.runtime.testing import tiny_llama_config

    def policies(pid: int) -> list[tuple[int, int, int]]:
        """(CPU ns, policy, tid) of each of ``pid``'s threads, most CPU first."""
        out = []
        for task in Path(f"/proc/{pid}/task").iterdir():
            with suppress(OSError, ValueError):
                out.append((int((task / "schedstat").read_text().split()[0]), os.sched_getscheduler(int(task.name)),
                            int(task.name)))
        return sorted(out, reverse=True)

    async def scenario() -> tuple[int, list[tuple[int, int, int]], set[int]]:
        async with trio.open_nursery() as nursery:
            backend = await loaded(nursery, tiny_llama_config(tiny_gguf))
            try:
                request = GenerateRequest("b", tiny_llama_config(tiny_gguf).model_id, Task.CHAT,
                                          messages=({"role": "user", "content": "hi"},),
                                          sampling=SamplingParams(max_tokens=48, temperature=0.0))
                before: dict[int, int] = {}
                for _ in range(2):  # the second request's CPU only: the first one's includes one-time work
                    before = {tid: ns for ns, _, tid in policies(backend.pid)}  # (its prompt counter's vocabulary)
                    with trio.fail_after(60):
                        async with aclosing(backend.chat(request)) as events:
                            async for _ in events:
                                pass
                after = [(ns - before.get(tid, 0), policy, tid) for ns, policy, tid in policies(backend.pid)]
                relays = set()  # trio's own threads (the one that calls llama.cpp relays its chunks)
                for task in Path(f"/proc/{backend.pid}/task").iterdir():
                    with suppress(OSError, ValueError):
                        if (task / "comm").read_text().startswith("Trio thread"):
                            relays.add(int(task.name))
                return backend.pid, sorted(after, reverse=True), relays
            finally:
                await backend.unload()

    out: list = []

    def run() -> None:
        cpu_policy.apply("batch")
        out.append(trio.run(scenario))

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    pid, threads, relays = out[0]
    # The decode: the most CPU in the request of the engine's own threads (a tiny model's
    # chunks can cost the relaying trio thread more than their decode).
    loop = next(policy for _, policy, tid in threads if tid != pid and tid not in relays)
    assert loop == os.SCHED_OTHER, threads
    main = next(policy for _, policy, tid in threads if tid == pid)
    assert main == os.SCHED_BATCH, threads  # the worker's trio thread
    assert sum(policy == os.SCHED_BATCH for _, policy, _ in threads) >= 2, threads  # and those it started


async def test_a_request_whose_engine_cannot_cancel_it_gets_its_worker_restarted(nursery, tiny_gguf, caplog):
    """llama.cpp's JSON-schema-to-grammar converter never returns on this schema (a string
    with minLength above maxLength; the cortex refuses it at the edge, but other schemas may
    hang it too), and nothing can cancel it: its slot would never come back. Past
    ``cancel_grace`` after the cancel the worker is killed, its other requests fail as in
    a crash (retryable), and a new worker serves the model."""
    from helexa.protocol import OutputFormat, ResponseFormat
    from helexa.runtime.testing import tiny_llama_config

    config = tiny_llama_config(tiny_gguf, cancel_grace=2)
    backend = await loaded(nursery, config)
    reported = []
    backend.status_listener = reported.append
    pid = backend.pid

    def request(rid: str, **kw) -> GenerateRequest:
        return GenerateRequest(rid, config.model_id, Task.CHAT, messages=({"role": "user", "content": "hi"},),
                               sampling=SamplingParams(max_tokens=8, temperature=0.0), **kw)

    hanging = request("wedge", response_format=ResponseFormat(
        OutputFormat.JSON_SCHEMA, {"type": "string", "minLength": 5, "maxLength": 2}))

    async def drain(req: GenerateRequest) -> None:
        async with aclosing(backend.chat(req)) as it:
            async for _ in it:
                pass

    with trio.move_on_after(3) as hung:  # the converter never returns: nothing comes back
        await drain(hanging)
    assert hung.cancelled_caught, "the schema no longer hangs llama.cpp: find another one for this test"
    with trio.fail_after(10):  # the cancel's grace (2 s) ran out: the worker is killed, then reaped
        while backend.crash_reason is None:
            await trio.sleep(0.05)
    assert "request wedge" in backend.crash_reason and "wedged" in backend.crash_reason
    assert not _alive(pid)
    assert [s.state for s in reported] == [ModelState.FAILED]
    assert any("wedge" in r.getMessage() and config.model_id in r.getMessage() and r.levelname == "WARNING"
               for r in caplog.records)
    with pytest.raises(BackendCrashed) as err:  # later requests on the dead worker: retryable elsewhere
        await drain(request("after"))
    assert err.value.retryable
    await backend.unload()
    # What the registry does on the next load: a new worker, which serves.
    fresh = await loaded(nursery, config)
    try:
        with trio.fail_after(60):
            async with aclosing(fresh.chat(request("ok"))) as it:
                events = [e async for e in it]
        assert isinstance(events[-1], GenerateResult)
    finally:
        await fresh.unload()


@pytest.mark.parametrize("grace", ["5", 0, -1, True, float("inf")])
def test_a_cancel_grace_that_is_not_a_positive_number_is_refused(grace):
    with pytest.raises(LoadFailed, match="cancel_grace") as err:
        WorkerBackend(slow(cancel_grace=grace))
    assert err.value.code == "invalid_config"
    # In the neuron's own process too (where a wedged engine marks the model failed), at the load.
    with pytest.raises(LoadFailed, match="cancel_grace") as err:
        backend_for(ModelConfig("s", "synthetic", metadata={"isolate": False, "cancel_grace": grace}))
    assert err.value.code == "invalid_config"
