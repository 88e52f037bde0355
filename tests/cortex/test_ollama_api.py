"""Ollama's API on a keyed portal, over real sockets, with Ollama's official Python client
(its sync client, run in a worker thread: it is httpx's sync client, so no asyncio loop
enters this trio process): models, chat and generate streamed as NDJSON and not, options,
embeddings, errors in Ollama's shape naming the field, every generation metered and in the
ledger."""

from __future__ import annotations

import json

import httpx
import ollama
import pytest
import trio

from helexa.protocol import ModelState, ModelStatus
from helexa.roles.cortex.catalogue import Catalogue, CatalogueEntry
from helexa.roles.cortex.fleet import Fleet, RemoteError
from helexa.roles.cortex.ollama_api import ChatBody, chat_messages
from helexa.roles.cortex.portal.store import SqliteStore
from neuron_double import NeuronDouble
from portals import acme, bearer, new_key, portals
from serving import admin_headers, serving


def client(url: str, key: str) -> ollama.Client:
    return ollama.Client(host=url, headers=bearer(key), timeout=10)


def in_thread(fn, *args):  # noqa: ANN001, ANN201
    return trio.to_thread.run_sync(fn, *args)


async def test_the_ollama_client_lists_shows_chats_generates_and_embeds() -> None:
    fleet = Fleet()
    neuron = NeuronDouble("n1", fleet, loaded=("chat", "embed"), tokens=3)
    store = SqliteStore(":memory:")
    key = new_key(store, "acme")
    async with portals(fleet, {"acme": acme()}, store=store) as (_, urls):
        def run():  # noqa: ANN202
            c = client(urls["acme"], key)
            listed = sorted(m.model for m in c.list().models)
            shown = c.show("fast:latest")
            running = sorted(m.model for m in c.ps().models)
            chat = c.chat(model="fast:latest", messages=[{"role": "system", "content": "Be brief."},
                                                         {"role": "user", "content": "hi"}],
                          options={"temperature": 0.2, "top_k": 5, "num_predict": 2, "seed": 7, "stop": ["\n"],
                                   "num_ctx": 4096, "repeat_penalty": 1.1}, keep_alive="5m", stream=False)
            pieces = list(c.chat(model="fast", messages=[{"role": "user", "content": "hi"}], stream=True))
            gen = c.generate(model="fast", prompt="Why?", system="Answer.", stream=False)
            gen_pieces = list(c.generate(model="fast", prompt="Why?", stream=True))
            embedded = c.embed(model="embed", input=["a", "b"])
            legacy = c.embeddings(model="embed", prompt="a")
            return listed, shown, running, chat, pieces, gen, gen_pieces, embedded, legacy

        listed, shown, running, chat, pieces, gen, gen_pieces, embedded, legacy = await in_thread(run)
        async with httpx.AsyncClient() as http:
            version = (await http.get(urls["acme"] + "/api/version")).json()
    assert listed == ["chat", "embed", "fast"] and running == ["chat", "embed", "fast"]
    assert shown.capabilities == ["completion"] and shown.modelinfo["helexa.context_length"] == 2048
    assert chat.message.content == "t0 t1 " and chat.done and chat.done_reason == "length"
    assert (chat.prompt_eval_count, chat.eval_count) == (5, 2) and chat.total_duration >= chat.eval_duration >= 0
    first = neuron.requests[0]
    s = first.sampling
    assert (s.temperature, s.top_k, s.max_tokens, s.seed, s.stop, s.repetition_penalty) == (0.2, 5, 2, 7, ("\n",), 1.1)
    assert first.model_id == "chat" and first.messages[0] == {"role": "system", "content": "Be brief."}
    assert [p.message.content for p in pieces] == ["t0 ", "t1 ", "t2 ", ""]
    assert [p.done for p in pieces] == [False, False, False, True] and pieces[-1].done_reason == "stop"
    assert gen.response == "t0 t1 t2 " and gen.done and gen.eval_count == 3
    assert neuron.requests[2].messages == ({"role": "system", "content": "Answer."}, {"role": "user", "content": "Why?"})
    assert "".join(p.response for p in gen_pieces) == "t0 t1 t2 " and gen_pieces[-1].done
    assert [list(v) for v in embedded.embeddings] == [[0.0, 1.0, 2.0], [1.0, 2.0, 3.0]]
    assert list(legacy.embedding) == [0.0, 1.0, 2.0]
    assert version == {"version": "0.12.0"}
    rows = store.records()
    assert sorted(r.endpoint for r in rows) == sorted(["ollama_chat"] * 2 + ["ollama_generate"] * 2 + ["embeddings"] * 2)
    assert all(r.outcome == "ok" and r.key_id for r in rows)


