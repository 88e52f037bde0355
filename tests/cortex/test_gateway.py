"""The HTTP API end to end on a real socket, with in-memory neuron doubles behind it.

The official ``openai`` client (sync, run in a thread) is the client wherever it can say
what is being tested; httpx and a raw socket are used for status codes, headers and
disconnects.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import openai
import pytest
import trio

from helexa.roles.cortex.catalogue import Catalogue, CatalogueEntry, Workload
from helexa.roles.cortex.fleet import Fleet
from helexa.roles.cortex.gateway import Gateway
from neuron_double import NeuronDouble, hardware
from serving import admin_headers, build
from serving import serving as serve

CATALOGUE = Catalogue([
    CatalogueEntry(id="chat", backend="synthetic", memory_mb=500, max_output=64),
    CatalogueEntry(id="embed", backend="embeddings", memory_mb=100, workloads=(Workload.EMBEDDING,)),
    CatalogueEntry(id="gpu-only", backend="exllamav2", memory_mb=20_000, min_devices=1),
])


@asynccontextmanager
async def serving(fleet: Fleet, catalogue: Catalogue = CATALOGUE, **config) -> AsyncIterator[tuple[Gateway, str]]:
    async with serve(fleet, catalogue, **config) as served:
        yield served


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=10)


def in_thread(fn, *args):
    return trio.to_thread.run_sync(fn, *args)


def sse_events(text: str) -> list[object]:
    out: list[object] = []
    for block in text.split("\n\n"):
        if block.startswith("data: "):
            payload = block[6:]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
        elif block.startswith(":"):
            out.append("comment")
    return out


# --- the official client -----------------------------------------------------------------


async def test_the_models_list_is_the_union_of_feasible_catalogue_and_loaded_models() -> None:
    fleet = Fleet()
    NeuronDouble("cpu1", fleet, loaded=("embed", "foreign"))
    NeuronDouble("cpu2", fleet, hw=hardware(ram_gb=1))
    async with serving(fleet) as (_, url):
        ids = await in_thread(lambda: [m.id for m in client(url).models.list()])
        async with httpx.AsyncClient() as http:
            data = {m["id"]: m for m in (await http.get(url + "/v1/models")).json()["data"]}
    assert ids == ["chat", "embed", "foreign"]  # gpu-only is feasible nowhere
    assert data["chat"]["loaded"] is False and data["chat"]["feasible_on"] == ["cpu1", "cpu2"]
    assert data["embed"]["loaded"] is True and data["embed"]["locations"] == ["cpu1"]
    assert data["foreign"]["locations"] == ["cpu1"] and data["foreign"]["object"] == "model"


async def test_the_official_client_streams_chat_after_a_cold_load() -> None:
    fleet = Fleet()
    neuron = NeuronDouble("n1", fleet, tokens=4)
    async with serving(fleet) as (_, url):
        def run() -> tuple[list[str], list[object]]:
            stream = client(url).chat.completions.create(
                model="chat", messages=[{"role": "user", "content": "hi"}], stream=True,
                stream_options={"include_usage": True})
            parts, finishes = [], []
            usage = None
            for chunk in stream:
                if chunk.usage is not None:
                    usage = chunk.usage
                for choice in chunk.choices:
                    parts.append(choice.delta.content or "")
                    finishes.append(choice.finish_reason)
            return parts, [finishes[-1], usage.completion_tokens]

        parts, (finish, completion_tokens) = await in_thread(run)
    assert "".join(parts) == "t0 t1 t2 t3 " and finish == "stop" and completion_tokens == 4
    assert neuron.loads() == ["chat"]


async def test_non_streaming_chat_and_completions() -> None:
    fleet = Fleet()
    NeuronDouble("n1", fleet, loaded=("chat",), tokens=3)
    async with serving(fleet) as (_, url):
        def run():
            c = client(url)
            chat = c.chat.completions.create(model="chat", messages=[{"role": "user", "content": "x"}], max_tokens=2)
            text = c.completions.create(model="chat", prompt="p")
            streamed = "".join(ch.choices[0].text for ch in c.completions.create(model="chat", prompt="p", stream=True)
                               if ch.choices)
            return chat, text, streamed

        chat, text, streamed = await in_thread(run)
    assert chat.choices[0].message.content == "t0 t1 " and chat.choices[0].finish_reason == "length"
    assert chat.usage.completion_tokens == 2
    assert text.choices[0].text == "t0 t1 t2 " and streamed == "t0 t1 t2 "


@pytest.mark.parametrize("prompt", ["", [""]])
async def test_an_empty_completion_prompt_is_a_400_naming_prompt_and_no_neuron_sees_it(prompt) -> None:
    # llama.cpp answered "" with an empty completion of 0 tokens (SmolLM2 adds no BOS).
    fleet = Fleet()
    neuron = NeuronDouble("n1", fleet, loaded=("chat",))
    async with serving(fleet) as (_, url):
        with pytest.raises(openai.BadRequestError) as info:
            await in_thread(lambda: client(url).completions.create(model="chat", prompt=prompt, max_tokens=4))
        spaced = await in_thread(lambda: client(url).completions.create(model="chat", prompt=" ", max_tokens=4))
    assert info.value.body["param"] == "prompt" and "must not be empty" in info.value.body["message"]
    assert spaced.choices[0].text and len(neuron.generations) == 1  # a space is a prompt


async def test_embeddings_as_floats_and_base64() -> None:
    fleet = Fleet()
    NeuronDouble("n1", fleet, loaded=("embed",))
    async with serving(fleet) as (_, url):
        def run():
            c = client(url)
            floats = c.embeddings.create(model="embed", input=["a", "b"], encoding_format="float")
            decoded = c.embeddings.create(model="embed", input=["a", "b"])  # the client asks for base64
            return floats, decoded

        floats, decoded = await in_thread(run)
    assert [d.embedding for d in floats.data] == [[0.0, 1.0, 2.0], [1.0, 2.0, 3.0]]
    assert [d.embedding for d in decoded.data] == [[0.0, 1.0, 2.0], [1.0, 2.0, 3.0]]


# --- the orchestrator through HTTP -------------------------------------------------------


async def test_twenty_concurrent_first_requests_cold_load_once() -> None:
    fleet = Fleet()
    neuron = NeuronDouble("n1", fleet, load_delay=0.3)
    async with serving(fleet) as (_, url):
        statuses = []
        async with httpx.AsyncClient(timeout=10) as http:
            async def one() -> None:
                r = await http.post(url + "/v1/chat/completions",
                                    json={"model": "chat", "messages": [{"role": "user", "content": "x"}]})
                statuses.append(r.status_code)

            async with trio.open_nursery() as nursery:
                for _ in range(20):
                    nursery.start_soon(one)
    assert statuses == [200] * 20
    assert neuron.loads() == ["chat"] and len(neuron.finished) == 20


async def test_a_request_not_started_fails_over_to_another_neuron() -> None:
    fleet = Fleet()
    dying = NeuronDouble("a", fleet, loaded=("chat",))
    dying.fail_before_start = True
    healthy = NeuronDouble("b", fleet, loaded=("chat",))
    async with serving(fleet) as (gateway, url):
        gateway.orchestrator.live.begin("b", "chat", 0.0)  # make b look busier, so a is tried first
        text = await in_thread(lambda: client(url).chat.completions.create(
            model="chat", messages=[{"role": "user", "content": "x"}]).choices[0].message.content)
    assert text == "t0 t1 t2 "
    assert len(dying.generations) == 1 and len(healthy.finished) == 1


async def test_a_retryable_refusal_fails_over_too() -> None:
    fleet = Fleet()
    busy = NeuronDouble("a", fleet, loaded=("chat",))
    busy.retryable_error = True
    NeuronDouble("b", fleet, loaded=("chat",))
    async with serving(fleet) as (gateway, url):
        gateway.orchestrator.live.begin("b", "chat", 0.0)
        async with httpx.AsyncClient() as http:
            r = await http.post(url + "/v1/completions", json={"model": "chat", "prompt": "x"})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "t0 t1 t2 "


async def test_a_neuron_dying_mid_stream_ends_the_stream_with_an_error_event() -> None:
    fleet = Fleet()
    neuron = NeuronDouble("n1", fleet, loaded=("chat",), tokens=100, token_delay=0.05)
    async with serving(fleet) as (_, url):
        async with httpx.AsyncClient(timeout=5) as http:
            async with http.stream("POST", url + "/v1/chat/completions", json={
                    "model": "chat", "stream": True, "messages": [{"role": "user", "content": "x"}]}) as r:
                body = ""
                async for text in r.aiter_text():
                    body += text
                    if "t1 " in body and neuron.health.value == "healthy":
                        neuron.kill()
        events = sse_events(body)
        assert r.status_code == 200
        assert events[-1]["error"]["code"] == "neuron_gone" and "[DONE]" not in events

        neuron2 = NeuronDouble("n2", fleet, loaded=("chat",), tokens=100, token_delay=0.05)

        def official() -> str:
            stream = client(url).chat.completions.create(
                model="chat", messages=[{"role": "user", "content": "x"}], stream=True)
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content == "t1 ":
                    trio.from_thread.run_sync(neuron2.kill)
            return "no error"

        with pytest.raises(openai.APIError, match="went away"):
            await in_thread(official)


async def test_a_client_disconnect_cancels_the_generation() -> None:
    fleet = Fleet()
    neuron = NeuronDouble("n1", fleet, loaded=("chat",), tokens=1000, token_delay=0.02)
    async with serving(fleet) as (_, url):
        host, port = url.removeprefix("http://").rsplit(":", 1)
        body = json.dumps({"model": "chat", "stream": True, "messages": [{"role": "user", "content": "x"}]})
        stream = await trio.open_tcp_stream(host, int(port))
        await stream.send_all(
            f"POST /v1/chat/completions HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\n\r\n{body}".encode())
        received = b""
        while b"t2 " not in received:
            received += await stream.receive_some()
        await stream.aclose()
        with trio.fail_after(2):
            while not neuron.cancelled:
                await trio.sleep(0.01)
    assert neuron.cancelled == neuron.generations and neuron.in_flight == 0 and not neuron.finished


async def test_a_stream_waiting_for_a_cold_load_gets_keep_alive_comments(autojump_clock) -> None:
    fleet = Fleet()
    NeuronDouble("n1", fleet, load_delay=3.5)
    async with serving(fleet, orchestrator={"keepalive_interval": 1.0}) as (_, url):
        async with httpx.AsyncClient(timeout=5) as http:
            r = await http.post(url + "/v1/chat/completions", json={
                "model": "chat", "stream": True, "messages": [{"role": "user", "content": "x"}]})
    events = sse_events(r.text)
    assert events[:3] == ["comment"] * 3 and r.text.startswith(": loading chat: ")  # at t = 1, 2 and 3 s
    assert events[3]["choices"][0]["delta"]["role"] == "assistant" and events[-1] == "[DONE]"


# --- errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "content", "status", "code"),
    [
        ("POST", "/v1/chat/completions", b"{nope", 400, None),
        ("POST", "/v1/chat/completions", b'{"model": "chat", "messages": "hi"}', 400, None),
        ("POST", "/v1/chat/completions", b'{"model": "chat", "messages": [{"role": "user", "content": "x"}],'
                                         b' "max_tokens": 1000}', 400, None),
        ("POST", "/v1/chat/completions", b'{"model": "nope", "messages": [{"role": "user", "content": "x"}]}',
         404, "model_not_found"),
        ("POST", "/v1/chat/completions", b'{"model": "nope", "stream": true, '
                                         b'"messages": [{"role": "user", "content": "x"}]}', 404, "model_not_found"),
        ("POST", "/v1/embeddings", b'{"model": "nope", "input": "x"}', 404, "model_not_found"),
        ("POST", "/v1/completions", b'{"model": "chat", "prompt": "' + b"x" * 5000 + b'"}', 413, "payload_too_large"),
        ("POST", "/v1/chat/completions", b'{"model": "gpu-only", "stream": true, '
                                         b'"messages": [{"role": "user", "content": "x"}]}', 503, "no_capacity"),
        ("GET", "/v2/nothing", b"", 404, "not_found"),
        ("GET", "/v1/chat/completions", b"", 405, "method_not_allowed"),
    ],
)
async def test_every_error_is_the_openai_envelope_with_its_status(method, path, content, status, code) -> None:
    fleet = Fleet()
    NeuronDouble("n1", fleet)
    async with serving(fleet, gateway={"max_body_bytes": 4096}) as (_, url):
        async with httpx.AsyncClient() as http:
            r = await http.request(method, url + path, content=content, headers={"content-type": "application/json"})
    assert r.status_code == status
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == code
    assert "Traceback" not in r.text
    if status == 503:
        assert int(r.headers["retry-after"]) >= 1


async def test_a_chunked_body_over_the_limit_is_413() -> None:
    fleet = Fleet()
    async with serving(fleet, gateway={"max_body_bytes": 4096}) as (_, url):
        async def chunks():
            for _ in range(10):
                yield b"x" * 1000

        async with httpx.AsyncClient() as http:
            r = await http.post(url + "/v1/completions", content=chunks())
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"


async def test_every_feasible_neuron_refusing_the_load_is_503() -> None:
    fleet = Fleet()
    NeuronDouble("n1", fleet).refuse_load = True
    async with serving(fleet, orchestrator={"retry_after": 9}) as (_, url):
        async with httpx.AsyncClient() as http:
            r = await http.post(url + "/v1/completions", json={"model": "chat", "prompt": "x"})
    assert r.status_code == 503 and r.headers["retry-after"] == "9"
    assert r.json()["error"]["code"] == "load_failed"


async def test_the_official_client_sees_the_errors_as_its_own() -> None:
    fleet = Fleet()
    async with serving(fleet) as (_, url):
        with pytest.raises(openai.NotFoundError):
            await in_thread(lambda: client(url).completions.create(model="nope", prompt="x"))
        with pytest.raises(openai.BadRequestError):
            await in_thread(lambda: client(url).completions.create(model="chat", prompt="x", temperature=9))


# --- admin and metrics -------------------------------------------------------------------


async def test_metrics_and_the_fleet_snapshot() -> None:
    fleet = Fleet()
    NeuronDouble("n1", fleet, load_delay=0.01)
    async with serving(fleet) as (_, url):
        async with httpx.AsyncClient() as http:
            await http.post(url + "/v1/completions", json={"model": "chat", "prompt": "x"})
            metrics = (await http.get(url + "/metrics", headers=admin_headers())).text
            snapshot = (await http.get(url + "/admin/fleet", headers=admin_headers())).json()
            health = (await http.get(url + "/health")).json()
    assert 'helexa_requests_total{endpoint="completions",model="chat",neuron="n1"} 1.0' in metrics
    assert 'helexa_cold_loads_total{model="chat",neuron="n1"} 1.0' in metrics
    assert "helexa_time_to_first_token_seconds_bucket" in metrics and "helexa_queue_seconds" in metrics
    assert snapshot["neurons"][0]["node_id"] == "n1" and health == {"status": "ok", "neurons": 1}


async def test_the_fleet_view_is_only_served_to_admin_clients() -> None:
    fleet = Fleet()
    NeuronDouble("n1", fleet)
    async with serving(fleet, gateway={"admin_clients": ["10.9.9.9"]}) as (_, url):
        async with httpx.AsyncClient() as http:
            resp = await http.get(url + "/admin/fleet", headers=admin_headers())
    assert resp.status_code == 403
    assert resp.json()["error"]["code"] == "forbidden"
    assert "n1" not in resp.text


async def test_the_fleet_view_needs_the_admin_token() -> None:
    fleet = Fleet()
    NeuronDouble("n1", fleet)
    async with serving(fleet) as (_, url):
        async with httpx.AsyncClient() as http:
            missing = await http.get(url + "/admin/fleet")
            wrong = await http.get(url + "/admin/fleet", headers={"authorization": "Bearer hlx-admin-nope"})
    for resp in (missing, wrong):
        assert resp.status_code == 401 and resp.json()["error"]["code"] == "invalid_admin_token"
        assert "n1" not in resp.text


async def test_a_stalled_stream_ends_with_a_timeout_event_not_a_hang(autojump_clock) -> None:
    fleet = Fleet()
    NeuronDouble("n1", fleet, loaded=("chat",), tokens=5, token_delay=50)
    async with serving(fleet, orchestrator={"idle_timeout": 20}) as (_, url):
        async with httpx.AsyncClient(timeout=500) as http:
            started = trio.current_time()
            r = await http.post(url + "/v1/chat/completions", json={
                "model": "chat", "stream": True, "messages": [{"role": "user", "content": "x"}]})
    events = sse_events(r.text)
    assert events[-1]["error"]["code"] == "timeout"
    assert trio.current_time() - started == pytest.approx(50 + 20, abs=0.5)  # the first token, then 20 s idle


async def test_stop_lets_an_in_flight_request_finish_then_returns() -> None:
    fleet = Fleet()
    neuron = NeuronDouble("n1", fleet, loaded=("chat",), tokens=5, token_delay=0.05)
    gateway = build(fleet, CATALOGUE, shutdown_grace=5)
    results = []
    async with trio.open_nursery() as housekeeping:
        await housekeeping.start(gateway.orchestrator.run)
        async with trio.open_nursery() as nursery:
            url = (await nursery.start(gateway.run))[0]

            async def ask() -> None:
                async with httpx.AsyncClient(timeout=5) as http:
                    r = await http.post(url + "/v1/completions", json={"model": "chat", "prompt": "x"})
                    results.append(r.json()["choices"][0]["text"])

            nursery.start_soon(ask)
            while not neuron.generations:  # the request is running on the neuron
                await trio.sleep(0.005)
            gateway.stop()
        housekeeping.cancel_scope.cancel()
    assert results == ["t0 t1 t2 t3 t4 "]
