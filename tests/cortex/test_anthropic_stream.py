"""The Messages stream's framing and the error shape, sans-IO; the frames are read back by
the official ``anthropic`` client's own SSE decoder and stream accumulator."""

from __future__ import annotations

import json

import httpx
import pytest
from anthropic._streaming import SSEDecoder
from anthropic.lib.streaming._messages import accumulate_event

from helexa.protocol import GenerateResult, TokenChunk, Usage
from helexa.roles.cortex.anthropic_api import error_shape, message_body
from helexa.roles.cortex.anthropic_stream import MessageStream, error_event
from helexa.roles.cortex.errors import (
    BadRequest,
    ColdLoadFailed,
    Forbidden,
    InsufficientQuota,
    ModelNotFound,
    NoCapacity,
    PayloadTooLarge,
    RateLimited,
    Unauthorized,
    UpstreamError,
    UpstreamTimeout,
)
from helexa.roles.cortex.fleet import RemoteError

CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}


def events(raw: bytes) -> list[tuple[str, dict]]:
    return [(sse.event, sse.json()) for sse in SSEDecoder().iter_bytes(iter([raw]))]


def accumulated(raw: bytes):
    snapshot, bufs = None, {}
    for name, data in events(raw):
        assert data["type"] == name  # every event's name is its data's type
        if name != "ping":
            snapshot = accumulate_event(event=data, current_snapshot=snapshot, json_bufs=bufs)
    return snapshot


def run(chunks: list[TokenChunk], result: GenerateResult) -> bytes:
    stream = MessageStream("msg_1", "m")
    out = stream.start() + stream.ping()
    for chunk in chunks:
        out += stream.chunk(chunk)
    return out + stream.finish(result)


def test_text_then_a_whole_tool_call_are_blocks_0_and_1_with_the_complete_input() -> None:
    raw = run([TokenChunk("r", "Let me "), TokenChunk("r", "look.")],
              GenerateResult("r", "tool_calls", Usage(10, 7), tool_calls=(CALL,)))
    names = [(name, data.get("index")) for name, data in events(raw)]
    assert names == [("message_start", None), ("ping", None), ("content_block_start", 0),
                     ("content_block_delta", 0), ("content_block_delta", 0), ("content_block_stop", 0),
                     ("content_block_start", 1), ("content_block_delta", 1), ("content_block_stop", 1),
                     ("message_delta", None), ("message_stop", None)]
    start = events(raw)[6][1]
    assert start["content_block"] == {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {}}
    message = accumulated(raw)
    assert [b.type for b in message.content] == ["text", "tool_use"] and message.content[0].text == "Let me look."
    assert message.content[1].input == {"city": "Paris"} and message.content[1].name == "get_weather"
    assert message.stop_reason == "tool_use"
    assert (message.usage.input_tokens, message.usage.output_tokens) == (10, 7)


def test_tool_call_deltas_are_joined_into_one_block_per_call() -> None:
    pieces = [
        {"index": 0, "id": "call_a", "type": "function", "function": {"name": "f", "arguments": ""}},
        {"index": 0, "function": {"arguments": '{"x": '}},
        {"index": 0, "function": {"arguments": "1}"}},
        {"index": 1, "id": "call_b", "type": "function", "function": {"name": "g", "arguments": "{}"}},
    ]
    raw = run([TokenChunk("r", "", tool_calls=(p,)) for p in pieces], GenerateResult("r", "tool_calls", Usage(3, 9)))
    starts = [d["index"] for n, d in events(raw) if n == "content_block_start"]
    assert starts == [0, 1]  # no text: the tool calls are blocks 0 and 1
    message = accumulated(raw)
    assert [(b.id, b.name, b.input) for b in message.content] == [("call_a", "f", {"x": 1}), ("call_b", "g", {})]