async def test_a_stream_is_ndjson_ending_with_the_counts_and_durations() -> None:
    fleet = Fleet()
    NeuronDouble("n1", fleet, loaded=("chat",), tokens=2)
    store = SqliteStore(":memory:")
    key = new_key(store, "acme")
    async with portals(fleet, {"acme": acme()}, store=store) as (_, urls):
        async with httpx.AsyncClient() as http:
            r = await http.post(urls["acme"] + "/api/chat", headers=bearer(key),
                                json={"model": "fast", "messages": [{"role": "user", "content": "hi"}],
                                      "logprobs": True})
    assert r.headers["content-type"] == "application/x-ndjson"
    lines = [json.loads(line) for line in r.text.splitlines()]
    assert [line["done"] for line in lines] == [False, False, True]
    assert lines[0]["logprobs"] == [{"token": "t0 ", "logprob": 0.0, "top_logprobs": []}]
    last = lines[-1]
    assert last["done_reason"] == "stop" and (last["prompt_eval_count"], last["eval_count"]) == (5, 2)
    assert all(isinstance(last[k], int) for k in ("total_duration", "load_duration", "prompt_eval_duration",
                                                  "eval_duration"))
    assert last["created_at"].endswith("Z") and last["message"] == {"role": "assistant", "content": ""}


async def test_an_empty_prompt_answers_load_without_running_a_model() -> None:
    fleet = Fleet()
    neuron = NeuronDouble("n1", fleet, loaded=("chat",))
    store = SqliteStore(":memory:")
    key = new_key(store, "acme")
    async with portals(fleet, {"acme": acme()}, store=store) as (_, urls):
        got = await in_thread(lambda: client(urls["acme"], key).generate(model="fast", prompt=""))
    assert got.done and got.done_reason == "load" and neuron.requests == []


