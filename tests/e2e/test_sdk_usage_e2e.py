"""The usage each official client reads against the ledger, through a keyed portal that
serves SmolLM2 under an alias, in real processes (``helexa cortex`` and ``helexa neuron``,
llama.cpp answering).

Every call must be recorded once, with the tokens the answer's own usage shows; the
answer and its errors name the model as the portal does (``fast``), never the model behind
the alias.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anthropic
import ollama
import openai
import pydantic
import pytest

from procs import Cortex, ProcGroup

pytestmark = pytest.mark.slow

EXAMPLE_MODELS = Path(__file__).resolve().parents[2] / "examples" / "models.toml"
HIDDEN = "smollm2"  # the catalogue model behind the alias: no answer may name it
CONFIG = """
[portals.acme]
listen = ["127.0.0.1:0"]
auth = "keys"
aliases = { fast = "smollm2-135m-instruct" }
"""
WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Get the weather in a city",
                                         "parameters": WEATHER}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
CUT = 20  # tokens: SmolLM2's call to get_weather at temperature 0 takes 38, so the call is cut


@pytest.fixture(scope="module")
def cortex(tmp_path_factory: pytest.TempPathFactory):
    with ProcGroup(tmp_path_factory.mktemp("sdk-usage-e2e")) as procs:
        cortex = procs.cortex(models=EXAMPLE_MODELS, config=CONFIG, env={"HELEXA_MISSED_HEARTBEATS": "10"})
        procs.neuron(cortex, "n1")
        yield cortex


def new_key(cortex: Cortex, name: str) -> tuple[str, str, str]:
    """A key of its own for one test: (the portal's URL, the key, its id)."""
    made = cortex.admin("POST", "/admin/keys", json={"portal": "acme", "name": name})
    assert made.status_code in (200, 201), made.text
    return cortex.portal_urls["acme"][0], made.json()["key"], made.json()["key_id"]


def records(cortex: Cortex, key_id: str) -> list[dict[str, Any]]:
    got = cortex.admin("GET", f"/admin/usage/records?key={key_id}&limit=1000")
    assert got.status_code == 200, got.text
    return got.json()["data"]


def test_a_tool_call_cut_short_bills_every_token_it_generated_on_every_surface(cortex: Cortex) -> None:
    """The grammar's JSON of a call cut by the token limit is never shown, but each of its
    tokens was generated: the answer's usage and the ledger count all of them (they were 0:
    the cortex held the neuron's count to what the answer showed)."""
    url, key, key_id = new_key(cortex, "cut-tools")
    seen: list[int] = []
    with openai.OpenAI(base_url=url + "/v1", api_key=key, timeout=120, max_retries=0) as oai:
        whole = oai.chat.completions.create(model="fast", messages=ASK, tools=[TOOL], tool_choice="required",
                                            max_tokens=CUT, temperature=0)
        assert whole.choices[0].finish_reason == "length" and not whole.choices[0].message.tool_calls
        seen.append(whole.usage.completion_tokens)
        stream = oai.chat.completions.create(model="fast", messages=ASK, tools=[TOOL], tool_choice="required",
                                             max_tokens=CUT, temperature=0, stream=True,
                                             stream_options={"include_usage": True})
        seen.append([c.usage for c in stream if c.usage is not None][0].completion_tokens)
        response = oai.responses.create(model="fast", input=ASK[0]["content"], tool_choice="required",
                                        tools=[{"type": "function", **TOOL["function"]}], max_output_tokens=CUT,
                                        temperature=0)
        assert response.status == "incomplete"
        seen.append(response.usage.output_tokens)
    with anthropic.Anthropic(base_url=url, api_key=key, timeout=120, max_retries=0) as claude:
        message = claude.messages.create(model="fast", messages=ASK, max_tokens=CUT, tool_choice={"type": "any"},
                                         tools=[{"name": "get_weather", "description": "Get the weather in a city",
                                                 "input_schema": WEATHER}], extra_body={"temperature": 0})
        assert message.stop_reason == "max_tokens"
        seen.append(message.usage.output_tokens)
    chat = ollama.Client(host=url, headers={"authorization": f"Bearer {key}"}, timeout=120).chat(
        model="fast", messages=ASK, tools=[TOOL], options={"num_predict": CUT, "temperature": 0})
    assert chat.done_reason == "length" and not chat.message.tool_calls
    seen.append(chat.eval_count)
    assert seen == [CUT] * 5
    rows = records(cortex, key_id)
    assert [r["endpoint"] for r in rows] == ["chat", "chat", "responses", "messages", "ollama_chat"]
    assert [r["completion_tokens"] for r in rows] == [CUT] * 5


def test_refusals_name_the_portals_model_never_the_one_behind_its_alias(cortex: Cortex) -> None:
    url, key, key_id = new_key(cortex, "refusals")
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]
    refusals: list[str] = []
    with openai.OpenAI(base_url=url + "/v1", api_key=key, timeout=120, max_retries=0) as oai:
        for kw in ({"messages": image}, {"messages": ASK, "max_tokens": 100_000},
                   {"messages": ASK, "logit_bias": {"999999": 1}}):
            with pytest.raises(openai.BadRequestError) as refused:
                oai.chat.completions.create(model="fast", **({"max_tokens": 4} | kw))
            refusals.append(refused.value.message)
    with anthropic.Anthropic(base_url=url, api_key=key, timeout=120, max_retries=0) as claude:
        for kw in ({"max_tokens": 100_000, "messages": ASK},
                   {"max_tokens": 4, "messages": [{"role": "user", "content": [
                       {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}]}]}):
            with pytest.raises(anthropic.BadRequestError) as refused:
                claude.messages.create(model="fast", **kw)
            refusals.append(refused.value.message)
    with pytest.raises(ollama.ResponseError) as bad:
        ollama.Client(host=url, headers={"authorization": f"Bearer {key}"}, timeout=120).generate(
            model="fast", prompt="what is this?", images=["AAAA"])
    refusals.append(bad.value.error)
    assert all("'fast'" in r and HIDDEN not in r for r in refusals), refusals
    assert records(cortex, key_id) == []  # all refused at the edge


