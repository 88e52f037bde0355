"""A compromised or buggy neuron (:mod:`hostile_neuron`): it holds the join token, so it
is admitted, and then misbehaves. A real control server and gateway on 127.0.0.1:0;
clients are the official ``openai`` client. What it says may not bill a key beyond what the
cortex can account for, crash a request, or draw every request to itself. (What its names
and text do to the operator's terminals and logs: ``test_hostile_neuron_text.py``.)"""

from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import trio

from helexa.protocol import (
    Cancel,
    EmbedRequest,
    EmbedResult,
    GenerateResult,
    InferenceError,
    GpuInfo,
    GpuUsage,
    Hardware,
    Heartbeat,
    ModelState,
    ModelStatus,
    NeuronMetrics,
    TokenChunk,
    Usage,
)
from helexa.roles.cortex.fleet import Fleet, Health
from helexa.roles.cortex.portal.store import SqliteStore
from helexa.status import render_fleet
from helexa.transport import Channel
from hostile_neuron import BIG, Answer, client, control, hostile, joined, until
from portals import acme, bearer, new_key, portals
from serving import admin_headers


async def test_a_neuron_claiming_a_huge_usage_bills_the_key_only_what_the_cortex_can_account_for(nursery):
    async def answer(channel: Channel, request) -> None:
        if isinstance(request, EmbedRequest):
            await channel.send(EmbedResult(request.request_id, 1, b"\0\0\0\0", Usage(BIG, BIG, 0)))
            return
        await channel.send(TokenChunk(request.request_id, "x", tokens=BIG))
        await channel.send(GenerateResult(request.request_id, "stop", Usage(BIG, BIG, BIG)))

    fleet = Fleet()
    url = await control(nursery, fleet)
    nursery.start_soon(hostile, url, answer)
    await until(lambda: "evil" in fleet)
    store = SqliteStore(":memory:")
    key = new_key(store, "acme", budget=100.0)
    async with portals(fleet, {"acme": acme()}, store=store) as (_, urls):
        def run():
            c = client(urls["acme"], key)
            answer = c.chat.completions.create(model="fast", messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=8)
            vectors = c.embeddings.create(model="embed", input=["a"], encoding_format="float")
            return answer, vectors

        answer_, vectors = await trio.to_thread.run_sync(run)
        async with httpx.AsyncClient() as http:
            mine = (await http.get(urls["acme"] + "/v1/usage", headers=bearer(key))).json()
    assert answer_.choices[0].message.content == "x"
    # One token a byte it sent (at most max_tokens); the prompt at most its own size bound.
    assert answer_.usage.completion_tokens == 1 and answer_.usage.prompt_tokens < 100
    assert vectors.usage.prompt_tokens < 100
    rows = store.records()
    assert len(rows) == 2 and all(r.prompt_tokens < 100 and r.completion_tokens <= 1 for r in rows)
    assert mine["spent"]["money"] < 1.0 and mine["remaining_budget"] > 99.0  # it was 2e9 EUR: the budget gone


async def test_a_negative_usage_closes_that_neuron_and_the_request_fails_cleanly(nursery):
    async def answer(channel: Channel, request) -> None:
        await channel.send(GenerateResult(request.request_id, "stop", Usage(-BIG, -BIG, -5), text="x"))

    fleet = Fleet()
    url = await control(nursery, fleet)
    nursery.start_soon(hostile, url, answer)
    await until(lambda: "evil" in fleet)
    async with portals(fleet, {}) as (_, urls):
        def run():
            with pytest.raises(openai.APIStatusError) as err:
                client(urls["default"]).chat.completions.create(
                    model="chat", messages=[{"role": "user", "content": "hi"}], max_tokens=8)
            return err.value

        err = await trio.to_thread.run_sync(run)
    # Not started, and no other neuron: a 503, never a 500 internal_error (a negative
    # counter increment raised), never a credit to the key.
    assert err.status_code == 503 and "internal" not in str(err.body)
    await until(lambda: not fleet.get("evil").connected)


async def test_an_embedding_for_a_generation_closes_the_neuron_and_another_serves_it(nursery):
    async def wrong_kind(channel: Channel, request) -> None:
        await channel.send(EmbedResult(request.request_id, 1, b"\0\0\0\0", Usage(1, 0, 0)))

    async def honest(channel: Channel, request) -> None:
        await channel.send(GenerateResult(request.request_id, "stop", Usage(3, 2, 0), text="ok go"))

    fleet = Fleet()
    url = await control(nursery, fleet)
    # The hostile one claims to be idle far below zero, so the scheduler picks it first.
    nursery.start_soon(hostile, url, wrong_kind)
    nursery.start_soon(lambda: hostile(url, honest, node_id="honest", models=("chat",)))
    await until(lambda: "evil" in fleet and "honest" in fleet)
    async with portals(fleet, {}) as (_, urls):
        def run():
            c = client(urls["default"])
            return [c.chat.completions.create(model="chat", messages=[{"role": "user", "content": "hi"}],
                                              max_tokens=8) for _ in range(3)]

        answers = await trio.to_thread.run_sync(run)
    assert [a.choices[0].message.content for a in answers] == ["ok go"] * 3  # an AssertionError made them 500s
    assert not fleet.get("evil").connected and fleet.get("honest").connected