@pytest.mark.parametrize(("path", "body", "status", "names"), [
    ("/api/chat", {"model": "fast", "messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role"),
    ("/api/chat", {"model": "fast", "messages": [{"role": "user", "content": "x"}],
                   "options": {"temperature": 9}}, 400, "options.temperature"),
    ("/api/chat", {"model": "fast", "messages": [{"role": "user", "content": "x"}], "format": "xml"}, 400, "format"),
    ("/api/chat", {"model": "fast", "messages": [{"role": "tool", "content": "x"}]}, 400, "messages[0]"),
    ("/api/chat", {"model": "fast", "messages": [{"role": "user", "content": "x"}],
                   "options": {"num_predict": 1000}}, 400, "options.num_predict"),
    ("/api/chat", {"model": "fast", "messages": [{"role": "user", "content": "x"}], "format": "json"}, 400, "format"),
    ("/api/chat", {"model": "fast", "messages": [{"role": "user", "content": "x"}], "format": {"type": "wat"}}, 400,
     "'format': not a valid JSON schema"),
    ("/api/generate", {"model": "fast", "prompt": "x", "format": {"$ref": "#/defs/none"}}, 400,
     "'format': $ref '#/defs/none' does not resolve"),
    ("/api/chat", {"model": "fast", "messages": [{"role": "user", "content": "x"}], "tools": [
        {"type": "function", "function": {"name": "f", "parameters": {"type": "wat"}}}]}, 400,
     "'tools[0].function.parameters': not a valid JSON schema"),
    ("/api/generate", {"model": "fast", "prompt": "x", "suffix": "y"}, 400, "suffix"),
    ("/api/generate", {"model": "fast", "prompt": "x", "context": [1, 2]}, 400, "context"),
    ("/api/generate", {"model": "fast", "prompt": "x", "images": ["iVBORw0KGgo="]}, 400, "images[0]"),
    ("/api/embed", {"model": "embed", "input": ["a", ""]}, 400, "input"),
    ("/api/embed", {"model": "embed", "input": "a", "dimensions": 2}, 400, "dimensions"),
    ("/api/chat", {"model": "nope", "messages": [{"role": "user", "content": "x"}]}, 404, "nope"),
    ("/api/show", {"model": "nope"}, 404, "nope"),
    ("/api/generate", "not json", 400, "JSON"),
    ("/api/chat", {"model": "fast", "messages": [{"role": "user", "content": "x"}], "stream": "no"}, 400, "stream"),
    ("/api/generate", {"model": "fast", "prompt": "x", "raw": "yes"}, 400, "raw"),
    ("/api/generate", {"model": "fast", "prompt": "x", "options": {"num_predict": "5"}}, 400, "options.num_predict"),
    ("/api/generate", {"model": "fast", "prompt": "x", "options": {"num_predict": 5.0}}, 400, "options.num_predict"),
    ("/api/generate", {"model": "fast", "prompt": "x", "options": {"seed": True}}, 400, "options.seed"),
    ("/api/generate", {"model": "fast", "prompt": "x", "options": {"temperature": "0.2"}}, 400, "options.temperature"),
])
async def test_errors_are_ollamas_shape_naming_the_field_before_a_neuron_sees_them(
        path: str, body: object, status: int, names: str) -> None:
    fleet = Fleet()
    neuron = NeuronDouble("n1", fleet, loaded=("chat", "embed"))
    store = SqliteStore(":memory:")
    key = new_key(store, "acme")
    async with portals(fleet, {"acme": acme()}, store=store) as (_, urls):
        async with httpx.AsyncClient() as http:
            kwargs = {"json": body} if not isinstance(body, str) else {"content": body}
            r = await http.post(urls["acme"] + path, headers=bearer(key), **kwargs)
    assert r.status_code == status
    error = r.json()
    assert list(error) == ["error"] and isinstance(error["error"], str) and names in error["error"], error
    assert neuron.requests == []


async def test_a_schema_the_backend_cannot_use_names_format_or_tools_in_ollamas_error() -> None:
    """llama.cpp's refusal of a schema as a grammar names nothing the client sent: the Ollama
    error says which field it came in, ``format`` or ``tools`` (as ``param`` does on OpenAI's
    surfaces), streamed or not, through the official client. A model that has no structured
    output is refused naming ``format`` too, not the ``response_format`` Ollama has none of."""
    fleet = Fleet()
    neuron = NeuronDouble("n1", fleet, loaded=("ll", "plain"))
    neuron.error = RemoteError("invalid_request", "llama.cpp refused the request: Automatic parser generation failed: "
                                                  "JSON schema error at #/properties/a: schema must be an object")
    catalogue = Catalogue([CatalogueEntry(id="ll", backend="synthetic", memory_mb=10,
                                          features=["tools", "structured_output"]),
                           CatalogueEntry(id="plain", backend="synthetic", memory_mb=10)])
    schema = {"type": "object", "properties": {"a": True}}
    # (the client checks a tool's schema itself: a plain one, which the double refuses anyway)
    tools = [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "string"}}}}}]
    ask = [{"role": "user", "content": "x"}]
    async with serving(fleet, catalogue) as (_, url):
        def run():  # noqa: ANN202
            c = ollama.Client(host=url, timeout=10)
            calls = {
                "chat format": lambda stream: c.chat(model="ll", messages=ask, format=schema, stream=stream),
                "generate format": lambda stream: c.generate(model="ll", prompt="x", format=schema, stream=stream),
                "chat tools": lambda stream: c.chat(model="ll", messages=ask, tools=tools, stream=stream),
            }
            out = {}
            for name, call in calls.items():
                for stream in (False, True):
                    with pytest.raises(ollama.ResponseError) as refused:
                        answer = call(stream)
                        if stream:
                            list(answer)
                    out[name, stream] = refused.value
            with pytest.raises(ollama.ResponseError) as plain:
                c.chat(model="plain", messages=ask, format="json")
            return out, plain.value

        refused, plain = await in_thread(run)
    for (name, stream), exc in refused.items():
        field = name.split()[1]
        assert f"Invalid value for '{field}': the backend cannot turn its schema into a grammar" in exc.error, exc
        assert "schema must be an object" in exc.error
        if not stream:
            assert exc.status_code == 400
    assert len(neuron.requests) == 6
    assert plain.status_code == 400 and "response_format" not in plain.error, plain
    assert plain.error.startswith("model 'plain' cannot do format (its backend"), plain