def test_an_answer_with_nothing_still_has_one_empty_text_block() -> None:
    message = accumulated(run([], GenerateResult("r", "length", Usage(4, 0))))
    assert [(b.type, b.text) for b in message.content] == [("text", "")] and message.stop_reason == "max_tokens"


def test_cached_prompt_tokens_are_cache_reads_and_input_tokens_the_rest() -> None:
    message = accumulated(run([TokenChunk("r", "x")], GenerateResult("r", "stop", Usage(100, 1, cached_tokens=60))))
    assert (message.usage.input_tokens, message.usage.cache_read_input_tokens, message.usage.output_tokens) == (40, 60, 1)


def test_arguments_that_are_not_a_json_object_fail_rather_than_reach_a_client_as_empty_input() -> None:
    bad = {**CALL, "function": {"name": "get_weather", "arguments": '{"city": "Par'}}
    stream = MessageStream("msg_1", "m")
    stream.start()
    with pytest.raises(UpstreamError):
        stream.finish(GenerateResult("r", "tool_calls", Usage(1, 1), tool_calls=(bad,)))
    with pytest.raises(UpstreamError):
        message_body("msg_1", "m", "", [bad], GenerateResult("r", "tool_calls", Usage(1, 1)))


def test_the_non_streamed_body_matches_what_the_stream_accumulates() -> None:
    result = GenerateResult("r", "tool_calls", Usage(10, 7), text="Let me look.", tool_calls=(CALL,))
    body = message_body("msg_1", "m", "Let me look.", [CALL], result)
    streamed = accumulated(run([], result))
    want = {k: v for k, v in streamed.to_dict().items() if k in body} | {"stop_sequence": None}
    assert body == want
    assert body["content"][1] == {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Paris"}}


def test_a_failure_mid_stream_is_one_error_event() -> None:
    ((name, data),) = events(error_event(NoCapacity("busy")))
    assert name == "error" and data == {"type": "error", "error": {"type": "overloaded_error", "message": "busy"}}


@pytest.mark.parametrize(("exc", "status", "kind", "retry"), [
    (BadRequest("bad", param="max_tokens"), 400, "invalid_request_error", False),
    (Unauthorized("no key"), 401, "authentication_error", False),
    (Forbidden("not yours"), 403, "permission_error", False),
    (ModelNotFound("m"), 404, "not_found_error", False),
    (PayloadTooLarge("big"), 413, "request_too_large", False),
    (RateLimited("slow down", retry_after=2.5), 429, "rate_limit_error", True),
    (InsufficientQuota("spent", retry_after=60), 429, "rate_limit_error", False),
    (NoCapacity("busy", retry_after=3), 529, "overloaded_error", True),
    (ColdLoadFailed("load failed"), 529, "overloaded_error", True),
    (RemoteError("out_of_slots", "full", retryable=True), 529, "overloaded_error", True),
    (UpstreamError("neuron failed"), 500, "api_error", True),
    (UpstreamTimeout("slow"), 504, "timeout_error", True),
    (RuntimeError("secret internals"), 500, "api_error", True),
])
def test_every_error_has_anthropics_shape_status_and_retry_advice(exc, status, kind, retry) -> None:
    got, headers, body = error_shape(exc)
    obj = json.loads(body)
    assert got == status and obj["type"] == "error" and obj["error"]["type"] == kind
    assert set(obj["error"]) == {"type", "message"} and "secret" not in obj["error"]["message"]
    h = httpx.Headers([(k.decode(), v.decode()) for k, v in headers])
    assert h["content-type"] == "application/json"
    assert ("x-should-retry" in h) is (not retry) and h.get("x-should-retry", "false") == "false"
    if status in (429, 529):
        assert int(h["retry-after"]) >= 1


def test_a_bad_request_names_its_field() -> None:
    _, _, body = error_shape(BadRequest("must not be empty", param="stop_sequences"))
    assert json.loads(body)["error"]["message"] == "stop_sequences: must not be empty"
