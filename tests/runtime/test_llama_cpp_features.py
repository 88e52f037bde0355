"""The llama_cpp backend's generation features on the tiny GGUF: the context one request
gets, the check before a request waits for a slot, logprobs, and tools through a grammar
for a template without tool syntax (answers with real weights: tests/e2e)."""

from __future__ import annotations

import contextlib
import json
from dataclasses import replace
from pathlib import Path

import pytest

from helexa.protocol import (
    GenerateRequest,
    GenerateResult,
    ModelConfig,
    OutputFormat,
    ResponseFormat,
    SamplingParams,
    Task,
    TokenChunk,
    ToolChoice,
    ToolChoiceMode,
    ToolSpec,
)
from helexa.roles.cortex.catalogue import LLAMA_CPP_N_CTX, LLAMA_CPP_N_PARALLEL
from helexa.runtime import ContextLengthExceeded, InvalidRequest, Unsupported, create_backend
from helexa.runtime.llama_cpp import LlamaCppBackend
from helexa.runtime.testing import tiny_llama_config


@pytest.fixture
async def tiny(tiny_gguf: Path):
    backend = create_backend(tiny_llama_config(tiny_gguf, n_ctx=512))
    await backend.load(lambda *args: None)
    try:
        yield backend
    finally:
        await backend.unload()


def chat(content: str, **kw) -> GenerateRequest:
    sampling = kw.pop("sampling", SamplingParams(max_tokens=4, temperature=0.0))
    return GenerateRequest("r", "tiny-llama", Task.CHAT, messages=({"role": "user", "content": content},),
                           sampling=sampling, **kw)


async def run(backend, request) -> list:
    async with contextlib.aclosing(backend.chat(request)) as it:
        return [e async for e in it]


def test_the_catalogue_knows_the_backend_defaults() -> None:
    backend = LlamaCppBackend(ModelConfig("m", "llama_cpp"))
    assert (backend._settings.n_ctx, backend._n_parallel) == (LLAMA_CPP_N_CTX, LLAMA_CPP_N_PARALLEL)
    assert backend.context_length() == LLAMA_CPP_N_CTX // LLAMA_CPP_N_PARALLEL


async def test_a_request_gets_n_ctx_split_across_the_slots(tiny) -> None:
    assert tiny.context_length() == 256  # llama.cpp's own figure, read from the loaded server


async def test_a_prompt_too_long_for_a_slot_is_refused_before_it_waits_for_one(tiny) -> None:
    with pytest.raises(ContextLengthExceeded, match="maximum context length is 256 tokens"):
        await run(tiny, chat("hello " * 300))
    with pytest.raises(ContextLengthExceeded, match="in the completion"):
        await run(tiny, chat("hello " * 200, sampling=SamplingParams(max_tokens=100)))
    assert tiny._in_flight == 0  # never admitted
    events = await run(tiny, chat("hello " * 200))
    assert isinstance(events[-1], GenerateResult) and events[-1].usage.completion_tokens == 4


async def test_a_count_made_at_the_edge_is_trusted(tiny) -> None:
    with pytest.raises(ContextLengthExceeded):
        await run(tiny, chat("hi", prompt_tokens=300))


async def test_logprobs_come_with_each_token(tiny) -> None:
    events = await run(tiny, chat("hi", sampling=SamplingParams(max_tokens=3, temperature=0.0, logprobs=True,
                                                               top_logprobs=2)))
    chunks = [e for e in events if isinstance(e, TokenChunk)]
    logprobs = [lp for c in chunks for lp in c.logprobs or ()]
    assert len(logprobs) == 3 and "".join(lp.token for lp in logprobs) == "".join(c.text for c in chunks)
    assert all(lp.logprob <= 0 and len(lp.top) == 2 for lp in logprobs)


async def test_tools_and_response_format_together_are_refused_for_a_grammar_tool_model(tiny) -> None:
    tools = (ToolSpec("f", None, {"type": "object"}),)
    with pytest.raises(InvalidRequest, match="tools cannot be combined with structured output"):
        await run(tiny, chat("hi", tools=tools, tool_choice=ToolChoice(ToolChoiceMode.REQUIRED),
                             response_format=ResponseFormat(OutputFormat.JSON_OBJECT)))