@pytest.mark.parametrize(("seed", "sent"), [(-1, None), (-7, -7), (-(2**63), -(2**63)), (0, 0), (2**63 - 1, 2**63 - 1)])
async def test_options_seed_is_any_64_bit_integer_and_minus_one_is_no_seed_as_in_ollama(seed: int,
                                                                                        sent: int | None) -> None:
    fleet = Fleet()
    neuron = NeuronDouble("n1", fleet, loaded=("chat",))
    store = SqliteStore(":memory:")
    key = new_key(store, "acme")
    async with portals(fleet, {"acme": acme()}, store=store) as (_, urls):
        got = await in_thread(lambda: client(urls["acme"], key).generate(
            model="fast", prompt="x", options={"seed": seed, "num_predict": 2, "temperature": 1}, stream=False))
    assert got.done
    assert neuron.requests[0].sampling.seed == sent


@pytest.mark.parametrize(("method", "path", "status"), [
    ("POST", "/api/tags", 405), ("GET", "/api/chat", 405), ("POST", "/api/nosuch", 404), ("GET", "/api", 404),
    ("POST", "/api/blobs/sha256:00", 404),
])
async def test_a_path_under_api_no_route_takes_is_answered_in_ollamas_shape(method: str, path: str,
                                                                           status: int) -> None:
    fleet = Fleet()
    NeuronDouble("n1", fleet, loaded=("chat",))
    store = SqliteStore(":memory:")
    key = new_key(store, "acme")
    async with portals(fleet, {"acme": acme()}, store=store) as (_, urls):
        async with httpx.AsyncClient() as http:
            r = await http.request(method, urls["acme"] + path, headers=bearer(key), json={})

        def call():  # noqa: ANN202
            return _raises(lambda: client(urls["acme"], key)._request_raw("POST", "/api/tags"))

        raised = await in_thread(call)
    assert r.status_code == status
    assert list(r.json()) == ["error"] and isinstance(r.json()["error"], str) and path in r.json()["error"], r.text
    assert raised.status_code == 405 and "/api/tags" in raised.error  # what Ollama's client reads


async def test_the_client_raises_response_error_with_the_message_and_status() -> None:
    fleet = Fleet()
    NeuronDouble("n1", fleet, loaded=("chat",))
    store = SqliteStore(":memory:")
    key = new_key(store, "acme")
    async with portals(fleet, {"acme": acme()}, store=store) as (_, urls):
        def run():  # noqa: ANN202
            try:
                client(urls["acme"], key).chat(model="nope", messages=[{"role": "user", "content": "x"}])
            except ollama.ResponseError as exc:
                return exc
            return None

        unknown = await in_thread(run)
        unauthorized = await in_thread(lambda: _raises(lambda: client(urls["acme"], "sk-hlx-0123456789abcdef_" + "A" * 43)
                                                       .list()))
    assert unknown.status_code == 404 and "nope" in unknown.error
    assert unauthorized.status_code == 401


def _raises(call):  # noqa: ANN001, ANN202
    try:
        call()
    except ollama.ResponseError as exc:
        return exc
    raise AssertionError("no error")


