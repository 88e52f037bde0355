"""OpenAI's Responses API and Ollama's API against SmolLM2 in real processes, through a
keyed portal, with the official ``openai`` and ``ollama`` clients.

``helexa cortex`` and ``helexa neuron`` run as a user runs them; SmolLM2 answers through
llama.cpp. A tool call under ``tool_choice: "required"`` (or a named function) must
arrive whole (a ``function_call`` item; Ollama's ``tool_calls``) with arguments that parse
and match the tool's schema; a ``json_schema`` answer must validate; every answer is in
the ledger under the key that asked.
"""

from __future__ import annotations

import json

import jsonschema
import ollama
import openai
import pydantic
import pytest

from procs import ProcGroup

pytestmark = pytest.mark.slow

CHAT = "smollm2-135m-instruct"
MODELS_TOML = f"""
[models."{CHAT}"]
backend = "llama_cpp"
memory_mb = 300
[models."{CHAT}".config]
metadata = {{ n_ctx = 2048, n_threads = 1 }}
"""
CONFIG = """
[portals.acme]
listen = ["127.0.0.1:0"]
auth = "keys"
"""
WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOL = {"type": "function", "name": "get_weather", "description": "Get the weather in a city", "parameters": WEATHER}
OLLAMA_TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Get the weather in a city",
                                                "parameters": WEATHER}}
ASK = "What is the weather in Paris?"
PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    with ProcGroup(tmp_path_factory.mktemp("responses-ollama-e2e")) as procs:
        cortex = procs.cortex(models=MODELS_TOML, config=CONFIG, env={"HELEXA_MISSED_HEARTBEATS": "10"})
        procs.neuron(cortex, "n1")
        made = cortex.admin("POST", "/admin/keys", json={"portal": "acme", "name": "e2e"})
        assert made.status_code in (200, 201), made.text
        yield cortex, cortex.portal_urls["acme"][0], made.json()["key"], made.json()["key_id"]


@pytest.fixture(scope="module")
def oai(served):  # noqa: ANN001, ANN201
    _, url, key, _ = served
    with openai.OpenAI(base_url=url + "/v1", api_key=key, timeout=120, max_retries=0) as c:
        yield c


@pytest.fixture(scope="module")
def oll(served):  # noqa: ANN001, ANN201
    _, url, key, _ = served
    return ollama.Client(host=url, headers={"authorization": f"Bearer {key}"}, timeout=120)


def test_ollamas_empty_generate_loads_the_model_before_it_answers_load(served, oll: ollama.Client) -> None:  # noqa: ANN001
    """First in the module: nothing has loaded SmolLM2 yet."""
    cortex = served[0]
    assert CHAT not in cortex.neuron_view("n1")["models"]
    got = oll.generate(model=CHAT, prompt="")
    assert got.done and got.done_reason == "load" and got.response == ""
    assert cortex.neuron_view("n1")["models"][CHAT]["state"] == "loaded"  # loaded when the answer came
    again = oll.chat(model=CHAT, messages=[], stream=True)
    assert [(p.done, p.done_reason) for p in again] == [(True, "load")]  # loaded already: at once


def test_a_response_answers_and_continues_from_its_previous_response(oai: openai.OpenAI) -> None:
    first = oai.responses.create(model=CHAT, input="What is the capital of France? Answer in one sentence.",
                                 temperature=0, max_output_tokens=24)
    assert first.status == "completed" and "Paris" in first.output_text, first
    with oai.responses.stream(model=CHAT, input="And of Italy?", previous_response_id=first.id, temperature=0,
                              max_output_tokens=24) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        second = stream.get_final_response()
    assert second.output_text and "".join(deltas) == second.output_text
    assert second.previous_response_id == first.id and second.usage.input_tokens > first.usage.input_tokens
    assert oai.responses.retrieve(second.id).output_text == second.output_text


def test_a_required_tool_call_arrives_as_a_whole_function_call_item(oai: openai.OpenAI) -> None:
    r = oai.responses.create(model=CHAT, input=ASK, tools=[TOOL], tool_choice="required", temperature=0,
                             max_output_tokens=64)
    (call,) = [item for item in r.output if item.type == "function_call"]
    assert call.name == "get_weather" and call.call_id and call.status == "completed"
    jsonschema.validate(json.loads(call.arguments), WEATHER)
    # Its result, handed back, is taken as the conversation's next turn.
    after = oai.responses.create(model=CHAT, previous_response_id=r.id, temperature=0, max_output_tokens=24, input=[
        {"type": "function_call_output", "call_id": call.call_id, "output": "Sunny, 24 C"}])
    assert after.status in ("completed", "incomplete") and after.output


def test_a_named_tool_call_streams_its_argument_events_to_the_sdk(oai: openai.OpenAI) -> None:
    with oai.responses.stream(model=CHAT, input=ASK, tools=[TOOL], temperature=0, max_output_tokens=64,
                              tool_choice={"type": "function", "name": "get_weather"}) as stream:
        kinds = [e.type for e in stream]
        final = stream.get_final_response()
    assert kinds[:3] == ["response.created", "response.in_progress", "response.output_item.added"]
    assert kinds[-3:] == ["response.function_call_arguments.done", "response.output_item.done", "response.completed"]
    (call,) = final.output
    assert call.type == "function_call" and call.name == "get_weather"
    jsonschema.validate(json.loads(call.arguments), WEATHER)


