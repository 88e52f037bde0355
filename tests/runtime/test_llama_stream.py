"""llama.cpp's streamed chunks read into events (helexa/runtime/llama_stream.py), sans-IO."""

from __future__ import annotations

import pytest

from helexa.protocol import GenerateRequest, SamplingParams, Task, TokenChunk, Usage
from helexa.runtime import BackendError
from helexa.runtime.llama_stream import LlamaStream


def request(**sampling) -> GenerateRequest:
    return GenerateRequest("r", "m", Task.CHAT, messages=({"role": "user", "content": "hi"},),
                           sampling=SamplingParams(**sampling))


def delta(text: str | None = None, *, finish: str | None = None, tool_calls=None, logprobs=None, **extra) -> dict:
    d: dict = {}
    if text is not None:
        d["content"] = text
    if tool_calls is not None:
        d["tool_calls"] = tool_calls
    choice: dict = {"index": 0, "delta": d, "finish_reason": finish}
    if logprobs is not None:
        choice["logprobs"] = {"content": logprobs}
    return {"object": "chat.completion.chunk", "choices": [choice], **extra}


def lp(token: str, n: int) -> dict:
    return {"token": token, "logprob": -0.5, "top_logprobs": [{"token": f"{token}{i}", "logprob": -1.0} for i in range(n)]}


def test_chunks_fed_together_make_one_event_and_fed_alone_one_each():
    together = LlamaStream(request())
    assert together.feed([delta("Hel"), delta("lo")]) == [TokenChunk("r", "Hello", 2)]
    alone = LlamaStream(request())
    assert alone.feed([delta("Hel")]) + alone.feed([delta("lo")]) == [TokenChunk("r", "Hel", 1), TokenChunk("r", "lo", 1)]
    assert together.answer == alone.answer == "Hello"


def test_the_end_carries_the_finish_and_the_usage_or_a_count_of_the_text():
    s = LlamaStream(request())
    s.feed([delta("a"), delta("b")])
    s.feed([delta(finish="stop")])
    result = s.result()
    assert (result.finish_reason, result.usage) == ("stop", Usage(completion_tokens=2))
    s2 = LlamaStream(request())
    s2.feed([delta("a"), delta(finish="length", usage={"prompt_tokens": 3, "completion_tokens": 1,
                                                         "total_tokens": 4})])
    assert s2.result().finish_reason == "length"
    assert s2.result().usage.prompt_tokens == 3