async def test_a_neuron_streaming_past_max_tokens_is_cut_there_and_told_to_stop(nursery):
    cancelled = trio.Event()

    async def forever(channel: Channel, request) -> None:
        with trio.move_on_after(5):
            while True:
                await channel.send(TokenChunk(request.request_id, "y ", tokens=1))
                await trio.sleep(0)
        await channel.send(GenerateResult(request.request_id, "stop", Usage(1, 1, 0)))

    fleet = Fleet()
    url = await control(nursery, fleet)
    nursery.start_soon(hostile, url, forever)
    await until(lambda: "evil" in fleet)
    link = fleet.get("evil")
    real_send = link.channel.send

    async def send(msg, **kw):
        if type(msg).__name__ == "Cancel":
            cancelled.set()
        await real_send(msg, **kw)

    link.channel.send = send
    async with portals(fleet, {}) as (_, urls):
        def run():
            stream = client(urls["default"]).chat.completions.create(
                model="chat", messages=[{"role": "user", "content": "hi"}], max_tokens=5, stream=True,
                stream_options={"include_usage": True})
            return list(stream)

        chunks = await trio.to_thread.run_sync(run)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "y " * 5
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].usage.completion_tokens == 5
    with trio.fail_after(5):
        await cancelled.wait()


async def test_a_neuron_that_never_answers_a_whole_answer_times_it_out_at_the_first_token_deadline(nursery):
    # A non-streamed request's first-token deadline is kept by the link's watch (the control
    # server's watchdog, every heartbeat_interval / 2: 0.25 s here), not by a cancel scope
    # of the request's own (dispatch.py, Dispatching._whole); the neuron is told to stop.
    cancelled: list[str] = []

    async def silent(channel: Channel, request) -> None:
        await trio.sleep_forever()

    async def commands(channel: Channel, msg) -> None:
        if isinstance(msg, Cancel):
            cancelled.append(msg.request_id)

    fleet = Fleet()
    url = await control(nursery, fleet)
    nursery.start_soon(lambda: hostile(url, silent, commands=commands))
    await until(lambda: "evil" in fleet)
    async with portals(fleet, {}, orchestrator={"first_token_timeout": 1.0}) as (_, urls):
        def run():
            t0 = time.monotonic()
            with pytest.raises(openai.APIStatusError) as err:
                client(urls["default"]).chat.completions.create(
                    model="chat", messages=[{"role": "user", "content": "hi"}], max_tokens=8)
            return err.value, time.monotonic() - t0

        err, took = await trio.to_thread.run_sync(run)
    assert err.status_code == 504 and "did not start within 1s" in str(err.body)
    assert 1.0 <= took < 3.0
    await until(lambda: len(cancelled) == 1)
    link = fleet.get("evil")
    assert link.connected and link.in_flight == 0


async def test_nan_and_negative_figures_neither_draw_requests_nor_break_the_fleet_view(nursery):
    served: list[str] = []

    def answering(name: str) -> Answer:
        async def answer(channel: Channel, request) -> None:
            served.append(name)
            await trio.sleep(0.05)
            await channel.send(GenerateResult(request.request_id, "stop", Usage(3, 1, 0), text="x"))
        return answer

    fleet = Fleet()
    url = await control(nursery, fleet)
    lies = NeuronMetrics(cpu_percent=math.nan, ram_used=-100, in_flight=-5, queued=-10**9,
                         gpus=(GpuUsage(0, -9, -5, math.nan),))
    hw = Hardware(cpu_cores=-3, ram_total=-5, gpus=(GpuInfo(0, "g", -1, -1),))
    nursery.start_soon(lambda: hostile(url, answering("evil"), metrics=lies, hardware=hw, models=("chat",)))
    nursery.start_soon(lambda: hostile(url, answering("honest"), node_id="honest", models=("chat",)))
    await until(lambda: "evil" in fleet and "honest" in fleet and fleet.get("evil").heartbeats > 1)
    evil = fleet.get("evil")
    assert (evil.metrics.queued, evil.metrics.in_flight, evil.metrics.cpu_percent) == (0, 0, 0.0)
    assert evil.descriptor.hardware.ram_total == 0 and evil.descriptor.hardware.cpu_cores == 0
    render_fleet(fleet.snapshot())  # helexa status: a NaN cpu_percent was a TypeError traceback
    async with portals(fleet, {}) as (_, urls):
        def run():
            c = client(urls["default"])
            with ThreadPoolExecutor(4) as pool:
                list(pool.map(lambda _: c.chat.completions.create(
                    model="chat", messages=[{"role": "user", "content": "hi"}], max_tokens=8), range(8)))

        await trio.to_thread.run_sync(run)
        async with httpx.AsyncClient() as http:
            metrics = await http.get(urls["default"] + "/metrics", headers=admin_headers())
    assert "honest" in served  # queued -10**9 drew every request to the liar
    assert metrics.status_code == 200 and 'helexa_neuron_queued_requests{neuron="evil"} 0.0' in metrics.text


