"""Anthropic's Messages API on a real socket, over in-memory neuron doubles, with the official
``anthropic`` client (sync, run in a thread) wherever it can say what is being tested, and
httpx where the bytes on the wire are the point. (Its errors: ``test_anthropic_errors.py``.)"""

from __future__ import annotations

import json

import anthropic
import httpx
import pytest

from anthropic_clients import ASK, client, in_thread, keyed
from helexa.protocol import Feature
from helexa.roles.cortex.catalogue import Catalogue, CatalogueEntry
from helexa.roles.cortex.fleet import Fleet
from neuron_double import NeuronDouble
from portals import acme, portals
from serving import serving


async def test_a_message_is_answered_and_billed_as_the_ledger_records_it() -> None:
    fleet, neuron, store, key = keyed()
    async with portals(fleet, {"acme": acme()}, store=store) as (_, urls):
        def ask() -> anthropic.types.Message:
            with client(urls["acme"], key) as c:
                return c.messages.create(model="fast", max_tokens=16, messages=ASK, system="Be brief.",
                                         stop_sequences=["END"],
                                         extra_body={"temperature": 0.5, "top_k": 5, "top_p": 0.9})

        message = await in_thread(ask)
    assert message.type == "message" and message.role == "assistant" and message.model == "fast"
    assert [b.type for b in message.content] == ["text"] and message.content[0].text == "t0 t1 t2 "
    assert message.stop_reason == "end_turn" and message.stop_sequence is None
    (row,) = store.records()
    assert row.endpoint == "messages" and row.model_asked == "fast" and row.model_served == "chat"
    assert (message.usage.input_tokens, message.usage.output_tokens) == (row.prompt_tokens, row.completion_tokens)
    (sent,) = neuron.requests
    assert sent.messages == ({"role": "system", "content": "Be brief."}, {"role": "user", "content": "x"})
    s = sent.sampling
    assert (s.max_tokens, s.temperature, s.top_p, s.top_k, s.stop) == (16, 0.5, 0.9, 5, ("END",))
    assert message.id == "msg_" + sent.request_id


async def test_the_key_may_come_as_a_bearer_token_and_any_anthropic_version_is_taken() -> None:
    fleet, _, store, key = keyed()
    async with portals(fleet, {"acme": acme()}, store=store) as (_, urls):
        def ask() -> anthropic.types.Message:
            with anthropic.Anthropic(base_url=urls["acme"], auth_token=key, max_retries=0, timeout=10,
                                     default_headers={"anthropic-version": "1999-01-01"}) as c:
                return c.messages.create(model="fast", max_tokens=2, messages=ASK)

        message = await in_thread(ask)
    assert message.content[0].text == "t0 t1 " and message.stop_reason == "max_tokens"


async def test_a_stream_accumulates_in_the_sdk_to_the_same_message() -> None:
    fleet, _, store, key = keyed()
    async with portals(fleet, {"acme": acme()}, store=store) as (_, urls):
        def ask():
            with client(urls["acme"], key) as c:
                with c.messages.stream(model="fast", max_tokens=16, messages=ASK) as stream:
                    texts = list(stream.text_stream)
                    return texts, stream.get_final_message()

        texts, message = await in_thread(ask)
    assert texts == ["t0 ", "t1 ", "t2 "]
    assert message.content[0].text == "t0 t1 t2 " and message.stop_reason == "end_turn"
    (row,) = store.records()
    assert (message.usage.input_tokens, message.usage.output_tokens) == (row.prompt_tokens, row.completion_tokens)


def expected_stream(message_id: str, model: str, texts: list[str], usage: tuple[int, int], stop: str) -> bytes:
    out = (
        'event: message_start\ndata: {"type":"message_start","message":{"id":"%s","type":"message",'
        '"role":"assistant","model":"%s","content":[],"stop_reason":null,"stop_sequence":null,'
        '"usage":{"input_tokens":0,"output_tokens":0}}}\n\n' % (message_id, model))
    out += ('event: content_block_start\ndata: {"type":"content_block_start","index":0,'
            '"content_block":{"type":"text","text":""}}\n\n')
    for text in texts:
        out += ('event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
                '"delta":{"type":"text_delta","text":"%s"}}\n\n' % text)
    out += 'event: content_block_stop\ndata: {"type":"content_block_stop","index":0}\n\n'
    out += ('event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"%s","stop_sequence":null},'
            '"usage":{"input_tokens":%d,"output_tokens":%d,"cache_creation_input_tokens":0,'
            '"cache_read_input_tokens":0}}\n\n' % (stop, *usage))
    out += 'event: message_stop\ndata: {"type":"message_stop"}\n\n'
    return out.encode()