async def test_a_required_tool_call_is_forced_into_shape_by_the_grammar(tiny) -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"],
              "additionalProperties": False}
    request = chat("hi", tools=(ToolSpec("count", None, schema),), tool_choice=ToolChoice(ToolChoiceMode.REQUIRED),
                   sampling=SamplingParams(max_tokens=60, temperature=0.0))
    events = await run(tiny, request)
    result = events[-1]
    # Random weights may run out of tokens inside the JSON: then it is content, never a half call.
    if result.tool_calls:
        (call,) = result.tool_calls
        assert call["function"]["name"] == "count" and isinstance(json.loads(call["function"]["arguments"])["n"], int)
        assert result.finish_reason == "tool_calls"
    else:
        assert result.finish_reason == "length"


async def test_an_image_is_unsupported(tiny) -> None:
    request = GenerateRequest("r", "tiny-llama", Task.CHAT, messages=({"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]},))
    with pytest.raises(Unsupported, match="image_url"):
        await run(tiny, request)


async def test_tools_under_tool_choice_none_are_not_offered_so_logprobs_stream(tiny) -> None:
    # llama.cpp refuses logprobs with tools when streaming (found by scripts/fuzz_gateway.py:
    # a 502 "the neuron failed: ValueError").
    request = chat("hi", tools=(ToolSpec("f", None, {"type": "object"}),), tool_choice=ToolChoice(ToolChoiceMode.NONE),
                   sampling=SamplingParams(max_tokens=2, temperature=0.0, logprobs=True, top_logprobs=1))
    events = await run(tiny, request)
    assert isinstance(events[-1], GenerateResult) and any(isinstance(e, TokenChunk) and e.logprobs for e in events)


async def test_tools_whose_parameters_have_local_definitions_are_taken_by_llama_cpp(tiny) -> None:
    # What pydantic writes for nested models (openai.pydantic_function_tool): "$defs" and
    # "$ref"s into them (the unit tests of tool_grammar cover draft 7's "definitions").
    send = {"$defs": {"A": {"type": "object", "properties": {"c": {"type": "string"}}}}, "type": "object",
            "properties": {"to": {"$ref": "#/$defs/A"}}}
    request = chat("hi", tools=(ToolSpec("send", None, send),), tool_choice=ToolChoice(ToolChoiceMode.REQUIRED),
                   sampling=SamplingParams(max_tokens=8, temperature=0.0))
    result = (await run(tiny, request))[-1]  # before: llama.cpp refused it ($defs not found)
    assert result.finish_reason in ("tool_calls", "length")


async def test_tools_whose_parameters_point_into_themselves_are_taken_by_llama_cpp(tiny) -> None:
    # A $ref to another property (valid at the edge) pointed into the answer's schema once
    # the tool sat inside it: "cannot resolve $ref #/properties/a".
    first = {"type": "object", "properties": {"a": {"type": "string"}, "b": {"$ref": "#/properties/a"}}}
    second = {"type": "array", "prefixItems": [{"type": "integer"}], "items": {"$ref": "#/properties/xs/prefixItems/0"}}
    request = chat("hi", tools=(ToolSpec("f", None, first), ToolSpec("g", None, {"type": "object", "properties": {
        "xs": second}})), sampling=SamplingParams(max_tokens=8, temperature=0.0))
    assert (await run(tiny, request))[-1].finish_reason in ("tool_calls", "stop", "length")


async def test_an_assistants_refusal_part_in_the_history_is_read_as_its_text(tiny) -> None:
    # OpenAI's clients send an earlier refusal back as {"type": "refusal"}; llama.cpp refused
    # the whole request for a part type it does not know.
    messages = ({"role": "user", "content": "hi"},
                {"role": "assistant", "content": [{"type": "refusal", "refusal": "I cannot help with that."}]},
                {"role": "user", "content": "why?"})
    request = replace(chat("x"), messages=messages)
    assert (await run(tiny, request))[-1].finish_reason in ("stop", "length")


class _Tap:
    """A token tap taking every chunk (llama.cpp's thread sends them straight to it)."""

    def __init__(self) -> None:
        self.chunks: list[TokenChunk] = []

    def send(self, chunk: TokenChunk) -> bool:
        self.chunks.append(chunk)
        return True

    def started(self) -> None:
        pass


async def test_a_grammar_s_text_answer_ends_at_its_stop_sequence_and_bills_no_token_past_it(tiny) -> None:
    """Tools on a template without tool syntax: the stops are not llama.cpp's (they would
    cut a call's JSON), so a text answer ran on past its stop, unseen, until its JSON ended
    (here: the 120 tokens asked for), and all of them were billed."""
    from helexa.runtime import token_tap

    tools = (ToolSpec("count", None, {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}),)
    base = chat("hi", tools=tools, tool_choice=ToolChoice(ToolChoiceMode.AUTO),
                sampling=SamplingParams(max_tokens=120, temperature=0.0))
    whole = (await run(tiny, base))[-1]
    assert not whole.tool_calls and len(whole.text) > 20  # random weights answer in text here
    stop = whole.text[8:14]
    for tap in (None, _Tap()):  # the trio thread reads the chunks; llama.cpp's thread does
        with token_tap.tap(tap) if tap is not None else contextlib.nullcontext():
            result = (await run(tiny, replace(base, sampling=replace(base.sampling, stop=(stop,)))))[-1]
        assert (result.finish_reason, result.stop_sequence) == ("stop", stop)
        assert result.text == whole.text[:whole.text.index(stop)]
        assert 1 <= result.usage.completion_tokens < 20 <= whole.usage.completion_tokens
        assert result.usage.prompt_tokens == whole.usage.prompt_tokens
    again = (await run(tiny, base))[-1]  # the slot was given back
    assert again.text == whole.text


TOOL_TEMPLATE = """{%- if tools %}<|im_start|>system
Tools:<tools>{% for t in tools %}{{ t | tojson }}{% endfor %}</tools>
Call one as <tool_call>{"name": <name>, "arguments": <args>}</tool_call><|im_end|>
{% endif %}{%- for m in messages %}<|im_start|>{{ m.role }}
{% if m.content %}{{ m.content }}{% endif %}{% if m.tool_calls %}{% for c in m.tool_calls %}<tool_call>
{"name": "{{ c.function.name }}", "arguments": {{ c.function.arguments | tojson }}}
</tool_call>{% endfor %}{% endif %}<|im_end|>
{% endfor %}{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""
"""A Hermes-style template with tool syntax of its own (llama.cpp then parses calls itself)."""


async def test_with_a_template_s_own_tool_syntax_the_stops_cut_the_text_not_llama_cpp_s_raw_output(
        tiny_gguf: Path, monkeypatch) -> None:
    """llama.cpp matches stop sequences in the raw text, the template's tool syntax
    included, so a stop in a call's arguments ("city") cut the call. They are applied to
    the answer's text instead: a text answer still ends at its stop (and is billed up to
    it); what llama.cpp is sent holds no stop to cut a call with."""
    from helexa.runtime import llama_params, token_tap, tool_grammar

    params = llama_params.LlamaSettings.params

    def with_tool_syntax(self, xllamacpp, path):  # noqa: ANN001
        p = params(self, xllamacpp, path)
        p.chat_template, p.use_jinja = TOOL_TEMPLATE, True
        return p

    monkeypatch.setattr(llama_params.LlamaSettings, "params", with_tool_syntax)
    backend = create_backend(tiny_llama_config(tiny_gguf, n_ctx=512))
    await backend.load(lambda *args: None)
    try:
        assert backend._native_tools
        tools = (ToolSpec("get_weather", None, {"type": "object", "properties": {"city": {"type": "string"}}}),)
        base = chat("hi", tools=tools, tool_choice=ToolChoice(ToolChoiceMode.AUTO),
                    sampling=SamplingParams(max_tokens=60, temperature=0.0))
        whole = await run(backend, base)
        text = "".join(e.text for e in whole[:-1]) + whole[-1].text
        assert len(text) > 20 and whole[-1].usage.completion_tokens == 60  # random weights answer in text
        stop = text[8:14]
        stopped = replace(base, sampling=replace(base.sampling, stop=(stop, "city")))
        assert "stop" not in backend._body(stopped)[0]
        for tap in (None, _Tap()):
            with token_tap.tap(tap) if tap is not None else contextlib.nullcontext():
                events = await run(backend, stopped)
            shown = "".join(e.text for e in (tap.chunks if tap else events[:-1])) + events[-1].text
            assert (shown, events[-1].stop_sequence) == tool_grammar.stopped(text, (stop, "city"))
            assert events[-1].finish_reason == "stop"
            assert 1 <= events[-1].usage.completion_tokens < 20
    finally:
        await backend.unload()
