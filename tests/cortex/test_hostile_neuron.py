"""A compromised or buggy neuron: it holds the join token, so it is admitted, and then
misbehaves. A real control server and gateway on 127.0.0.1:0; the hostile neuron is the
project's own join session and websocket client sending frames no honest neuron sends;
clients are the official ``openai`` client. What it says may not bill a key beyond what
the cortex can account for, crash a request, draw every request to itself, or break
``helexa status``."""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import trio

from helexa.protocol import (
    Cancel,
    EmbedRequest,
    EmbedResult,
    GenerateRequest,
    GenerateResult,
    InferenceError,
    GpuInfo,
    GpuUsage,
    Hardware,
    Heartbeat,
    ModelState,
    ModelStatus,
    NeuronDescriptor,
    NeuronMetrics,
    TokenChunk,
    Usage,
)
from helexa.protocol.join import NeuronJoin, Welcomed
from helexa.roles.cortex.config import CortexConfig
from helexa.roles.cortex.control_server import ControlServer
from helexa.roles.cortex.fleet import Fleet, Health
from helexa.roles.cortex.portal.store import SqliteStore
from helexa.status import render_fleet
from helexa.transport import Channel, ChannelClosed
from helexa.transport import websocket as ws
from helexa.transport.handshake import exchange
from portals import acme, bearer, new_key, portals
from serving import admin_headers

TOKEN = "hlx1.hostile-test-token"
BIG = 10**12

Answer = Callable[[Channel, GenerateRequest | EmbedRequest], Awaitable[None]]


async def control(nursery: trio.Nursery, fleet: Fleet) -> str:
    server = ControlServer(CortexConfig(control_socket="127.0.0.1:0", heartbeat_interval=0.5), fleet, lambda: TOKEN)
    port = await nursery.start(server.run)
    return f"ws://127.0.0.1:{port}"


