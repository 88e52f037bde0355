"""Chat Completions, complete, against SmolLM2 in real processes, with the official client.

``helexa cortex`` and ``helexa neuron`` run as a user runs them; SmolLM2 answers through
llama.cpp. Its chat template has no tool syntax, so its tool calls go through a JSON
grammar (``helexa.runtime.tool_grammar``): they must arrive as whole ``tool_calls`` whose
arguments parse as JSON valid against the tool's schema, streamed and not; a
``json_schema`` answer must validate against its schema; a prompt too long for the
context a request gets must be refused at once, before the model is even loaded.
"""

from __future__ import annotations

import json
import time

import jsonschema
import openai
import pytest

from procs import Cortex, ProcGroup

pytestmark = pytest.mark.slow

CHAT = "smollm2-135m-instruct"
MODELS_TOML = f"""
[models."{CHAT}"]
backend = "llama_cpp"
memory_mb = 300
[models."{CHAT}".config]
metadata = {{ n_ctx = 2048, n_threads = 1 }}
"""
WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Get the weather in a city",
                                           "parameters": WEATHER}}]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}


@pytest.fixture(scope="module")
def cortex(tmp_path_factory: pytest.TempPathFactory):
    with ProcGroup(tmp_path_factory.mktemp("chat-e2e")) as procs:
        cortex = procs.cortex(models=MODELS_TOML, env={"HELEXA_MISSED_HEARTBEATS": "10"})
        procs.neuron(cortex, "n1")
        yield cortex


@pytest.fixture(scope="module")
def client(cortex: Cortex):
    with openai.OpenAI(base_url=cortex.gateway_url + "/v1", api_key="unused", timeout=120, max_retries=0) as c:
        yield c


def test_a_too_long_prompt_is_refused_before_the_model_is_even_loaded(cortex: Cortex, client: openai.OpenAI) -> None:
    for _ in range(2):
        started = time.monotonic()
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "hello " * 1100}],
                                           max_tokens=8)
        elapsed = time.monotonic() - started
        print(f"refused in {elapsed * 1000:.0f} ms")
    assert info.value.body["code"] == "context_length_exceeded" and info.value.body["param"] == "messages"
    assert "maximum context length is 1024 tokens" in info.value.body["message"]
    assert CHAT not in cortex.neuron_view("n1")["models"]  # nothing was asked of the neuron


def test_a_required_tool_call_arrives_whole_with_arguments_valid_for_its_schema(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=CHAT, messages=ASK, tools=TOOLS, tool_choice="required",
                                       temperature=0, max_tokens=64)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id
    jsonschema.validate(json.loads(call.function.arguments), WEATHER)


def test_a_named_tool_call_streams_as_deltas_the_client_accumulates(client: openai.OpenAI) -> None:
    calls: dict[int, dict] = {}
    finish = None
    for chunk in client.chat.completions.create(
            model=CHAT, messages=ASK, tools=TOOLS, temperature=0, max_tokens=64, stream=True,
            tool_choice={"type": "function", "function": {"name": "get_weather"}}):
        for ch in chunk.choices:
            finish = ch.finish_reason or finish
            for delta in ch.delta.tool_calls or ():
                call = calls.setdefault(delta.index, {"name": "", "arguments": ""})
                call["name"] += delta.function.name or ""
                call["arguments"] += delta.function.arguments or ""
    assert finish == "tool_calls" and list(calls) == [0]
    assert calls[0]["name"] == "get_weather"
    jsonschema.validate(json.loads(calls[0]["arguments"]), WEATHER)


def test_a_tool_result_in_the_conversation_is_taken(client: openai.OpenAI) -> None:
    history = [*ASK, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 24 C"}]
    r = client.chat.completions.create(model=CHAT, messages=history, tools=TOOLS, tool_choice="auto",
                                       temperature=0, max_tokens=64)
    choice = r.choices[0]
    assert choice.message.content or choice.message.tool_calls


def test_a_json_schema_answer_validates_against_its_schema(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model=CHAT, messages=[{"role": "user", "content": "Give me a person named Bob aged 30 as JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}},
        temperature=0, max_tokens=60)
    jsonschema.validate(json.loads(r.choices[0].message.content), PERSON)


def test_json_object_mode_answers_a_json_object(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model=CHAT, messages=[{"role": "user", "content": "List two colours as a JSON object."}],
        response_format={"type": "json_object"}, temperature=0, max_tokens=40)
    text = r.choices[0].message.content
    assert text.lstrip().startswith("{"), text  # may be cut short by max_tokens, but it is JSON from the start


def test_logprobs_n_and_seed(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=CHAT, messages=ASK, max_tokens=4, logprobs=True, top_logprobs=2,
                                       n=2, seed=11, temperature=1.0)
    assert [c.index for c in r.choices] == [0, 1]
    for choice in r.choices:
        content = choice.logprobs.content
        assert len(content) == r.usage.completion_tokens // 2
        assert all(t.logprob <= 0 and len(t.top_logprobs) == 2 for t in content)
        assert "".join(t.token for t in content) == choice.message.content
    again = client.chat.completions.create(model=CHAT, messages=ASK, max_tokens=4, n=2, seed=11, temperature=1.0)
    assert [c.message.content for c in again.choices] == [c.message.content for c in r.choices]
    # The prompt is counted once, as OpenAI counts it (it was once summed over the choices).
    one = client.chat.completions.create(model=CHAT, messages=ASK, max_tokens=1)
    assert r.usage.prompt_tokens == again.usage.prompt_tokens == one.usage.prompt_tokens > 0
