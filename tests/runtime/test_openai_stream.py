"""Reading a streamed OpenAI answer (SSE bytes) into TokenChunks and a result."""

from __future__ import annotations

import json

import pytest

from helexa.protocol import TokenChunk, Usage
from helexa.runtime import InvalidRequest, Overloaded
from helexa.runtime.openai_stream import StreamReader
from helexa.runtime.upstream import UpstreamProtocolError


def chunk(content: str | None = None, finish: str | None = None, **extra) -> dict:
    delta = {} if content is None else {"content": content}
    return {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            **extra}


def sse(*events: dict | str, sep: str = "\n") -> bytes:
    out = ""
    for e in events:
        out += f"data: {e if isinstance(e, str) else json.dumps(e)}{sep}{sep}"
    return out.encode()


STREAM = sse(chunk("Hel"), chunk("lo"), chunk(" there"), chunk(finish="length"),
             {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 3}}, "[DONE]")


def read(data: bytes, step: int | None = None) -> tuple[list[TokenChunk], StreamReader]:
    reader = StreamReader("r1")
    step = step or len(data)
    out = []
    for i in range(0, len(data), step):
        out.extend(reader.feed(data[i:i + step]))
    out.extend(reader.feed(b""))
    return out, reader


def test_a_burst_becomes_one_chunk_and_the_result_carries_finish_and_usage() -> None:
    events, reader = read(STREAM)
    # (read at once: the usage came before the one chunk went, which carries its prompt count)
    assert events == [TokenChunk("r1", "Hello there", 3, prompt_tokens=5)]
    assert reader.done
    result = reader.result()
    assert (result.finish_reason, result.usage) == ("length", Usage(prompt_tokens=5, completion_tokens=3))


@pytest.mark.parametrize("step", [1, 2, 5, 17])
@pytest.mark.parametrize("sep", ["\n", "\r\n", "\r"])
def test_the_same_text_however_the_bytes_are_split_and_lines_end(step: int, sep: str) -> None:
    events, reader = read(sse(chunk("Hel"), chunk("lo"), chunk(" there"), chunk(finish="stop"), "[DONE]", sep=sep), step)
    assert "".join(e.text for e in events) == "Hello there"
    assert sum(e.tokens for e in events) == 3
    assert reader.done and reader.result().finish_reason == "stop"


def test_comments_other_fields_and_multi_line_data_follow_the_sse_rules() -> None:
    data = (b": keep-alive\n\nevent: message\nid: 7\ndata: {\"choices\": [{\"delta\":\ndata: {\"content\": \"hi\"}}]}\n\n"
            b"retry: 100\n\ndata: [DONE]\n\n")
    events, reader = read(data)
    assert events == [TokenChunk("r1", "hi", 1)] and reader.done


def test_nothing_after_done_is_read() -> None:
    events, reader = read(sse(chunk("a"), "[DONE]") + b"data: not json\n\n")
    assert events == [TokenChunk("r1", "a", 1)] and reader.done


def test_tool_calls_are_their_own_events_in_order() -> None:
    call = [{"index": 0, "id": "c1", "function": {"name": "f", "arguments": ""}}]
    events, _ = read(sse(chunk("a"), {"choices": [{"delta": {"tool_calls": call}}]}, chunk("b")))
    assert events == [TokenChunk("r1", "a", 1), TokenChunk("r1", "", 1, tool_calls=tuple(call)),
                      TokenChunk("r1", "b", 1)]


def test_text_completions_are_read_too() -> None:
    events, reader = read(sse({"choices": [{"text": "once", "finish_reason": None}]},
                              {"choices": [{"text": " upon", "finish_reason": "stop"}]}))
    assert events == [TokenChunk("r1", "once upon", 2)]
    assert reader.result().usage == Usage(completion_tokens=2)


def test_llama_cpp_timings_give_the_usage() -> None:
    _, reader = read(sse(chunk("a", "stop", timings={"prompt_n": 3, "cache_n": 2, "predicted_n": 1})))
    assert reader.result().usage == Usage(prompt_tokens=5, completion_tokens=1, cached_tokens=2)


def test_an_error_after_text_comes_after_that_text() -> None:
    reader = StreamReader("r1")
    error = b'error: {"code": 503, "message": "busy", "type": "unavailable_error"}\n\n'
    assert reader.feed(sse(chunk("partial")) + error) == [TokenChunk("r1", "partial", 1)]
    with pytest.raises(Overloaded, match="busy"):
        reader.feed(b"")
    with pytest.raises(Overloaded):
        reader.result()


@pytest.mark.parametrize("payload", [{"error": {"message": "bad input", "type": "invalid_request_error"}},
                                     {"object": "error", "message": "bad input", "type": "BadRequestError",
                                      "code": 400}])
def test_error_chunks_raise_the_mapped_error(payload: dict) -> None:
    with pytest.raises(InvalidRequest, match="bad input"):
        read(sse(payload))


@pytest.mark.parametrize("payload", ["{not json", "[1, 2]", '{"choices": [3]}', '{"choices": [{"delta": {"content": 5}}]}'])
def test_malformed_chunks_are_protocol_errors(payload: str) -> None:
    with pytest.raises(UpstreamProtocolError):
        read(sse(payload))


@pytest.mark.parametrize("final, named", [
    ({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop", "stop_reason": "END"}]}, "END"),  # vLLM
    ({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
      "__verbose": {"stop": True, "stop_type": "word", "stopping_word": "END"}}, "END"),  # llama.cpp
    ({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop", "stop_reason": 2}]}, None),  # a stop token
    ({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
      "__verbose": {"stop": True, "stop_type": "eos", "stopping_word": ""}}, None),
    ({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop", "stop_reason": "<|im_end|>"}]}, None),
])
def test_the_result_names_the_stop_sequence_the_server_says_ended_it(final: dict, named: str | None) -> None:
    reader = StreamReader("r1", ("END", "STOP"))
    reader.feed(sse(chunk("Hi"), final, "[DONE]"))
    result = reader.result()
    assert result.finish_reason == "stop" and result.stop_sequence == named


def test_an_upstream_s_usage_before_its_text_gives_the_first_chunk_the_prompt_s_count() -> None:
    """vLLM's continuous usage stats: every chunk has a usage; the first chunk out carries
    the prompt's count (what a stream cut before its end bills), no other one."""
    def counted(text: str, n: int) -> dict:
        return {**chunk(text), "usage": {"prompt_tokens": 11, "completion_tokens": n}}

    data = sse(counted("Hel", 1), counted("lo", 2), counted(" there", 3), chunk(finish="stop"), "[DONE]")
    events, _ = read(data, step=data.index(b"\n\n") + 2)  # the first event alone, then the rest
    assert [e.prompt_tokens for e in events][:2] == [11, None] and events[0].text == "Hel"


@pytest.mark.parametrize("step", [1, 7])
def test_a_usage_only_at_the_end_gives_no_chunk_a_count_streamed(step: int) -> None:
    events, reader = read(STREAM, step=step)
    assert all(e.prompt_tokens is None for e in events) and reader.result().usage.prompt_tokens == 5