async def test_a_stop_sequence_that_ends_the_answer_is_named_whole_and_streamed() -> None:
    fleet, _, store, key = keyed()
    async with portals(fleet, {"acme": acme()}, store=store) as (_, urls):
        def ask():
            with client(urls["acme"], key) as c:
                whole = c.messages.create(model="fast", max_tokens=16, messages=ASK, stop_sequences=["zz", "2 "])
                with c.messages.stream(model="fast", max_tokens=16, messages=ASK, stop_sequences=["2 "]) as stream:
                    events = [e for e in stream if e.type == "message_delta"]
                    return whole, events, stream.get_final_message()

        whole, deltas, streamed = await in_thread(ask)
    assert whole.content[0].text == "t0 t1 t" and (whole.stop_reason, whole.stop_sequence) == ("stop_sequence", "2 ")
    assert [(d.delta.stop_reason, d.delta.stop_sequence) for d in deltas] == [("stop_sequence", "2 ")]
    assert (streamed.stop_reason, streamed.stop_sequence) == ("stop_sequence", "2 ")
    assert streamed.content[0].text == "t0 t1 t"


async def test_the_anthropic_sdk_lists_pages_and_retrieves_the_portals_models() -> None:
    fleet, _, store, key = keyed()
    async with portals(fleet, {"acme": acme()}, store=store) as (_, urls):
        def ask():
            with client(urls["acme"], key) as c:
                everything = [m.id for m in c.models.list()]
                first = c.models.list(limit=1)
                walked = [m.id for m in first]  # the SDK's auto-paging follows last_id
                before = c.models.list(before_id=everything[-1], limit=5)
                one = c.models.retrieve(everything[0])
                with pytest.raises(anthropic.NotFoundError) as missing:
                    c.models.retrieve("nope")
                with pytest.raises(anthropic.BadRequestError) as bad:
                    c.models.list(limit=0)
                return everything, first, walked, before, one, missing.value, bad.value

        everything, first, walked, before, one, missing, bad = await in_thread(ask)
    assert everything and everything == walked
    assert (len(first.data), first.has_more, first.first_id, first.last_id) == (
        1, len(everything) > 1, everything[0], everything[0])
    assert [m.id for m in before.data] == everything[:-1] and before.has_more is False
    assert one.type == "model" and one.id == everything[0] and one.display_name == everything[0]
    assert one.created_at.tzinfo is not None
    assert missing.response.json()["error"]["type"] == "not_found_error"
    assert bad.response.json()["error"]["type"] == "invalid_request_error" and "limit" in bad.message


async def test_a_portal_that_speaks_only_anthropics_api_lists_its_models_to_the_anthropic_sdk() -> None:
    """docs/api.md: GET /v1/models answers Anthropic's clients in Anthropic's shape; on a
    portal with surfaces = ["anthropic"] the route was the OpenAI surface's alone, so the SDK's
    models.list() got a 404 'no route /v1/models', in OpenAI's error shape."""
    fleet, _, store, key = keyed()
    async with portals(fleet, {"acme": acme(surfaces=["anthropic"])}, store=store) as (_, urls):
        def ask():
            with client(urls["acme"], key) as c:
                listed = [m.id for m in c.models.list()]
                one = c.models.retrieve("fast")
                with pytest.raises(anthropic.NotFoundError) as missing:
                    c.models.retrieve("nope")
                return listed, one, missing.value

        listed, one, missing = await in_thread(ask)
        async with httpx.AsyncClient(timeout=10) as http:  # the OpenAI surface's other routes stay off
            chat = await http.post(urls["acme"] + "/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
                                   json={"model": "fast", "messages": ASK})
    assert "fast" in listed and one.type == "model" and one.id == "fast"
    assert missing.response.json()["error"]["type"] == "not_found_error"
    assert chat.status_code == 404


async def test_an_openai_client_still_gets_openais_model_list() -> None:
    fleet, _, store, key = keyed()
    async with portals(fleet, {"acme": acme()}, store=store) as (_, urls):
        async with httpx.AsyncClient(timeout=10) as http:
            r = await http.get(urls["acme"] + "/v1/models", headers={"authorization": f"Bearer {key}"})
            anthropic_401 = await http.get(urls["acme"] + "/v1/models", headers={"anthropic-version": "2023-06-01"})
    assert r.json()["object"] == "list" and all(m["object"] == "model" for m in r.json()["data"])
    assert anthropic_401.status_code == 401 and anthropic_401.json()["error"]["type"] == "authentication_error"