async def test_a_neuron_naming_new_models_each_heartbeat_does_not_grow_the_cortex(nursery):
    fleet = Fleet()
    url = await control(nursery, fleet)
    beats: list[tuple[str, ...]] = [tuple(f"m{b}-{i}" for i in range(500)) for b in range(20)]

    async def churn() -> None:
        async with joined(url) as (channel, _):
            for seq, names in enumerate(beats):
                await channel.send(Heartbeat(seq, NeuronMetrics(), tuple(ModelStatus(m, ModelState.LOADED)
                                                                           for m in names)))
            await trio.sleep_forever()

    nursery.start_soon(churn)
    await until(lambda: "evil" in fleet and fleet.get("evil").heartbeats == len(beats))
    link = fleet.get("evil")
    assert set(link.models) == set(beats[-1])
    assert len(link.loaded_since) == 500  # 10,000 before: every id any heartbeat ever named, for the connection's life


async def test_frames_for_another_neurons_request_never_reach_its_client(nursery):
    fleet = Fleet()
    url = await control(nursery, fleet)
    evil_channel: list[Channel] = []
    injected = trio.Event()

    async def honest(channel: Channel, request) -> None:
        # The liar learns this request's id (as if it could guess it) and answers it first.
        rid = request.request_id
        evil = evil_channel[0]
        await evil.send(TokenChunk(rid, "INJECTED", tokens=BIG))
        await evil.send(InferenceError(rid, "backend_crashed", "injected", retryable=False))
        await evil.send(GenerateResult(rid, "stop", Usage(BIG, BIG, 0), text="INJECTED"))
        await trio.sleep(0.2)  # the cortex read them (or not) before the real answer
        injected.set()
        await channel.send(TokenChunk(rid, "real ", tokens=1))
        await channel.send(GenerateResult(rid, "stop", Usage(3, 2, 0), text="answer"))

    async def evil_joined(task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with joined(url) as (channel, _):
            evil_channel.append(channel)
            seq = 0
            while True:
                seq += 1
                await channel.send(Heartbeat(seq, NeuronMetrics()))
                await trio.sleep(0.2)

    nursery.start_soon(evil_joined)
    nursery.start_soon(lambda: hostile(url, honest, node_id="honest", models=("chat",)))
    await until(lambda: "evil" in fleet and "honest" in fleet and bool(evil_channel))
    async with portals(fleet, {}) as (_, urls):
        def run():
            return client(urls["default"]).chat.completions.create(
                model="chat", messages=[{"role": "user", "content": "hi"}], max_tokens=8)

        answer = await trio.to_thread.run_sync(run)
    assert injected.is_set()
    assert answer.choices[0].message.content == "real answer" and answer.usage.completion_tokens == 2
    assert fleet.get("honest").models["chat"].state is ModelState.LOADED  # the injected crash did not count


async def test_neurons_that_fall_silent_and_read_nothing_do_not_hold_up_the_watch_on_the_others(nursery):
    fleet = Fleet()
    url = await control(nursery, fleet)  # silence: 3 intervals of 0.5 s
    names = [f"mute{i}" for i in range(6)]

    async def mute(node_id: str) -> None:
        """Joins, beats twice, then neither beats nor reads (so never answers the close)."""
        async with joined(url, node_id) as (channel, _):
            for seq in range(2):
                await channel.send(Heartbeat(seq, NeuronMetrics()))
                await trio.sleep(0.1)
            await trio.sleep_forever()

    for name in names:
        nursery.start_soon(mute, name)
    await until(lambda: all(n in fleet and fleet.get(n).heartbeats == 2 for n in names))
    went_silent = trio.current_time()
    await until(lambda: all(fleet.get(n).health is Health.UNHEALTHY for n in names))
    # Judged 1.5 s after its last beat. One close waits up to 2 s for an answer: one after
    # another, the sixth was judged (and its requests sent on meanwhile) 10 s late.
    assert trio.current_time() - went_silent < 4
    await until(lambda: all(not fleet.get(n).connected for n in names))