def test_tool_calls_and_their_results_become_openai_messages_with_ids() -> None:
    body = ChatBody.model_validate({"model": "m", "messages": [
        {"role": "user", "content": "weather in Paris and Rome?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
            {"function": {"name": "get_time", "arguments": {}}}]},
        {"role": "tool", "tool_name": "get_time", "content": "noon"},
        {"role": "tool", "content": "sunny"},
    ]})
    messages, image = chat_messages(body)
    assert image is None
    assert messages[1] == {"role": "assistant", "tool_calls": [
        {"id": "call_1_0", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"id": "call_1_1", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]}
    assert messages[2:] == [{"role": "tool", "tool_call_id": "call_1_1", "content": "noon"},
                            {"role": "tool", "tool_call_id": "call_1_0", "content": "sunny"}]


async def test_a_neuron_lost_mid_stream_ends_the_stream_with_an_error_line(autojump_clock) -> None:
    fleet = Fleet()
    neuron = NeuronDouble("n1", fleet, loaded=("chat",), tokens=5, token_delay=1.0)
    store = SqliteStore(":memory:")
    key = new_key(store, "acme")

    async def kill() -> None:
        await trio.sleep(2.5)
        neuron.kill()

    async with portals(fleet, {"acme": acme()}, store=store, virtual=True) as (_, urls):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(kill)
            async with httpx.AsyncClient(timeout=10) as http:
                r = await http.post(urls["acme"] + "/api/generate", headers=bearer(key),
                                    json={"model": "fast", "prompt": "x"})
    lines = [json.loads(line) for line in r.text.splitlines()]
    assert [line.get("response") for line in lines[:2]] == ["t0 ", "t1 "]
    assert list(lines[-1]) == ["error"] and "went away" in lines[-1]["error"] and len(lines) == 3
    assert [(row.endpoint, row.outcome) for row in store.records()] == [("ollama_generate", "error")]


# --- model management: pull, delete, copy, create, push -------------------------------------


async def test_pull_streams_the_neurons_download_progress_to_the_ollama_client() -> None:
    fleet = Fleet()
    n1, n2 = NeuronDouble("n1", fleet, loaded=("embed",)), NeuronDouble("n2", fleet)
    store = SqliteStore(":memory:")
    key = new_key(store, "acme")
    async with portals(fleet, {"acme": acme()}, store=store) as (_, urls):
        def run():  # noqa: ANN202
            operator = ollama.Client(host=urls["acme"], headers=admin_headers(), timeout=10)
            lines = list(operator.pull("fast:latest", stream=True))
            whole = operator.pull("fast", stream=False)
            errors = {}
            for name, call in {
                "a key is not the operator": lambda: list(client(urls["acme"], key).pull("fast", stream=True)),
                "unknown model": lambda: operator.pull("nope"),
                "not the portal's name": lambda: operator.pull("chat2"),
            }.items():
                try:
                    call()
                except ollama.ResponseError as exc:
                    errors[name] = (exc.status_code, exc.error)
            return lines, whole, errors

        lines, whole, errors = await in_thread(run)
    assert lines[-1].status == "success" and whole.status == "success"
    for node in ("n1", "n2"):
        mine = [line for line in lines if line.status == f"pulling fast:latest on {node}"]
        assert mine[0].digest is None  # the announcement, then the download
        assert [(line.completed, line.total) for line in mine[1:]] == [(0, 3000), (1000, 3000), (2000, 3000),
                                                                         (3000, 3000)]
        assert all(line.digest and line.digest.startswith("sha256:") for line in mine[1:])
    assert [type(c).__name__ for c in n1.commands + n2.commands].count("PullModel") == 4  # streamed, then whole
    assert errors["a key is not the operator"][0] == 401 and "admin token" in errors["a key is not the operator"][1]
    assert errors["unknown model"][0] == 404 and errors["not the portal's name"][0] == 404


async def test_a_failed_pull_ends_the_stream_with_an_error_the_client_raises() -> None:
    fleet = Fleet()
    neuron = NeuronDouble("n1", fleet)
    neuron.refuse_load = True
    async with portals(fleet, {"acme": acme()}) as (_, urls):
        def run():  # noqa: ANN202
            operator = ollama.Client(host=urls["acme"], headers=admin_headers(), timeout=10)
            seen = []
            with pytest.raises(ollama.ResponseError) as streamed:
                for line in operator.pull("fast", stream=True):
                    seen.append(line)
            with pytest.raises(ollama.ResponseError) as whole:
                operator.pull("fast", stream=False)
            return seen, streamed.value, whole.value

        seen, streamed, whole = await in_thread(run)
    assert seen and seen[0].status == "pulling fast on n1"
    assert "disk full" in streamed.error and "disk full" in whole.error and whole.status_code == 503


async def test_delete_unloads_the_model_everywhere_and_copy_create_push_say_why_not() -> None:
    fleet = Fleet()
    n1, n2 = NeuronDouble("n1", fleet, loaded=("chat",)), NeuronDouble("n2", fleet, loaded=("chat", "embed"))
    n3 = NeuronDouble("n3", fleet)
    n3.models["chat"] = ModelStatus("chat", ModelState.CONFIGURED)  # only configured there: nothing to unload
    store = SqliteStore(":memory:")
    key = new_key(store, "acme")
    async with portals(fleet, {"acme": acme()}, store=store) as (_, urls):
        def run():  # noqa: ANN202
            operator = ollama.Client(host=urls["acme"], headers=admin_headers(), timeout=10)
            deleted = operator.delete("fast")
            errors = {}
            for name, call in {
                "again": lambda: operator.delete("fast"),
                "key deletes": lambda: client(urls["acme"], key).delete("embed"),
                "copy": lambda: client(urls["acme"], key).copy("fast", "mine"),
                "create": lambda: client(urls["acme"], key).create(model="mine", from_="fast"),
                "push": lambda: client(urls["acme"], key).push("fast"),
            }.items():
                try:
                    call()
                except ollama.ResponseError as exc:
                    errors[name] = (exc.status_code, exc.error)
            return deleted, errors

        deleted, errors = await in_thread(run)
    assert deleted.status == "success"
    assert "chat" not in n1.models and "chat" not in n2.models and "embed" in n2.models and n3.unloads() == []
    assert errors["again"][0] == 400 and "loaded on no neuron" in errors["again"][1]
    assert errors["key deletes"][0] == 401
    assert errors["copy"][0] == errors["create"][0] == errors["push"][0] == 400
    assert "alias" in errors["copy"][1] and "catalogue" in errors["create"][1] and "registry" in errors["push"][1]


@pytest.mark.parametrize("path, body, response_type", [
    ("/api/chat", {"messages": [{"role": "user", "content": "x"}]}, ollama.ChatResponse),
    ("/api/generate", {"prompt": "x"}, ollama.GenerateResponse),
])
async def test_a_stream_waiting_for_a_cold_load_sends_empty_pieces_the_client_takes(
        autojump_clock, path: str, body: dict, response_type: type) -> None:
    fleet = Fleet()
    NeuronDouble("n1", fleet, load_delay=2.5)
    catalogue = Catalogue([CatalogueEntry(id="chat", backend="synthetic", memory_mb=1)])
    async with serving(fleet, catalogue, orchestrator={"keepalive_interval": 1.0}) as (_, url):
        async with httpx.AsyncClient(timeout=5) as http:
            arrived = []
            t0 = trio.current_time()
            async with http.stream("POST", url + path, json={"model": "chat", "options": {"num_predict": 2},
                                                             **body}) as r:
                async for line in r.aiter_lines():
                    arrived.append((trio.current_time(), json.loads(line)))
    text = [(p.get("message") or {}).get("content", p.get("response")) for _, p in arrived]
    assert text == ["", "", "t0 ", "t1 ", ""]  # keep-alives at t = 1 and 2 s; loaded at 2.5 s
    assert [round(t - t0, 3) for t, _ in arrived[:2]] == [1.0, 2.0]
    assert [p["done"] for _, p in arrived] == [False, False, False, False, True]
    # What the ollama client's streaming iterator does with each line (ollama/_client.py):
    # no "error", so cls(**part).
    parsed = [response_type(**p) for _, p in arrived]
    assert parsed[0].done is False and parsed[-1].done_reason == "length"


async def test_a_null_stream_or_raw_is_the_default() -> None:
    fleet = Fleet()
    NeuronDouble("n1", fleet, loaded=("chat",))
    store = SqliteStore(":memory:")
    key = new_key(store, "acme")
    async with portals(fleet, {"acme": acme()}, store=store) as (_, urls):
        async with httpx.AsyncClient(base_url=urls["acme"], headers=bearer(key), timeout=10) as http:
            chat = await http.post("/api/chat", json={"model": "fast", "stream": None,
                                                      "messages": [{"role": "user", "content": "x"}]})
            gen = await http.post("/api/generate", json={"model": "fast", "prompt": "x", "stream": False, "raw": None})
    assert chat.status_code == 200 and chat.headers["content-type"].startswith("application/x-ndjson"), chat.text
    assert gen.status_code == 200 and gen.json()["done"], gen.text


async def test_an_answer_in_one_object_asks_the_fabric_for_one_so_it_can_be_tried_again_until_it_ends() -> None:
    # A streamed fabric request is the client's from its first token on: a worker killed
    # mid-answer was a 502 for /api/chat with "stream": false, where /v1/chat/completions
    # was answered from the model loaded again (that retry: test_workers_e2e, through OpenAI's route).
    fleet = Fleet()
    neuron = NeuronDouble("n1", fleet, loaded=("chat",), tokens=2)
    store = SqliteStore(":memory:")
    key = new_key(store, "acme")
    async with portals(fleet, {"acme": acme()}, store=store) as (_, urls):
        async with httpx.AsyncClient(base_url=urls["acme"], headers=bearer(key), timeout=10) as http:
            one = await http.post("/api/chat", json={"model": "fast", "stream": False,
                                                     "messages": [{"role": "user", "content": "x"}]})
            lines = await http.post("/api/generate", json={"model": "fast", "prompt": "x"})
    assert one.status_code == 200 and one.json()["done"] and one.json()["message"]["content"]
    assert isinstance(one.json()["prompt_eval_duration"], int)
    assert lines.status_code == 200 and lines.headers["content-type"] == "application/x-ndjson"
    assert [r.stream for r in neuron.requests] == [False, True]
