"""A schema that passes the edge's checks (:mod:`helexa.roles.cortex.schema_check`) but that
llama.cpp cannot turn into a grammar, against SmolLM2 in real processes, with the official
clients: the 400 names the field the client sent it in (``param`` on OpenAI's shapes, the
message on Anthropic's and Ollama's), not ``param: null``.

The schema: a property whose schema is ``true`` (valid JSON Schema, "anything"), which
llama.cpp refuses: "JSON schema error at #/properties/a: schema must be an object".
"""

from __future__ import annotations

import anthropic
import ollama
import openai
import pytest

from procs import Cortex, ProcGroup
from test_chat_completions_e2e import CHAT, MODELS_TOML

pytestmark = pytest.mark.slow

UNUSABLE = {"type": "object", "properties": {"a": True}}
ASK = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def cortex(tmp_path_factory: pytest.TempPathFactory):
    with ProcGroup(tmp_path_factory.mktemp("schema-e2e")) as procs:
        cortex = procs.cortex(models=MODELS_TOML, env={"HELEXA_MISSED_HEARTBEATS": "10"})
        procs.neuron(cortex, "n1")
        yield cortex


@pytest.fixture(scope="module")
def client(cortex: Cortex):
    with openai.OpenAI(base_url=cortex.gateway_url + "/v1", api_key="unused", timeout=120, max_retries=0) as c:
        yield c


def _refused(call) -> dict:  # noqa: ANN001
    with pytest.raises(openai.BadRequestError) as info:
        call()
    body = info.value.body
    assert "grammar" in body["message"], body
    return body


@pytest.mark.parametrize("stream", [False, True])
def test_chat_names_response_format_and_tools(client: openai.OpenAI, stream: bool) -> None:
    def chat(**kw):  # noqa: ANN003, ANN202
        r = client.chat.completions.create(model=CHAT, messages=ASK, max_tokens=8, stream=stream, **kw)
        if stream:
            for _ in r:
                pass

    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": UNUSABLE}}
    if stream:  # the error comes once the stream began: an SSE error event, which the client raises
        with pytest.raises(openai.APIError) as info:
            chat(response_format=fmt)
        assert info.value.body["param"] == "response_format", info.value.body
        return
    assert _refused(lambda: chat(response_format=fmt))["param"] == "response_format"
    tools = [{"type": "function", "function": {"name": "f", "parameters": UNUSABLE}}]
    assert _refused(lambda: chat(tools=tools, tool_choice="required"))["param"] == "tools"


def test_responses_names_text_format_and_tools(client: openai.OpenAI) -> None:
    fmt = {"format": {"type": "json_schema", "name": "x", "schema": UNUSABLE}}
    assert _refused(lambda: client.responses.create(model=CHAT, input="hi", max_output_tokens=16,
                                                    text=fmt))["param"] == "text.format"
    tools = [{"type": "function", "name": "f", "parameters": UNUSABLE}]
    assert _refused(lambda: client.responses.create(model=CHAT, input="hi", max_output_tokens=16, tools=tools,
                                                    tool_choice="required"))["param"] == "tools"


def test_anthropic_names_tools_in_its_message(cortex: Cortex) -> None:
    with anthropic.Anthropic(base_url=cortex.gateway_url, api_key="unused", max_retries=0) as client:
        with pytest.raises(anthropic.BadRequestError) as info:
            client.messages.create(model=CHAT, messages=ASK, max_tokens=8,
                                   tools=[{"name": "f", "input_schema": UNUSABLE}], tool_choice={"type": "any"})
    error = info.value.body["error"]
    assert error["type"] == "invalid_request_error" and "'tools'" in error["message"], error


@pytest.mark.parametrize("stream", [False, True])
def test_ollama_names_format_in_its_message(cortex: Cortex, stream: bool) -> None:
    client = ollama.Client(host=cortex.gateway_url, timeout=120)
    with pytest.raises(ollama.ResponseError) as info:
        answer = client.chat(model=CHAT, messages=ASK, format=UNUSABLE, options={"num_predict": 8}, stream=stream)
        if stream:
            list(answer)
    assert "Invalid value for 'format'" in info.value.error and "grammar" in info.value.error, info.value
    with pytest.raises(ollama.ResponseError) as info:
        answer = client.generate(model=CHAT, prompt="hi", format=UNUSABLE, options={"num_predict": 8}, stream=stream)
        if stream:
            list(answer)
    assert "Invalid value for 'format'" in info.value.error, info.value