def test_tools_with_structured_output_are_refused_at_the_edge_in_each_surfaces_words(cortex: Cortex) -> None:
    """SmolLM2's tools are a JSON grammar, which llama.cpp cannot combine with a format's:
    a 400 naming the format field, before any neuron (it was the neuron's refusal, naming
    the model behind the alias, with a ledger record and an rpm request spent)."""
    url, key, key_id = new_key(cortex, "tools-format")
    with openai.OpenAI(base_url=url + "/v1", api_key=key, timeout=120, max_retries=0) as oai:
        for stream in (False, True):
            with pytest.raises(openai.BadRequestError) as refused:
                oai.chat.completions.create(model="fast", messages=ASK, tools=[TOOL], max_tokens=8, stream=stream,
                                            response_format={"type": "json_object"})
            assert refused.value.body["param"] == "response_format" and refused.value.code == "unsupported"
            assert HIDDEN not in refused.value.message
        with pytest.raises(openai.BadRequestError) as refused:
            oai.responses.create(model="fast", input="hi", tools=[{"type": "function", **TOOL["function"]}],
                                 text={"format": {"type": "json_object"}}, max_output_tokens=8)
        assert refused.value.body["param"] == "text.format" and HIDDEN not in refused.value.message
    with pytest.raises(ollama.ResponseError) as bad:
        ollama.Client(host=url, headers={"authorization": f"Bearer {key}"}, timeout=120).chat(
            model="fast", messages=ASK, tools=[TOOL], format="json", options={"num_predict": 8})
    assert bad.value.status_code == 400 and bad.value.error.startswith("format: ") and HIDDEN not in bad.value.error
    assert records(cortex, key_id) == []


def test_chat_usage_shows_the_cached_prompt_tokens_the_ledger_records(cortex: Cortex) -> None:
    """A key's repeated prompt reuses llama.cpp's cache: Chat Completions and completions
    report it as OpenAI does (``prompt_tokens_details.cached_tokens``), streamed or not, as
    the ledger records it (the usage carried no details at all). Each kind is asked again
    until a repeat hits the cache: on a loaded machine the slot holding the prefix can still
    be finishing an earlier test's generation, and llama.cpp then takes the other slot."""
    url, key, key_id = new_key(cortex, "cached")
    ask = [{"role": "user", "content": "Name three colours of the rainbow, please."}]
    cached: list[int] = []
    with openai.OpenAI(base_url=url + "/v1", api_key=key, timeout=120, max_retries=0) as oai:
        def chat() -> int:
            return oai.chat.completions.create(model="fast", messages=ask, max_tokens=4, temperature=0
                                               ).usage.prompt_tokens_details.cached_tokens

        def streamed() -> int:
            stream = oai.chat.completions.create(model="fast", messages=ask, max_tokens=4, temperature=0, stream=True,
                                                 stream_options={"include_usage": True})
            return [c.usage for c in stream if c.usage is not None][0].prompt_tokens_details.cached_tokens

        def completion() -> int:
            return oai.completions.create(model="fast", prompt="The rainbow has seven colours:", max_tokens=4,
                                          temperature=0).usage.prompt_tokens_details.cached_tokens

        hits = []
        for ask_once in (chat, streamed, completion):
            for _ in range(5):
                cached.append(ask_once())
                if cached[-1] > 0:
                    break
            hits.append(cached[-1])
    rows = records(cortex, key_id)
    assert cached == [r["cached_tokens"] for r in rows]
    assert cached[0] == 0 and all(h > 0 for h in hits), cached