def test_a_tool_call_stays_its_own_event_between_the_text_around_it():
    call = [{"index": 0, "id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
    s = LlamaStream(request())
    events = s.feed([delta("a"), delta(tool_calls=call), delta("b")])
    assert [(e.text, e.tokens, e.tool_calls is not None) for e in events] == [("a", 1, False), ("", 1, True), ("b", 1, False)]


def test_alternatives_are_trimmed_to_the_top_logprobs_asked_for():
    s = LlamaStream(request(logprobs=True, top_logprobs=0))
    (event,) = s.feed([delta("a", logprobs=[lp("a", 1)]), delta("b", logprobs=[lp("b", 1)])])
    assert [(t.token, t.top) for t in event.logprobs] == [("a", ()), ("b", ())]


def test_a_generic_tool_answer_is_held_and_read_at_the_end():
    s = LlamaStream(request(), generic=True)
    assert s.feed([delta('{"tool_call": {"name": "f", '), delta('"arguments": {"x": 1}}}')]) == []
    result = s.result()
    assert result.finish_reason == "tool_calls" and result.tool_calls[0]["function"]["name"] == "f"


def test_a_generic_tool_answer_cut_short_ends_with_length_and_none_of_its_json():
    s = LlamaStream(request(), generic=True)
    assert s.feed([delta("{\n  "), delta('"', finish="length")]) == []
    result = s.result()
    assert (result.finish_reason, result.text, result.tool_calls) == ("length", "", None)
    assert s.answer == '{\n  "'  # the slot table still sees what was generated


def test_a_generic_answers_stop_sequences_cut_its_text_and_never_its_tool_call():
    # llama.cpp is not given them (they would cut the grammar's JSON): the text is cut here.
    s = LlamaStream(request(stop=("city", "Par")), generic=True)
    s.feed([delta('{"tool_call": {"name": "get_weather", "arguments": {"city": "Paris"}}}', finish="stop")])
    call = s.result()
    assert (call.finish_reason, call.stop_sequence, call.text) == ("tool_calls", None, "")
    assert call.tool_calls[0]["function"]["arguments"] == '{"city": "Paris"}'
    s = LlamaStream(request(stop=("city", "Par")), generic=True)
    s.feed([delta('{"response": "In Paris the city is'), delta(' warm"}', finish="stop")])
    text = s.result()
    assert (text.finish_reason, text.stop_sequence, text.text) == ("stop", "Par", "In ")
    s = LlamaStream(request(stop=("snow",)), generic=True)
    s.feed([delta('{"response": "sunny"}', finish="stop")])
    assert (s.result().stop_sequence, s.result().text) == (None, "sunny")


def test_a_generic_text_answer_that_reaches_a_stop_says_the_engine_should_stop_there():
    """llama.cpp is not given the stops (they would cut a tool call's JSON): the answer ran
    on past its stop, unseen, until its JSON ended, and every token of it was billed."""
    s = LlamaStream(request(stop=("Par",)), generic=True)
    s.feed([{"prompt_progress": {"total": 30, "cache": 0, "processed": 30}}])
    assert s.feed([delta('{"response": "In '), delta("P")]) == [] and not s.stopped
    s.feed([delta("ar"), delta("is the city"), delta(' is warm"}', finish="stop")])
    assert s.stopped  # at "ar": what came after it in the same read is not the answer's
    result = s.result()
    assert (result.finish_reason, result.stop_sequence, result.text) == ("stop", "Par", "In ")
    assert result.usage == Usage(prompt_tokens=30, completion_tokens=3)  # billed up to the stop


def test_a_stop_written_escaped_in_the_json_is_seen_and_a_tool_call_holding_one_is_never_cut():
    s = LlamaStream(request(stop=("\n", 'say "')), generic=True)
    s.feed([delta('{"response": "one'), delta("\\"), delta("n"), delta('two"}')])
    assert s.stopped and s.result().text == "one" and s.result().stop_sequence == "\n"
    s = LlamaStream(request(stop=("city",)), generic=True)
    s.feed([delta('{"tool_call": {"name": "w", "arguments": {"city"'), delta(': "Paris"}}}', finish="stop")])
    assert not s.stopped and s.result().tool_calls
    s = LlamaStream(request(stop=("response",)), generic=True)  # in the JSON's key, not its text
    s.feed([delta('{"response": "hi"}', finish="stop")])
    assert not s.stopped and s.result().text == "hi"


def call(arguments: str) -> list:
    return [{"index": 0, "id": "c1", "type": "function", "function": {"name": "w", "arguments": arguments}}]


def test_with_the_stops_cut_here_text_ends_at_the_first_and_a_call_holding_one_is_whole():
    """A template's own tool syntax: llama.cpp is not given the stops (they cut a call
    whose arguments held one); the text is cut here, a possible start of a stop held."""
    s = LlamaStream(request(stop=("Paris",)), cut_stops=True)
    s.feed([{"prompt_progress": {"total": 9, "cache": 0, "processed": 9}}])
    assert s.feed([delta("Hello Pa")]) == [TokenChunk("r", "Hello ", 1, prompt_tokens=9)]  # "Pa" held
    assert s.feed([delta("th, "), delta("then Par")]) == [TokenChunk("r", "Path, then ", 2)]
    assert s.feed([delta("is or"), delta(" more")]) == [] and s.stopped
    result = s.result()
    assert (result.finish_reason, result.stop_sequence, result.text) == ("stop", "Paris", "")
    assert result.usage == Usage(prompt_tokens=9, completion_tokens=4)  # billed up to the stop
    s = LlamaStream(request(stop=("Paris",)), cut_stops=True)
    events = s.feed([delta("I will P"), delta(tool_calls=call('{"city": "Paris"}')), delta(finish="tool_calls")])
    assert [(e.text, bool(e.tool_calls)) for e in events] == [("I will P", False), ("", True)]
    assert events[1].tool_calls[0]["function"]["arguments"] == '{"city": "Paris"}' and not s.stopped
    assert s.result().finish_reason == "tool_calls"
    s = LlamaStream(request(stop=("Paris",)), cut_stops=True)
    s.feed([delta("To P"), delta(finish="stop")])
    assert s.result().text == "P"  # held, and the answer ended: its own text


def test_progress_reports_carry_nothing_and_an_error_envelope_raises():
    s = LlamaStream(request())
    assert s.feed([{"prompt_progress": {"total": 3, "processed": 3}}]) == []
    with pytest.raises(BackendError):
        s.feed([{"error": {"code": 500, "message": "boom", "type": "server_error"}}])