def test_a_tool_call_cut_short_is_incomplete_and_shows_none_of_its_json(oai: openai.OpenAI) -> None:
    # Three tokens cannot finish the JSON the tool grammar forces: the answer says it was cut,
    # and none of its raw JSON comes back as text, streamed or not.
    asked = dict(model=CHAT, input=ASK, tools=[TOOL], tool_choice="required", max_output_tokens=3)
    r = oai.responses.create(**asked)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens", r
    assert r.output_text == "" and not [i for i in r.output if i.type == "function_call"], r
    # (The SDK's responses.stream() helper wants a response.completed; the raw events, then.)
    events = list(oai.responses.create(**asked, stream=True))
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert events[-1].type == "response.incomplete", [e.type for e in events]
    final = events[-1].response
    assert final.status == "incomplete" and final.incomplete_details.reason == "max_output_tokens"
    assert "".join(deltas) == final.output_text == ""


def test_a_json_schema_text_format_answer_validates(oai: openai.OpenAI) -> None:
    r = oai.responses.create(model=CHAT, input="Give me a person named Bob aged 30 as JSON.", temperature=0,
                             max_output_tokens=60, text={"format": {"type": "json_schema", "name": "person",
                                                                    "schema": PERSON, "strict": True}})
    jsonschema.validate(json.loads(r.output_text), PERSON)
    # The SDK's own structured-output helper: a pydantic model in, a parsed instance out.
    parsed = oai.responses.parse(model=CHAT, input="Give me a person named Bob aged 30 as JSON.", temperature=0,
                                 max_output_tokens=60, text_format=Person).output_parsed
    assert isinstance(parsed, Person) and isinstance(parsed.age, int)


class Person(pydantic.BaseModel):
    name: str
    age: int


def test_ollama_chat_generate_and_stream(oll: ollama.Client) -> None:
    answer = oll.chat(model=f"{CHAT}:latest", messages=[
        {"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
        options={"temperature": 0, "num_predict": 24})
    assert "Paris" in answer.message.content and answer.done and answer.eval_count > 0
    assert answer.prompt_eval_count > 0 and answer.eval_duration > 0
    pieces = list(oll.generate(model=CHAT, prompt="Name a colour.", options={"temperature": 0, "num_predict": 8},
                               stream=True))
    assert pieces[-1].done and pieces[-1].done_reason in ("stop", "length")
    assert "".join(p.response for p in pieces).strip()
    assert CHAT in [m.model for m in oll.list().models] and CHAT in [m.model for m in oll.ps().models]


def test_ollama_tool_call_and_json_schema_format(oll: ollama.Client) -> None:
    r = oll.chat(model=CHAT, messages=[{"role": "user", "content": ASK}], tools=[OLLAMA_TOOL],
                 options={"temperature": 0, "num_predict": 64})
    # Ollama has no tool_choice (it is "auto"): SmolLM2 under greedy decoding calls the tool;
    # the call arrives whole, its arguments an object valid for the schema.
    (call,) = r.message.tool_calls
    assert call.function.name == "get_weather"
    jsonschema.validate(dict(call.function.arguments), WEATHER)
    person = oll.chat(model=CHAT, messages=[{"role": "user", "content": "Give me a person named Bob aged 30."}],
                      format=PERSON, options={"temperature": 0, "num_predict": 60})
    jsonschema.validate(json.loads(person.message.content), PERSON)


def test_ollama_tool_call_cut_short_ends_with_length_and_shows_none_of_its_json(oll: ollama.Client) -> None:
    asked = dict(model=CHAT, messages=[{"role": "user", "content": ASK}], tools=[OLLAMA_TOOL],
                 options={"num_predict": 3})
    r = oll.chat(**asked)
    assert r.done_reason == "length" and r.message.content == "" and not r.message.tool_calls, r
    pieces = list(oll.chat(**asked, stream=True))
    assert pieces[-1].done_reason == "length" and "".join(p.message.content for p in pieces) == ""


def test_every_answer_is_in_the_ledger_under_the_key(served, oai: openai.OpenAI, oll: ollama.Client) -> None:  # noqa: ANN001
    cortex, _, _, key_id = served
    oai.responses.create(model=CHAT, input="Hi", max_output_tokens=4, store=False)
    oll.generate(model=CHAT, prompt="Hi", options={"num_predict": 4})
    rows = cortex.admin("GET", f"/admin/usage/records?key={key_id}").json()
    rows = rows["data"]
    endpoints = {r["endpoint"] for r in rows}
    assert {"responses", "ollama_generate"} <= endpoints
    assert all(r["key_id"] == key_id and r["portal"] == "acme" for r in rows)
    ok = [r for r in rows if r["outcome"] == "ok"]
    assert ok and all(r["prompt_tokens"] > 0 and r["completion_tokens"] > 0 for r in ok)