def test_a_tool_defined_without_parameters_is_called_with_none(cortex: Cortex) -> None:
    """OpenAI: omitting ``parameters`` defines a function with an empty parameter list (the
    grammar let SmolLM2 invent arguments: ``{"type": "datetime.datetime", ...}``)."""
    url, key, _ = new_key(cortex, "no-parameters")
    now = {"type": "function", "function": {"name": "now", "description": "The current time"}}
    with openai.OpenAI(base_url=url + "/v1", api_key=key, timeout=120, max_retries=0) as oai:
        answer = oai.chat.completions.create(model="fast", messages=[{"role": "user", "content": "What time is it?"}],
                                             tools=[now], tool_choice="required", max_tokens=60, temperature=0.8,
                                             seed=3)
    (call,) = answer.choices[0].message.tool_calls
    assert call.function.name == "now" and json.loads(call.function.arguments) == {}


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_the_anthropic_tool_runner_sends_its_whole_conversation_when_threads_are_refused(cortex: Cortex,
                                                                                         stream: bool) -> None:
    """The SDK's tool runner asks the server to hold the conversation (``thread``), then
    sends only the tool result: ignored, that turn reached the model with no question, no
    call and no tools. Refused (``thread_unsupported_request``), the SDK sends the whole
    conversation again without ``thread``, and only the turns that ran are billed."""
    url, key, key_id = new_key(cortex, f"tool-runner-{stream}")

    @anthropic.beta_tool
    def get_weather(city: str) -> str:
        """Get the weather in a city."""
        return "Sunny, 21 C"

    with anthropic.Anthropic(base_url=url, api_key=key, timeout=120, max_retries=0) as claude:
        runner = claude.beta.messages.tool_runner(model="fast", max_tokens=60, tools=[get_weather], messages=ASK,
                                                  max_iterations=2, stream=stream, extra_body={"temperature": 0})
        turns = [turn.get_final_message() if stream else turn for turn in runner]
        assert [t.stop_reason for t in turns][:1] == ["tool_use"] and len(turns) == 2
        prompts = [t.usage.input_tokens + t.usage.cache_read_input_tokens for t in turns]
        assert prompts[1] > prompts[0]  # the question, the call and the tools came again with the result
        rows = records(cortex, key_id)
        assert [(r["prompt_tokens"], r["endpoint"]) for r in rows] == [(p, "messages") for p in prompts]
        with pytest.raises(anthropic.BadRequestError) as refused:  # a thread asked for by hand: a clear refusal
            claude.beta.messages.create(model="fast", max_tokens=4, messages=ASK, extra_body={"thread": {
                "type": "continue", "previous_message_id": turns[0].id}})
    assert refused.value.body["error"]["details"] == {"error_code": "thread_unsupported_request"}
    assert "thread" in refused.value.message and len(records(cortex, key_id)) == 2


class City(pydantic.BaseModel):
    name: str
    country: str


def test_anthropic_structured_output_parses_with_the_sdk(cortex: Cortex) -> None:
    """``client.messages.parse(output_format=Model)`` sends ``output_config.format``: it was
    ignored, the answer was free text and the SDK raised a ValidationError on a billed
    answer. It is the same JSON-schema grammar as OpenAI's ``response_format``."""
    url, key, key_id = new_key(cortex, "anthropic-structured")
    ask = [{"role": "user", "content": "What is the capital of France? Answer as JSON."}]
    with anthropic.Anthropic(base_url=url, api_key=key, timeout=120, max_retries=0) as claude:
        whole = claude.messages.parse(model="fast", max_tokens=80, messages=ask, output_format=City)
        with claude.messages.stream(model="fast", max_tokens=80, messages=ask, output_format=City) as stream:
            streamed = stream.get_final_message()
        beta = claude.messages.create(model="fast", max_tokens=80, messages=ask, extra_body={  # the beta's name
            "output_format": {"type": "json_schema", "schema": City.model_json_schema()}})
        with pytest.raises(anthropic.BadRequestError) as refused:
            claude.messages.create(model="fast", max_tokens=8, messages=ask, output_config={"format": {
                "type": "json_schema", "schema": {"type": "object", "properties": {"a": {"$ref": "#/nope"}}}}})
    for answer in (whole, streamed, beta):
        assert answer.stop_reason == "end_turn", answer
    assert isinstance(whole.parsed_output, City) and isinstance(streamed.parsed_output, City)
    City.model_validate_json(beta.content[0].text)
    assert "output_config.format.schema" in refused.value.message
    assert [r["completion_tokens"] for r in records(cortex, key_id)] == [
        a.usage.output_tokens for a in (whole, streamed, beta)]


