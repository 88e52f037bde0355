"""SSE framing: what the official OpenAI client needs, byte for byte parseable."""

from __future__ import annotations

import json

from helexa.protocol import GenerateRequest, GenerateResult, Task, TokenChunk, Usage
from helexa.roles.cortex import sse
from helexa.roles.cortex.errors import NoCapacity


def events(raw: bytes) -> list[object]:
    out: list[object] = []
    for block in raw.decode().split("\n\n"):
        if block.startswith("data: "):
            payload = block[len("data: "):]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
        elif block.startswith(":"):
            out.append("comment")
    return out


def request(task: Task = Task.CHAT) -> GenerateRequest:
    return GenerateRequest("r", "m", task, messages=({"role": "user", "content": "x"},) if task is Task.CHAT else (),
                           prompt=None if task is Task.CHAT else "p")


def test_a_chat_stream_starts_with_the_role_and_ends_with_finish_reason_then_done() -> None:
    enc = sse.StreamEncoder(request(), "chatcmpl-r")
    raw = enc.start() + enc.chunk(TokenChunk("r", 'he said "hi"\n')) + enc.finish(GenerateResult("r", "stop", Usage(1, 2)))
    ev = events(raw)
    assert ev[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert ev[1]["choices"][0]["delta"] == {"content": 'he said "hi"\n'}
    assert ev[1]["object"] == "chat.completion.chunk" and ev[1]["id"] == "chatcmpl-r" and ev[1]["model"] == "m"
    assert ev[2]["choices"][0] == {"index": 0, "delta": {}, "finish_reason": "stop"}
    assert ev[3] == "[DONE]" and len(ev) == 4


def test_include_usage_adds_a_usage_chunk_with_no_choices() -> None:
    enc = sse.StreamEncoder(request(), "id", include_usage=True)
    ev = events(enc.finish(GenerateResult("r", "length", Usage(3, 4))))
    assert ev[1]["choices"] == [] and ev[1]["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7,
                                                       "prompt_tokens_details": {"cached_tokens": 0}}
    assert ev[2] == "[DONE]"


def test_result_text_not_yet_streamed_is_sent_before_the_end() -> None:
    enc = sse.StreamEncoder(request(Task.COMPLETION), "cmpl-r")
    assert enc.start() == b""
    ev = events(enc.finish(GenerateResult("r", "stop", Usage(), text="tail")))
    assert ev[0]["choices"][0]["text"] == "tail" and ev[0]["object"] == "text_completion"
    assert ev[1]["choices"][0]["finish_reason"] == "stop"


def test_tool_call_deltas_are_their_own_chunks() -> None:
    enc = sse.StreamEncoder(request(), "id")
    call = {"index": 0, "id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    ev = events(enc.chunk(TokenChunk("r", "", tool_calls=(call,))))
    assert ev == [ev[0]] and ev[0]["choices"][0]["delta"] == {"tool_calls": [call]}


def test_an_error_event_carries_the_envelope_and_no_done() -> None:
    ev = events(sse.error_event(NoCapacity("busy")))
    assert ev == [{"error": {"message": "busy", "type": "service_unavailable", "param": None, "code": "no_capacity"}}]


def test_a_comment_is_one_line() -> None:
    assert sse.comment("a\nb") == b": a b\n\n"


def test_n_choices_each_start_and_finish_under_their_index_and_the_stream_ends_after_the_last() -> None:
    enc = sse.StreamEncoder(request(), "id", include_usage=True, n=2)
    head = events(enc.start())
    assert [e["choices"][0]["index"] for e in head] == [0, 1]
    one = events(enc.chunk(TokenChunk("r", "b"), 1) + enc.finish(GenerateResult("r", "stop", Usage(2, 1)), 1))
    assert one[0]["choices"][0] == {"index": 1, "delta": {"content": "b"}, "finish_reason": None}
    assert one[-1]["choices"][0]["finish_reason"] == "stop" and "[DONE]" not in one
    zero = events(enc.finish(GenerateResult("r", "length", Usage(2, 3)), 0))
    assert zero[-2]["usage"] == {"prompt_tokens": 4, "completion_tokens": 4, "total_tokens": 8,
                                "prompt_tokens_details": {"cached_tokens": 0}}
    assert zero[-1] == "[DONE]"


def test_a_whole_tool_call_gets_the_index_the_client_accumulates_by() -> None:
    enc = sse.StreamEncoder(request(), "id")
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    ev = events(enc.finish(GenerateResult("r", "tool_calls", Usage(), tool_calls=(call, call))))
    assert [c["index"] for c in ev[0]["choices"][0]["delta"]["tool_calls"]] == [0, 1]


def test_any_text_a_token_can_hold_is_framed_as_the_json_it_is() -> None:
    """Quotes, backslashes, control characters, line separators, astral characters, and a
    lone surrogate (which orjson refuses: json's escapes then), on the chunk's fast path
    and through the envelope of another choice."""
    texts = ['"', "\\", "\x00\x1f\x7f", "a\nb\r\tc", "\u2028\u2029", "é😀", "</script>", "\ud800x", ""]
    for text in texts:
        for index in (0, 1):
            enc = sse.StreamEncoder(request(), "chatcmpl-r", n=2)
            got = events(enc.chunk(TokenChunk("r", text + "!"), index))
            assert got[0]["choices"][0]["delta"]["content"] == text + "!", text
            assert got[0]["choices"][0]["index"] == index