async def hostile(url: str, answer: Answer | None = None, *, node_id: str = "evil",
                  metrics: NeuronMetrics = NeuronMetrics(), hardware: Hardware | None = None,
                  models: tuple[str, ...] = ("chat", "embed"), statuses: tuple[ModelStatus, ...] | None = None,
                  commands: Callable[[Channel, object], Awaitable[None]] | None = None,
                  task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Join ``url`` with the real token, heartbeat ``metrics`` with ``models`` loaded (or
    ``statuses``), ``answer`` every request it is sent and hand ``commands`` every other
    frame; returns when the cortex closes the connection. ``task_status.started`` gets the
    join's verdict."""
    statuses = statuses or tuple(ModelStatus(m, ModelState.LOADED) for m in models)
    descriptor = NeuronDescriptor(node_id, hardware or Hardware(cpu_cores=4, ram_total=8 << 30))
    async with ws.connect(url) as channel:
        session = NeuronJoin(TOKEN, descriptor, timeout=10, models=statuses)
        await exchange(channel, session, session.start())
        task_status.started(session.verdict)
        if not isinstance(session.verdict, Welcomed):
            return
        async with trio.open_nursery() as nursery:
            async def beat() -> None:
                seq = 0
                while True:
                    seq += 1
                    await channel.send(Heartbeat(seq, metrics, statuses))
                    await trio.sleep(0.2)

            nursery.start_soon(beat)
            try:
                while True:
                    msg = await channel.receive()
                    if isinstance(msg, (GenerateRequest, EmbedRequest)) and answer is not None:
                        nursery.start_soon(answer, channel, msg)
                    elif commands is not None:
                        nursery.start_soon(commands, channel, msg)
            except ChannelClosed:
                nursery.cancel_scope.cancel()


def client(url: str, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=10)


async def until(predicate: Callable[[], bool]) -> None:
    with trio.fail_after(10):
        while not predicate():
            await trio.sleep(0.01)


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


@pytest.mark.parametrize("node_id", ["evil\n12:00:00 INFO forged line", "", "n" * 10_000, "tab\there", "\u202eevil"])
async def test_a_node_id_no_log_line_can_carry_is_refused_at_the_hello(nursery, node_id):
    fleet = Fleet()
    url = await control(nursery, fleet)
    verdict = await nursery.start(lambda task_status: hostile(url, node_id=node_id, task_status=task_status))
    assert not isinstance(verdict, Welcomed) and verdict.code == "bad_request"
    assert len(fleet.snapshot()["neurons"]) == 0


async def test_a_model_id_with_an_escape_sequence_never_reaches_the_operators_terminal(nursery):
    from helexa.cli_models import _models_table

    fleet = Fleet()
    url = await control(nursery, fleet)
    sneaky = "\x1b[2J\x1b[Hall neurons healthy"
    nursery.start_soon(lambda: hostile(url, models=("chat", sneaky)))
    await until(lambda: "evil" in fleet and fleet.get("evil").heartbeats > 0)
    async with portals(fleet, {}) as (_, urls):
        async with httpx.AsyncClient() as http:
            fleet_view = (await http.get(urls["default"] + "/admin/fleet", headers=admin_headers())).json()
            models = (await http.get(urls["default"] + "/admin/models", headers=admin_headers())).json()["data"]
    status, listed = render_fleet(fleet_view), _models_table(models)  # helexa status, helexa models list
    # The cortex drops an unprintable model id from the neuron's reports (test_neuron_model_limits.py);
    # what the terminals show is escaped all the same (test_a_neurons_error_text_reaches_...).
    assert "\x1b" not in status and "all neurons healthy" not in status and "chat" in status
    assert "\x1b" not in listed and "all neurons healthy" not in listed


SNEAKY = "\x1b]0;owned\x07\x1b[2J\x1b[Hall neurons healthy"
"""Sets a terminal's title, clears its screen and writes a line of its own."""
FAILED = ModelStatus("chat", ModelState.FAILED, error=SNEAKY)


async def refuse_loads(channel: Channel, cmd: object) -> None:
    """A neuron's answers to provisioning: every load refused with :data:`SNEAKY` in its error."""
    from helexa.protocol import LoadModel, ProvisioningResponse, UpsertModelConfig

    if isinstance(cmd, UpsertModelConfig):
        await channel.send(ProvisioningResponse(cmd.command_id, True, status=FAILED))
    elif isinstance(cmd, LoadModel):
        await channel.send(ProvisioningResponse(cmd.command_id, False, "load failed " + SNEAKY, "load_failed", FAILED))


async def test_a_neurons_error_text_reaches_the_operators_terminal_escaped(nursery, tmp_path):
    from click.testing import CliRunner

    from helexa.cli import main
    from serving import ADMIN_TOKEN

    fleet = Fleet()
    url = await control(nursery, fleet)
    nursery.start_soon(lambda: hostile(url, statuses=(FAILED,), commands=refuse_loads))
    await until(lambda: "evil" in fleet and fleet.get("evil").heartbeats > 0)
    token = tmp_path / "admin-token"
    token.write_text(ADMIN_TOKEN)
    async with portals(fleet, {}) as (_, urls):
        def helexa(*args: str):  # noqa: ANN202
            return CliRunner().invoke(main, [*args, "--cortex", urls["default"], "--admin-token-file", str(token)])

        shown = await trio.to_thread.run_sync(helexa, "models", "show", "chat")
        loaded = await trio.to_thread.run_sync(helexa, "models", "load", "chat", "--neuron", "evil")
        unloaded = await trio.to_thread.run_sync(helexa, "models", "unload", "chat", "--neuron", "nobody\x1b[2J")
    assert shown.exit_code == 0 and loaded.exit_code == 1 and unloaded.exit_code == 1, (shown, loaded, unloaded)
    for out in (shown.stdout, loaded.stderr, unloaded.stderr):  # helexa models show, load (and an admin error)
        assert "\x1b" not in out and "\x07" not in out, out
    assert "evil: failed, in flight 0 (\\x1b]0;owned\\x07\\x1b[2J" in shown.stdout
    assert "load failed \\x1b]0;owned\\x07" in loaded.stderr
    assert "nobody\\x1b[2J" in unloaded.stderr


async def test_a_neurons_error_text_reaches_the_cortexs_log_escaped(nursery):
    import io

    from helexa import logs

    fleet = Fleet()
    url = await control(nursery, fleet)
    nursery.start_soon(lambda: hostile(url, statuses=(FAILED,), commands=refuse_loads))
    await until(lambda: "evil" in fleet and fleet.get("evil").heartbeats > 0)
    for fmt in ("text", "json"):
        out = io.StringIO()
        logs.setup("info", fmt, stream=out)
        try:
            async with portals(fleet, {}) as (_, urls), httpx.AsyncClient() as http:
                refused = await http.post(urls["default"] + "/admin/models/chat/load", json={"neuron": "evil"},
                                          headers=admin_headers())
                assert refused.status_code == 200 and "load failed" in refused.text  # the stream's error event
        finally:
            logs.setup("info")
        text = out.getvalue()
        assert "load failed" in text, fmt  # logged (the provisioner's warning)...
        assert "\x1b" not in text and "\x07" not in text, (fmt, text)  # ...with no escape a terminal would obey


async def test_an_answer_with_escape_sequences_reaches_helexa_chats_terminal_escaped(nursery):
    from click.testing import CliRunner

    from helexa.cli import main

    async def sneaky(channel: Channel, request) -> None:
        await channel.send(TokenChunk(request.request_id, "Paris\x1b]0;owned\x07", tokens=1))
        await channel.send(TokenChunk(request.request_id, "\x1b[2J\nis\tthe capital.", tokens=1))
        await channel.send(GenerateResult(request.request_id, "stop", Usage(1, 2, 0)))

    fleet = Fleet()
    url = await control(nursery, fleet)
    nursery.start_soon(hostile, url, sneaky)
    await until(lambda: "evil" in fleet)
    async with portals(fleet, {}) as (_, urls):
        args = ["chat", "--gateway", urls["default"], "--model", "chat", "--max-tokens", "8", "hi"]
        said = await trio.to_thread.run_sync(lambda: CliRunner().invoke(main, args))
    assert said.exit_code == 0, said.output
    assert "\x1b" not in said.stdout and "\x07" not in said.stdout
    assert said.stdout == "Paris\\x1b]0;owned\\x07\\x1b[2J\nis\tthe capital.\n"  # lines and tabs as they were


async def test_long_and_wide_names_from_a_neuron_keep_helexa_status_and_models_list_tables(nursery):
    from helexa.cli_models import _models_table
    from helexa.status import columns

    fleet = Fleet()
    url = await control(nursery, fleet)
    hardware = Hardware(cpu_cores=4, ram_total=8 << 30, gpus=(GpuInfo(0, "G" * 5000, 8 << 30, 4 << 30),))
    nursery.start_soon(lambda: hostile(url, node_id="节点一", models=("chat", "M" * 256), hardware=hardware))
    nursery.start_soon(lambda: hostile(url, node_id="n2"))
    await until(lambda: all(n in fleet and fleet.get(n).heartbeats > 0 for n in ("节点一", "n2")))
    async with portals(fleet, {}) as (_, urls):
        async with httpx.AsyncClient() as http:
            fleet_view = (await http.get(urls["default"] + "/admin/fleet", headers=admin_headers())).json()
            models = (await http.get(urls["default"] + "/admin/models", headers=admin_headers())).json()["data"]
    status, listed = render_fleet(fleet_view), _models_table(models)  # helexa status, helexa models list
    for out in (status, listed):  # every line was 5,000 columns wide (model ids: 256 at most now)
        assert max(columns(line) for line in out.splitlines()) < 500, out
    assert "M" * 95 + "…" in status and "M" * 95 + "…" in listed and "G" * 95 + "…" in status
    # a wide node id (two terminal columns a character) keeps the next column lined up
    lines = [line for line in status.splitlines() if not line.startswith("cortex ")]  # the table, not the version
    assert len({columns(line[:line.index(word)]) for line, word in zip(lines, ("HEALTH", "healthy", "healthy"))}) == 1


async def test_a_neuron_naming_new_models_each_heartbeat_does_not_grow_the_cortex(nursery):
    fleet = Fleet()
    url = await control(nursery, fleet)
    beats: list[tuple[str, ...]] = [tuple(f"m{b}-{i}" for i in range(500)) for b in range(20)]

    async def churn() -> None:
        descriptor = NeuronDescriptor("evil", Hardware(cpu_cores=4, ram_total=8 << 30))
        async with ws.connect(url) as channel:
            session = NeuronJoin(TOKEN, descriptor, timeout=10)
            await exchange(channel, session, session.start())
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
        descriptor = NeuronDescriptor("evil", Hardware(cpu_cores=4, ram_total=8 << 30))
        async with ws.connect(url) as channel:
            session = NeuronJoin(TOKEN, descriptor, timeout=10)
            await exchange(channel, session, session.start())
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
        descriptor = NeuronDescriptor(node_id, Hardware(cpu_cores=4, ram_total=8 << 30))
        async with ws.connect(url) as channel:
            session = NeuronJoin(TOKEN, descriptor, timeout=10)
            await exchange(channel, session, session.start())
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