def test_openais_deprecated_functions_are_refused_not_answered_as_text(cortex: Cortex) -> None:
    """``functions`` / ``function_call`` (OpenAI's names before ``tools``) were ignored as
    unknown fields: a forced call came back as free text, billed."""
    url, key, key_id = new_key(cortex, "functions")
    function = {"name": "get_weather", "parameters": WEATHER}
    with openai.OpenAI(base_url=url + "/v1", api_key=key, timeout=120, max_retries=0) as oai:
        for kw, param in (({"functions": [function]}, "functions"),
                          ({"function_call": {"name": "get_weather"}, "tools": [TOOL]}, "function_call")):
            with pytest.raises(openai.BadRequestError) as refused:
                oai.chat.completions.create(model="fast", messages=ASK, max_tokens=8, **kw)
            assert refused.value.body["param"] == param
    assert records(cortex, key_id) == []


def test_a_stream_the_client_cuts_bills_the_prompt_the_whole_answer_would(cortex: Cortex) -> None:
    """The neuron's usage never comes for a stream the client cuts: its prompt is billed at
    the edge's exact count (SmolLM2's tokenizer), which is llama.cpp's own (a quarter of
    the request's bytes billed a cut "hi" 1 token of 31)."""
    import time

    url, key, key_id = new_key(cortex, "cut-stream")
    hi = [{"role": "user", "content": "hi"}]
    with openai.OpenAI(base_url=url + "/v1", api_key=key, timeout=120, max_retries=0) as oai:
        whole = oai.chat.completions.create(model="fast", messages=hi, max_tokens=2, temperature=0)
        stream = oai.chat.completions.create(model="fast", messages=hi, max_tokens=400, temperature=0, stream=True)
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                break
        stream.close()
    deadline = time.monotonic() + 30
    while len(rows := records(cortex, key_id)) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [r["outcome"] for r in rows] == ["ok", "client_gone"]
    assert rows[1]["completion_tokens"] >= 1
    assert rows[1]["prompt_tokens"] == whole.usage.prompt_tokens > 20


def test_a_stop_sequence_in_a_tool_calls_arguments_does_not_cut_the_call(cortex: Cortex) -> None:
    """Stop sequences apply to the answer's text: SmolLM2's call (the grammar's JSON,
    ``{"city": "Paris"}``) holds ``city`` and came back ``finish_reason: stop`` with no
    content, the call lost, on every surface."""
    url, key, _ = new_key(cortex, "stop-in-call")
    with openai.OpenAI(base_url=url + "/v1", api_key=key, timeout=120, max_retries=0) as oai:
        whole = oai.chat.completions.create(model="fast", messages=ASK, tools=[TOOL], tool_choice="required",
                                            stop=["city"], max_tokens=80, temperature=0)
        assert whole.choices[0].finish_reason == "tool_calls", whole
        assert json.loads(whole.choices[0].message.tool_calls[0].function.arguments).get("city")
        stream = oai.chat.completions.create(model="fast", messages=ASK, tools=[TOOL], tool_choice="required",
                                             stop=["city"], max_tokens=80, temperature=0, stream=True)
        chunks = [c for c in stream if c.choices]
        assert chunks[-1].choices[0].finish_reason == "tool_calls"
        assert any(c.choices[0].delta.tool_calls for c in chunks)
    with anthropic.Anthropic(base_url=url, api_key=key, timeout=120, max_retries=0) as claude:
        message = claude.messages.create(model="fast", messages=ASK, max_tokens=80, tool_choice={"type": "any"},
                                         stop_sequences=["city"],
                                         tools=[{"name": "get_weather", "description": "Get the weather in a city",
                                                 "input_schema": WEATHER}], extra_body={"temperature": 0})
        assert message.stop_reason == "tool_use" and message.stop_sequence is None, message
        assert [b.type for b in message.content] == ["tool_use"] and message.content[0].input.get("city")
    chat = ollama.Client(host=url, headers={"authorization": f"Bearer {key}"}, timeout=120).chat(
        model="fast", messages=ASK, tools=[TOOL], options={"num_predict": 80, "temperature": 0, "stop": ["city"]})
    assert chat.message.tool_calls and chat.message.tool_calls[0].function.arguments.get("city"), chat