async def test_the_raw_stream_is_the_event_sequence_byte_for_byte() -> None:
    fleet = Fleet()
    NeuronDouble("n1", fleet, loaded=("chat",))
    async with serving(fleet, Catalogue([CatalogueEntry(id="chat", backend="synthetic", memory_mb=1)])) as (_, url):
        async with httpx.AsyncClient(timeout=10) as http:
            r = await http.post(url + "/v1/messages", json={"model": "chat", "max_tokens": 64, "stream": True,
                                                            "messages": ASK},
                                headers={"anthropic-version": "2023-06-01"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    message_id = "msg_" + r.headers["x-request-id"]
    assert r.content == expected_stream(message_id, "chat", ["t0 ", "t1 ", "t2 "], (5, 3), "end_turn")


async def test_a_stream_waiting_for_a_cold_load_pings_after_message_start(autojump_clock) -> None:
    fleet = Fleet()
    NeuronDouble("n1", fleet, load_delay=2.5)
    catalogue = Catalogue([CatalogueEntry(id="chat", backend="synthetic", memory_mb=1)])
    async with serving(fleet, catalogue, orchestrator={"keepalive_interval": 1.0}) as (_, url):
        async with httpx.AsyncClient(timeout=5) as http:
            r = await http.post(url + "/v1/messages", json={"model": "chat", "max_tokens": 2, "stream": True,
                                                            "messages": ASK})
    message_id = "msg_" + r.headers["x-request-id"]
    whole = expected_stream(message_id, "chat", ["t0 ", "t1 "], (5, 2), "max_tokens")
    start, rest = whole.split(b"\n\n", 1)
    ping = b'event: ping\ndata: {"type":"ping"}\n\n'
    assert r.content == start + b"\n\n" + ping * 2 + rest  # pings at t = 1 and 2 s; loaded at 2.5 s


async def test_a_failure_after_the_stream_began_is_an_error_event_in_anthropics_shape() -> None:
    fleet = Fleet()
    neuron = NeuronDouble("n1", fleet, loaded=("chat",), tokens=50, token_delay=0.05)
    catalogue = Catalogue([CatalogueEntry(id="chat", backend="synthetic", memory_mb=1)])
    async with serving(fleet, catalogue) as (_, url):
        async with httpx.AsyncClient(timeout=10) as http:
            async with http.stream("POST", url + "/v1/messages", json={
                    "model": "chat", "max_tokens": 64, "stream": True, "messages": ASK}) as r:
                raw = b""
                async for part in r.aiter_bytes():
                    raw += part
                    if b"t1 " in raw and neuron.health.value != "unhealthy":
                        neuron.kill()
    last = raw.rstrip(b"\n").rsplit(b"\n\n", 1)[-1]
    name, data = last.split(b"\n")
    assert name == b"event: error"
    body = json.loads(data.removeprefix(b"data: "))
    assert body["type"] == "error" and body["error"]["type"] == "api_error" and body["error"]["message"]
    assert b"message_stop" not in raw and b"Traceback" not in raw


# --- what reaches the fabric ----------------------------------------------------------------

WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOLED = Catalogue([CatalogueEntry(id="chat", backend="synthetic", memory_mb=1, features=(Feature.TOOLS,))])


async def test_multi_turn_blocks_tools_and_tool_results_reach_the_fabric_as_its_chat() -> None:
    fleet = Fleet()
    neuron = NeuronDouble("n1", fleet, loaded=("chat",))
    history = [
        {"role": "user", "content": [{"type": "text", "text": "Weather"}, {"type": "text", "text": "in Paris?"}]},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "hm", "signature": "s"},
            {"type": "text", "text": "Let me look."},
            {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "Sunny"}]},
            {"type": "tool_result", "tool_use_id": "toolu_2", "content": "down", "is_error": True},
            {"type": "text", "text": "And tomorrow?"}]},
    ]
    async with serving(fleet, TOOLED) as (_, url):
        def ask() -> anthropic.types.Message:
            with client(url) as c:
                return c.messages.create(
                    model="chat", max_tokens=8, messages=history,
                    system=[{"type": "text", "text": "You are terse."}, {"type": "text", "text": "Use tools."}],
                    tools=[{"name": "get_weather", "description": "Weather in a city", "input_schema": WEATHER}],
                    tool_choice={"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True})

        await in_thread(ask)
    (sent,) = neuron.requests
    assert sent.messages == (
        {"role": "system", "content": "You are terse.\nUse tools."},
        {"role": "user", "content": "Weather\nin Paris?"},
        {"role": "assistant", "content": "Let me look.", "tool_calls": [
            {"id": "toolu_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "toolu_1", "content": "Sunny"},
        {"role": "tool", "tool_call_id": "toolu_2", "content": "Error: down"},
        {"role": "user", "content": "And tomorrow?"},
    )
    (tool,) = sent.tools
    assert (tool.name, tool.description, tool.parameters) == ("get_weather", "Weather in a city", WEATHER)
    assert (sent.tool_choice.mode.value, sent.tool_choice.name) == ("function", "get_weather")
    assert sent.extra == {"parallel_tool_calls": False}


@pytest.mark.parametrize(("choice", "mode"), [({"type": "auto"}, "auto"), ({"type": "any"}, "required"),
                                               ({"type": "none"}, "none")])
async def test_tool_choice_maps_onto_the_fabrics(choice, mode) -> None:
    fleet = Fleet()
    neuron = NeuronDouble("n1", fleet, loaded=("chat",))
    async with serving(fleet, TOOLED) as (_, url):
        def ask() -> None:
            with client(url) as c:
                c.messages.create(model="chat", max_tokens=2, messages=ASK, tool_choice=choice,
                                  tools=[{"name": "f", "input_schema": {"type": "object"}}])

        await in_thread(ask)
    assert neuron.requests[0].tool_choice.mode.value == mode
