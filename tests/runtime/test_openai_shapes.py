"""The OpenAI bodies backends speak: typed tools, formats and logprobs out; logprobs back."""

from __future__ import annotations

import pytest

from helexa.protocol import (
    Feature,
    GenerateRequest,
    OutputFormat,
    ResponseFormat,
    SamplingParams,
    Task,
    TokenLogprob,
    ToolChoice,
    ToolChoiceMode,
    ToolSpec,
    TopLogprob,
)
from helexa.runtime import InvalidRequest, Unsupported, openai_shapes

TOOL = ToolSpec("get_weather", "Weather", {"type": "object"})


def chat(**kw) -> GenerateRequest:
    return GenerateRequest("r", "m", Task.CHAT, messages=({"role": "user", "content": "hi"},), **kw)


def test_typed_fields_become_openai_fields() -> None:
    body = openai_shapes.request_body(chat(
        tools=(TOOL,), tool_choice=ToolChoice(ToolChoiceMode.FUNCTION, "get_weather"),
        response_format=ResponseFormat(OutputFormat.JSON_SCHEMA, {"type": "object"}, "answer", True),
        sampling=SamplingParams(logprobs=True, top_logprobs=0, seed=2**40)), dialect="llama.cpp")
    assert body["tools"] == [{"type": "function", "function": {"name": "get_weather", "description": "Weather",
                                                               "parameters": {"type": "object"}}}]
    assert body["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert body["response_format"] == {"type": "json_schema", "json_schema": {
        "name": "answer", "schema": {"type": "object"}, "strict": True}}
    assert body["logprobs"] is True and body["top_logprobs"] == 1  # llama.cpp reports none for 0
    assert 0 <= body["seed"] < 0xFFFFFFFF
    openai = openai_shapes.request_body(chat(sampling=SamplingParams(logprobs=True, top_logprobs=0)), dialect="openai")
    assert openai["top_logprobs"] == 0


@pytest.mark.parametrize("seed", [-1, -7, -(2**63), 0, 0xFFFFFFFF, 2**63 - 1, 2**64 - 1])
def test_any_64_bit_seed_is_served_and_folds_into_llama_cpps_range_deterministically(seed: int) -> None:
    request = chat(sampling=SamplingParams(seed=seed))
    openai_shapes.validate(request)  # a negative seed was "seed must not be negative"
    folded = openai_shapes.request_body(request, dialect="llama.cpp")["seed"]
    assert 0 <= folded < 0xFFFFFFFF  # 0xFFFFFFFF (and -1 as llama.cpp reads it) would be "random"
    assert folded == openai_shapes.request_body(chat(sampling=SamplingParams(seed=seed)), dialect="llama.cpp")["seed"]
    assert openai_shapes.request_body(request, dialect="vllm")["seed"] == seed


def test_features_a_backend_lacks_are_unsupported() -> None:
    request = chat(tools=(TOOL,), sampling=SamplingParams(logprobs=True))
    with pytest.raises(Unsupported, match="logprobs, tools"):
        openai_shapes.validate(request, features=frozenset())
    openai_shapes.validate(request, features=frozenset({Feature.TOOLS, Feature.LOGPROBS}))


@pytest.mark.parametrize(("content", "error"), [
    (5, InvalidRequest), ({"a": 1}, InvalidRequest), ([{"type": "text", "text": 1}], InvalidRequest),
    ([{"type": "image_url", "image_url": {"url": "x"}}], Unsupported), ([{"kind": "x"}], InvalidRequest),
])
def test_content_a_backend_cannot_take_is_refused_there_too(content, error) -> None:
    request = GenerateRequest("r", "m", Task.CHAT, messages=({"role": "user", "content": content},))
    with pytest.raises(error):
        openai_shapes.validate(request)


def test_logprobs_are_read_from_both_shapes_and_infinity_is_floored() -> None:
    chat_shape = {"content": [{"token": "a", "logprob": float("-inf"), "bytes": [97],
                               "top_logprobs": [{"token": "a", "logprob": -0.1, "bytes": [97]}]}]}
    assert openai_shapes.logprobs_of(chat_shape) == [
        TokenLogprob("a", -9999.0, b"a", (TopLogprob("a", -0.1, b"a"),))]
    legacy = {"tokens": ["a", "b"], "token_logprobs": [-0.5, None], "top_logprobs": [{"a": -0.5}, None]}
    assert openai_shapes.logprobs_of(legacy) == [TokenLogprob("a", -0.5, None, (TopLogprob("a", -0.5),)),
                                                 TokenLogprob("b", -9999.0, None, ())]
    view = openai_shapes.parse_chunk({"choices": [{"delta": {"content": "a"}, "logprobs": chat_shape}]})
    assert view.text == "a" and len(view.logprobs) == 1


def test_a_completion_names_the_stop_sequence_only_when_the_request_had_it() -> None:
    body = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "The capital is "},
                         "finish_reason": "stop"}],
            "__verbose": {"stop": True, "stop_type": "word", "stopping_word": "Paris"}}
    assert openai_shapes.parse_completion(body, ("Paris",)).stop_sequence == "Paris"
    assert openai_shapes.parse_completion(body, ("Rome",)).stop_sequence is None
    assert openai_shapes.parse_completion(body).stop_sequence is None


def test_llama_cpp_is_asked_for_its_verbose_block_only_with_stop_sequences() -> None:
    plain = GenerateRequest("r", "m", Task.COMPLETION, prompt="x")
    stopped = GenerateRequest("r", "m", Task.COMPLETION, prompt="x", sampling=SamplingParams(stop=("\n",)))
    assert "verbose" not in openai_shapes.request_body(plain)
    assert openai_shapes.request_body(stopped)["verbose"] is True
    assert "verbose" not in openai_shapes.request_body(stopped, dialect="vllm")


def test_only_the_opening_role_chunk_says_nothing():
    opening = {"choices": [{"finish_reason": None, "index": 0, "delta": {"role": "assistant", "content": None}}],
               "id": "c", "object": "chat.completion.chunk"}
    assert openai_shapes.says_nothing(opening)
    assert openai_shapes.parse_chunk(opening) == openai_shapes.ChunkView()
    text = {"choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hi"}}]}
    ended = {"choices": [{"index": 0, "delta": {"role": "assistant", "content": None}, "finish_reason": "stop"}]}
    usage = {**opening, "usage": {"prompt_tokens": 1, "completion_tokens": 0, "total_tokens": 1}}
    progress = {**opening, "prompt_progress": {"total": 3, "processed": 1}}
    two = {"choices": opening["choices"] * 2}
    for chunk in (text, ended, usage, progress, two, {"choices": []}, {"error": {"message": "x"}}, "data"):
        assert not openai_shapes.says_nothing(chunk), chunk


def test_a_vllm_upstream_salts_its_prefix_cache_with_the_requests_cache_scope() -> None:
    scoped = chat(cache_scope="ab" * 16, extra={"cache_salt": "a peer's own"})
    assert openai_shapes.request_body(scoped, dialect="vllm")["cache_salt"] == "ab" * 16
    assert "cache_salt" not in openai_shapes.request_body(chat(), dialect="vllm")  # no scope: no salt
    for dialect in ("openai", "llama.cpp"):  # servers that may refuse a field they do not know
        assert "cache_salt" not in openai_shapes.request_body(chat(cache_scope="ab" * 16), dialect=dialect)
