"""OpenAI's Responses API on a keyed portal, over real sockets, with the official client:
non-streamed and ``responses.stream()``, the raw event order, continuation by
``previous_response_id``, retrieve and delete (by the key that made it only), retention,
errors in OpenAI's envelope naming the field, and every request metered and in the ledger."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
import trio

from helexa.protocol import GenerateResult, TokenChunk, Usage
from helexa.roles.cortex.fleet import Fleet
from helexa.roles.cortex.portal.store import SqliteStore
from helexa.roles.cortex.responses_api import ResponsesRequest
from helexa.roles.cortex.responses_stream import ResponseBuilder
from neuron_double import NeuronDouble
from portals import acme, bearer, new_key, portals

TEXT_EVENTS = ["response.created", "response.in_progress", "response.output_item.added",
               "response.content_part.added", "response.output_text.delta", "response.output_text.delta",
               "response.output_text.delta", "response.output_text.done", "response.content_part.done",
               "response.output_item.done", "response.completed"]


def client(url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=10)


def in_thread(fn, *args):  # noqa: ANN001, ANN201
    return trio.to_thread.run_sync(fn, *args)


def key_id(key: str) -> str:
    return key.split("_")[0].removeprefix("sk-hlx-")


async def test_a_response_non_streamed_and_streamed_with_the_sdk_is_metered_and_recorded() -> None:
    fleet = Fleet()
    neuron = NeuronDouble("n1", fleet, loaded=("chat",), tokens=3)
    store = SqliteStore(":memory:")
    key = new_key(store, "acme")
    async with portals(fleet, {"acme": acme()}, store=store) as (_, urls):
        def run():  # noqa: ANN202
            c = client(urls["acme"], key)
            plain = c.responses.create(model="fast", input="hi", instructions="Be brief.", max_output_tokens=10,
                                       temperature=0.5, metadata={"ticket": "7"})
            deltas = []
            with c.responses.stream(model="fast", input=[{"role": "user", "content": "hello"}]) as stream:
                for event in stream:
                    if event.type == "response.output_text.delta":
                        deltas.append(event.delta)
                final = stream.get_final_response()
            return plain, deltas, final

        plain, deltas, final = await in_thread(run)
    assert plain.status == "completed" and plain.output_text == "t0 t1 t2 " and plain.model == "fast"
    assert plain.id.startswith("resp_") and plain.metadata == {"ticket": "7"} and plain.max_output_tokens == 10
    assert (plain.usage.input_tokens, plain.usage.output_tokens, plain.usage.total_tokens) == (5, 3, 8)
    (message,) = plain.output
    assert message.type == "message" and message.role == "assistant" and message.status == "completed"
    assert deltas == ["t0 ", "t1 ", "t2 "] and final.output_text == "t0 t1 t2 " and final.status == "completed"
    first = neuron.requests[0]
    assert first.model_id == "chat" and first.sampling.max_tokens == 10 and first.sampling.temperature == 0.5
    assert first.messages == ({"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"})
    rows = store.records(key_id=key_id(key))
    assert [(r.endpoint, r.model_asked, r.outcome, r.prompt_tokens, r.completion_tokens) for r in rows] == [
        ("responses", "fast", "ok", 5, 3)] * 2
    assert rows[0].cost == pytest.approx(8 * 1000 / 1e6)


async def test_the_raw_stream_sends_the_events_in_order_each_named_and_numbered() -> None:
    fleet = Fleet()
    NeuronDouble("n1", fleet, loaded=("chat",), tokens=3)
    store = SqliteStore(":memory:")
    key = new_key(store, "acme")
    async with portals(fleet, {"acme": acme()}, store=store) as (_, urls):
        async with httpx.AsyncClient() as http:
            r = await http.post(urls["acme"] + "/v1/responses", headers=bearer(key),
                                json={"model": "fast", "input": "hi", "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    blocks = [b for b in r.text.split("\n\n") if b]
    events = []
    for block in blocks:
        name, data = block.split("\n")
        assert name.startswith("event: ") and data.startswith("data: ")
        event = json.loads(data[6:])
        assert event["type"] == name[7:]
        events.append(event)
    assert [e["type"] for e in events] == TEXT_EVENTS
    assert [e["sequence_number"] for e in events] == list(range(len(TEXT_EVENTS)))
    deltas = [e for e in events if e["type"] == "response.output_text.delta"]
    assert all(e["logprobs"] == [] and e["output_index"] == 0 and e["content_index"] == 0 for e in deltas)
    created, done = events[0]["response"], events[-1]["response"]
    assert created["status"] == "in_progress" and created["output"] == [] and created["id"] == done["id"]
    assert done["status"] == "completed" and done["output"][0]["content"][0]["text"] == "t0 t1 t2 "
    assert events[7]["text"] == "t0 t1 t2 " and events[9]["item"]["id"] == events[2]["item"]["id"]


async def test_previous_response_id_continues_the_conversation_and_only_its_key_sees_it() -> None:
    fleet = Fleet()
    neuron = NeuronDouble("n1", fleet, loaded=("chat",), tokens=2)
    store = SqliteStore(":memory:")
    key, other = new_key(store, "acme"), new_key(store, "acme")
    async with portals(fleet, {"acme": acme()}, store=store) as (_, urls):
        def run():  # noqa: ANN202
            c = client(urls["acme"], key)
            first = c.responses.create(model="fast", input="My name is Ada.", instructions="Be kind.")
            with c.responses.stream(model="fast", input="What is my name?", previous_response_id=first.id) as s:
                second = s.get_final_response()
            got = c.responses.retrieve(first.id)
            errors = {}
            for name, call in {
                "other key retrieves": lambda: client(urls["acme"], other).responses.retrieve(first.id),
                "other key continues": lambda: client(urls["acme"], other).responses.create(
                    model="fast", input="x", previous_response_id=first.id),
                "other key deletes": lambda: client(urls["acme"], other).responses.delete(first.id),
                "unstored": lambda: c.responses.retrieve(c.responses.create(model="fast", input="x", store=False).id),
            }.items():
                try:
                    call()
                except openai.APIStatusError as exc:
                    errors[name] = (exc.status_code, exc.body.get("code"), exc.body.get("param"))
            c.responses.delete(first.id)
            try:
                c.responses.retrieve(first.id)
            except openai.NotFoundError:
                errors["after delete"] = 404
            return first, second, got, errors

        first, second, got, errors = await in_thread(run)
    assert got.id == first.id and got.output_text == first.output_text == "t0 t1 "
    assert second.previous_response_id == first.id
    assert neuron.requests[1].messages == (
        {"role": "user", "content": "My name is Ada."}, {"role": "assistant", "content": "t0 t1 "},
        {"role": "user", "content": "What is my name?"})  # the instructions are not inherited
    assert errors == {
        "other key retrieves": (404, "not_found", None),
        "other key continues": (404, "previous_response_not_found", "previous_response_id"),
        "other key deletes": (404, "not_found", None),
        "unstored": (404, "not_found", None),
        "after delete": 404,
    }


async def test_input_items_list_a_stored_responses_own_input_in_the_sdks_pages() -> None:
    fleet = Fleet()
    NeuronDouble("n1", fleet, loaded=("chat",), tokens=2)
    store = SqliteStore(":memory:")
    key, other = new_key(store, "acme"), new_key(store, "acme")
    items = [{"role": "system", "content": "Be brief."},
             {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Weather?"}]},
             {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": '{"city":"Paris"}'},
             {"type": "function_call_output", "call_id": "c1", "output": "Sunny"},
             {"role": "assistant", "content": "It is sunny."}]
    async with portals(fleet, {"acme": acme()}, store=store) as (_, urls):
        def run():  # noqa: ANN202
            c = client(urls["acme"], key)
            first = c.responses.create(model="fast", input="Hello")
            second = c.responses.create(model="fast", input=items, previous_response_id=first.id)
            listed = list(c.responses.input_items.list(second.id, order="asc", limit=2))  # pages of 2
            newest = c.responses.input_items.list(second.id)
            greeting = c.responses.input_items.list(first.id)
            errors = {}
            for name, call in {
                "other key": lambda: client(urls["acme"], other).responses.input_items.list(first.id),
                "bad limit": lambda: c.responses.input_items.list(first.id, limit=101),
                "bad order": lambda: c.responses.input_items.list(first.id, order="up"),  # type: ignore[arg-type]
                "cancel": lambda: c.responses.cancel(first.id),
                "cancel unknown": lambda: c.responses.cancel("resp_nope"),
                "retrieve streamed": lambda: list(c.responses.retrieve(first.id, stream=True)),
            }.items():
                try:
                    call()
                except openai.APIStatusError as exc:
                    errors[name] = (exc.status_code, exc.body.get("code"), exc.body.get("param"))
            return listed, newest, greeting, errors

        listed, newest, greeting, errors = await in_thread(run)
    assert [(i.type, getattr(i, "role", None)) for i in listed] == [
        ("message", "system"), ("message", "user"), ("function_call", None), ("function_call_output", None),
        ("message", "assistant")]
    assert listed[1].content[0].text == "Weather?" and listed[2].arguments == '{"city":"Paris"}'
    assert listed[3].output == "Sunny" and listed[4].content[0].text == "It is sunny."
    assert len({i.id for i in listed}) == 5
    assert [i.id for i in newest.data] == [i.id for i in reversed(listed)] and newest.has_more is False
    assert newest.first_id == listed[-1].id and newest.last_id == listed[0].id
    (hello,) = greeting.data
    assert (hello.role, hello.content[0].type, hello.content[0].text) == ("user", "input_text", "Hello")
    assert errors == {"other key": (404, "not_found", None), "bad limit": (400, None, "limit"),
                      "bad order": (400, None, "order"), "cancel": (400, "unsupported", None),
                      "cancel unknown": (404, "not_found", None), "retrieve streamed": (400, "unsupported", "stream")}


async def test_a_stored_response_expires_after_the_portals_retention(autojump_clock) -> None:
    fleet = Fleet()
    NeuronDouble("n1", fleet, loaded=("chat",), tokens=1)
    store = SqliteStore(":memory:")
    key = new_key(store, "acme")
    async with portals(fleet, {"acme": acme(responses_retention=60)}, store=store, virtual=True) as (_, urls):
        async with httpx.AsyncClient(base_url=urls["acme"], headers=bearer(key)) as http:
            made = (await http.post("/v1/responses", json={"model": "fast", "input": "hi"})).json()
            await trio.sleep(59)
            assert (await http.get(f"/v1/responses/{made['id']}")).json()["id"] == made["id"]
            await trio.sleep(1)
            gone = await http.get(f"/v1/responses/{made['id']}")
            late = await http.post("/v1/responses", json={"model": "fast", "input": "x",
                                                          "previous_response_id": made["id"]})
    assert gone.status_code == 404 and late.status_code == 404


@pytest.mark.parametrize(("body", "status", "param", "code"), [
    ({"model": "fast"}, 400, "input", None),
    ({"model": "fast", "input": [{"type": "function_call", "name": "f", "arguments": "{}"}]}, 400,
     "input[0].call_id", None),
    ({"model": "fast", "input": [{"type": "reasoning", "summary": []}]}, 400, "input[0]", None),
    ({"model": "fast", "input": [{"role": "robot", "content": "x"}]}, 400, "input[0].role", None),
    ({"model": "fast", "input": "x", "tools": [{"type": "web_search"}]}, 400, "tools[0]", None),
    ({"model": "fast", "input": "x", "tool_choice": "required"}, 400, "tool_choice", None),
    ({"model": "fast", "input": "x", "temperature": 3}, 400, "temperature", None),
    ({"model": "fast", "input": "x", "text": {"format": {"type": "json_schema", "schema": {}}}}, 400,
     "text.format.name", None),
    ({"model": "fast", "input": "x", "text": {"format": {"type": "json_schema", "name": "x",
                                                         "schema": {"type": "nonsense"}}}}, 400,
     "text.format.schema", None),
    ({"model": "fast", "input": "x", "tools": [{"type": "function", "name": "f", "parameters": {"$ref": "#/none"}}]},
     400, "tools[0].parameters", None),
    ({"model": "fast", "input": "x", "background": True}, 400, "background", "unsupported"),
    ({"model": "fast", "input": [{"type": "item_reference", "id": "msg_1"}]}, 400, "input[0]", "unsupported"),
    ({"model": "fast", "input": "x", "max_output_tokens": 1000}, 400, "max_output_tokens", None),
    ({"model": "fast", "input": "x", "max_output_tokens": "5"}, 400, "max_output_tokens", None),
    ({"model": "fast", "input": "x", "max_output_tokens": 5.0}, 400, "max_output_tokens", None),
    ({"model": "fast", "input": "x", "store": "yes"}, 400, "store", None),
    ({"model": "fast", "input": "x", "stream": "yes"}, 400, "stream", None),
    ({"model": "fast", "input": "x", "text": {"format": {"type": "json_object"}}}, 400, "text.format", "unsupported"),
    ({"model": "nope", "input": "x"}, 404, "model", "model_not_found"),
    ({"model": "fast", "input": "x", "previous_response_id": "resp_nope"}, 404, "previous_response_id",
     "previous_response_not_found"),
])
async def test_bad_requests_get_openais_envelope_naming_the_field_before_a_neuron_sees_them(
        body: dict, status: int, param: str, code: str | None) -> None:
    fleet = Fleet()
    neuron = NeuronDouble("n1", fleet, loaded=("chat",))
    store = SqliteStore(":memory:")
    key = new_key(store, "acme")
    async with portals(fleet, {"acme": acme()}, store=store) as (_, urls):
        async with httpx.AsyncClient() as http:
            r = await http.post(urls["acme"] + "/v1/responses", headers=bearer(key), json=body)
    error = r.json()["error"]
    assert (r.status_code, error["param"], error["code"]) == (status, param, code), error
    assert error["type"] and error["message"] and neuron.requests == []


def test_function_call_deltas_become_a_function_call_item_with_its_argument_events() -> None:
    body = ResponsesRequest.model_validate({"model": "m", "input": "x", "tools": [
        {"type": "function", "name": "get_weather", "parameters": {"type": "object"}}]})
    b = ResponseBuilder(body, "resp_1", created_at=0)
    events = b.start()
    events += b.chunk(TokenChunk("r", "", tool_calls=(
        {"index": 0, "id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": ""}},)))
    events += b.chunk(TokenChunk("r", "", tool_calls=({"index": 0, "function": {"arguments": '{"city":'}},)))
    events += b.chunk(TokenChunk("r", "", tool_calls=({"index": 0, "function": {"arguments": '"Paris"}'}},)))
    events += b.finish(GenerateResult("r", "tool_calls", Usage(4, 6)))
    events.append(b.completed())
    assert [e["type"] for e in events] == [
        "response.created", "response.in_progress", "response.output_item.added",
        "response.function_call_arguments.delta", "response.function_call_arguments.delta",
        "response.function_call_arguments.done", "response.output_item.done", "response.completed"]
    added, done = events[2]["item"], events[6]["item"]
    assert added == {"id": added["id"], "type": "function_call", "status": "in_progress", "call_id": "call_1",
                     "name": "get_weather", "arguments": ""}
    assert done == {**added, "status": "completed", "arguments": '{"city":"Paris"}'}
    assert events[5]["arguments"] == '{"city":"Paris"}' and events[5]["name"] == "get_weather"
    assert b.response["output"] == [done] and b.response["status"] == "completed"


def test_a_whole_tool_call_after_text_closes_the_message_first() -> None:
    body = ResponsesRequest.model_validate({"model": "m", "input": "x"})
    b = ResponseBuilder(body, "resp_1", created_at=0)
    events = b.chunk(TokenChunk("r", "Let me look."))
    events += b.finish(GenerateResult("r", "tool_calls", Usage(1, 1), tool_calls=(
        {"id": "call_9", "type": "function", "function": {"name": "f", "arguments": "{}"}},)))
    assert [e["type"] for e in events] == [
        "response.output_item.added", "response.content_part.added", "response.output_text.delta",
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.done", "response.output_item.done"]
    assert [i["type"] for i in b.response["output"]] == ["message", "function_call"]
    assert [e["output_index"] for e in events if "output_index" in e] == [0, 0, 0, 0, 0, 0, 1, 1, 1, 1]


def test_an_answer_cut_by_max_output_tokens_is_incomplete() -> None:
    b = ResponseBuilder(ResponsesRequest.model_validate({"model": "m", "input": "x"}), "resp_1", created_at=0)
    b.finish(GenerateResult("r", "length", Usage(1, 1), text="a"))
    assert b.completed()["type"] == "response.incomplete"
    assert b.response["incomplete_details"] == {"reason": "max_output_tokens"}


async def test_a_stream_waiting_for_a_cold_load_gets_comments_then_the_events(autojump_clock) -> None:
    fleet = Fleet()
    NeuronDouble("n1", fleet, load_delay=3.5, tokens=1)
    store = SqliteStore(":memory:")
    key = new_key(store, "acme")
    async with portals(fleet, {"acme": acme()}, store=store, virtual=True,
                       orchestrator={"keepalive_interval": 1.0}) as (_, urls):
        async with httpx.AsyncClient(timeout=5) as http:
            r = await http.post(urls["acme"] + "/v1/responses", headers=bearer(key),
                                json={"model": "fast", "input": "x", "stream": True})
    blocks = [b for b in r.text.split("\n\n") if b]
    assert [b.startswith(": loading fast") for b in blocks[:3]] == [True] * 3  # at t = 1, 2 and 3 s
    assert blocks[3].startswith("event: response.created\n") and blocks[-1].startswith("event: response.completed\n")


async def test_a_neuron_lost_mid_stream_ends_the_stream_with_response_failed(autojump_clock) -> None:
    fleet = Fleet()
    neuron = NeuronDouble("n1", fleet, loaded=("chat",), tokens=5, token_delay=1.0)
    store = SqliteStore(":memory:")
    key = new_key(store, "acme")
    async with portals(fleet, {"acme": acme()}, store=store, virtual=True) as (_, urls):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_kill_after, neuron, 2.5)
            async with httpx.AsyncClient(timeout=10) as http:
                r = await http.post(urls["acme"] + "/v1/responses", headers=bearer(key),
                                    json={"model": "fast", "input": "x", "stream": True})
    events = [json.loads(b.split("\n")[1][6:]) for b in r.text.split("\n\n") if b]
    assert [e["type"] for e in events] == TEXT_EVENTS[:6] + ["response.failed"]
    failed = events[-1]["response"]
    assert failed["status"] == "failed" and failed["error"]["code"] == "neuron_gone"
    assert [(row.endpoint, row.outcome) for row in store.records()] == [("responses", "error")]


async def _kill_after(neuron: NeuronDouble, delay: float) -> None:
    await trio.sleep(delay)
    neuron.kill()


async def test_top_logprobs_come_with_the_text_and_each_delta() -> None:
    fleet = Fleet()
    NeuronDouble("n1", fleet, loaded=("chat",), tokens=2)
    store = SqliteStore(":memory:")
    key = new_key(store, "acme")
    async with portals(fleet, {"acme": acme()}, store=store) as (_, urls):
        def run():  # noqa: ANN202
            c = client(urls["acme"], key)
            plain = c.responses.create(model="fast", input="hi", top_logprobs=1)
            with c.responses.stream(model="fast", input="hi", include=["message.output_text.logprobs"]) as s:
                deltas = [e.logprobs for e in s if e.type == "response.output_text.delta"]
            return plain, deltas

        plain, deltas = await in_thread(run)
    lps = plain.output[0].content[0].logprobs
    assert [(lp.token, lp.logprob, [t.token for t in lp.top_logprobs]) for lp in lps] == [
        ("t0 ", 0.0, ["t0 "]), ("t1 ", 0.0, ["t1 "])]
    assert [[lp.token for lp in d] for d in deltas] == [["t0 "], ["t1 "]]


async def test_a_wrong_method_on_a_responses_path_that_exists_is_a_405_naming_the_right_ones() -> None:
    fleet = Fleet()
    NeuronDouble("n1", fleet, loaded=("chat",), tokens=2)
    store = SqliteStore(":memory:")
    key = new_key(store, "acme")
    async with portals(fleet, {"acme": acme()}, store=store) as (_, urls):
        stored = (await in_thread(lambda: client(urls["acme"], key).responses.create(model="fast", input="Hi"))).id
        async with httpx.AsyncClient(base_url=urls["acme"], headers=bearer(key)) as http:
            wrong = {
                ("POST", f"/v1/responses/{stored}"): "DELETE, GET",  # was a 404
                ("PUT", f"/v1/responses/{stored}"): "DELETE, GET",
                ("DELETE", f"/v1/responses/{stored}/input_items"): "GET",
                ("GET", f"/v1/responses/{stored}/cancel"): "POST",
            }
            got = {(m, p): await http.request(m, p) for m, p in wrong}
            missing = [await http.post(f"/v1/responses/{stored}/explode"), await http.get(f"/v1/responses/{stored}/x"),
                       await http.delete("/v1/responses/")]
            assert (await http.get(f"/v1/responses/{stored}")).status_code == 200
    for (method, path), allow in wrong.items():
        r = got[(method, path)]
        assert (r.status_code, r.headers.get("allow")) == (405, allow), (method, path, r.text)
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert [r.status_code for r in missing] == [404, 404, 404]
