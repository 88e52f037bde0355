"""All server-sent-event framing of the gateway, in one place.

A stream, as the official OpenAI client expects it::

    data: {first chunk: delta {"role": "assistant", "content": ""}}   (chat only; one per choice)
    : keep-alive                                                      (while a model loads)
    data: {chunk: delta {"content": "..."}} ...
    data: {final chunk: empty delta, finish_reason}                  (one per choice)
    data: {usage chunk: choices [], usage}                            (include_usage only)
    data: [DONE]

or, when something fails after the stream began, a final ``data: {"error": {...}}`` event
(the OpenAI envelope) and the end of the stream, with no ``[DONE]``.

:class:`StreamEncoder` is sans-IO: it turns fabric events into bytes and holds no socket.
"""

from __future__ import annotations

import json
import time
from typing import Any

import orjson

from helexa.protocol import GenerateRequest, GenerateResult, Task, TokenChunk, Usage

from .errors import error_body, to_gateway_error
from .openai_answers import logprobs_body, usage_body

DONE = b"data: [DONE]\n\n"
CONTENT_TYPE = b"text/event-stream"

_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
_ascii_dumps = json.JSONEncoder(separators=(",", ":")).encode


def _json(obj: Any) -> bytes:
    """``obj`` as compact UTF-8 JSON: orjson (~0.5 us for a chunk where json took ~4, a
    dozen times per stream), else json's escapes for what orjson refuses (a lone
    surrogate, an int past 64 bits), as :meth:`.asgi.Responder.json` does."""
    try:
        return orjson.dumps(obj, option=orjson.OPT_NON_STR_KEYS)
    except TypeError:
        return _ascii_dumps(obj).encode()


def data(obj: Any) -> bytes:
    """One ``data:`` event carrying ``obj`` as compact JSON."""
    return b"data: " + _json(obj) + b"\n\n"


def comment(text: str = "keep-alive") -> bytes:
    """A comment line: ignored by clients, keeps proxies and idle timers from closing."""
    return b": " + text.replace("\n", " ").encode() + b"\n\n"


def error_event(exc: BaseException) -> bytes:
    """The final event of a stream that failed: the OpenAI error envelope."""
    return data(error_body(to_gateway_error(exc)))


class StreamEncoder:
    """Frames one request's ``n`` generations as ``chat.completion.chunk`` or
    ``text_completion`` events, each choice under its ``index``.

    Call :meth:`start` once, :meth:`chunk` per :class:`TokenChunk`, :meth:`finish` with each
    choice's :class:`GenerateResult`; each returns the bytes to send (possibly empty). The
    last choice's :meth:`finish` also ends the stream (the usage, summed over the choices,
    when asked for: only choice 0's result carries the prompt's tokens, :mod:`.choices`,
    so the sum counts the prompt once; then ``[DONE]``). With ``logprobs`` a chunk carries its tokens'
    log-probabilities; a whole tool call (a backend that answers tools in one piece) is
    given the per-choice ``index`` OpenAI's stream accumulator needs.
    """

    __slots__ = ("_chat", "_prefix", "_suffix", "_include_usage", "_response_id", "_model", "_created", "_n",
                 "_open", "_usage", "_logprobs", "_calls", "_offsets")

    def __init__(self, request: GenerateRequest, response_id: str, *, include_usage: bool = False,
                 n: int = 1) -> None:
        self._chat = request.task is Task.CHAT
        self._include_usage = include_usage
        self._response_id = response_id
        self._model = request.model_id
        self._created = int(time.time())
        self._n = n
        self._open = set(range(n))
        self._usage = Usage()
        self._logprobs = request.sampling.logprobs
        self._calls = [0] * n
        self._offsets = [0] * n
        # Every plain content chunk of choice 0 shares its envelope: format it once, splice
        # the text in.
        obj = "chat.completion.chunk" if self._chat else "text_completion"
        head = (
            f'data: {{"id":{_dumps(response_id)},"object":"{obj}","created":{self._created},'
            f'"model":{_dumps(self._model)},"choices":[{{"index":0,'
        )
        if self._chat:
            self._prefix = (head + '"delta":{"content":').encode()
            self._suffix = b'},"finish_reason":null}]}\n\n'
        else:
            self._prefix = (head + '"text":').encode()
            self._suffix = b',"finish_reason":null}]}\n\n'

    def _envelope(self, choice: dict[str, Any] | None, **extra: Any) -> dict[str, Any]:
        return {
            "id": self._response_id,
            "object": "chat.completion.chunk" if self._chat else "text_completion",
            "created": self._created,
            "model": self._model,
            "choices": [] if choice is None else [choice],
            **extra,
        }

    def start(self) -> bytes:
        if not self._chat:
            return b""
        return b"".join(data(self._envelope({"index": i, "delta": {"role": "assistant", "content": ""},
                                             "finish_reason": None})) for i in range(self._n))

    def chunk(self, chunk: TokenChunk, index: int = 0) -> bytes:
        out = b""
        if chunk.text or chunk.logprobs:
            if index == 0 and not (self._logprobs and chunk.logprobs):
                out = self._prefix + _json(chunk.text) + self._suffix
            else:
                choice: dict[str, Any] = ({"index": index, "delta": {"content": chunk.text}} if self._chat
                                          else {"index": index, "text": chunk.text})
                if self._logprobs and chunk.logprobs:
                    task = Task.CHAT if self._chat else Task.COMPLETION
                    choice["logprobs"] = logprobs_body(task, chunk.logprobs, text_offset=self._offsets[index])
                choice["finish_reason"] = None
                out = data(self._envelope(choice))
            self._offsets[index] += len(chunk.text)
        if chunk.tool_calls and self._chat:
            out += data(self._envelope({"index": index, "delta": {"tool_calls": self._indexed(chunk.tool_calls, index)},
                                        "finish_reason": None}))
        return out

    def _indexed(self, calls: tuple[Any, ...], index: int) -> list[Any]:
        out = []
        for call in calls:
            if isinstance(call, dict) and "index" not in call:
                call = {"index": self._calls[index], **call}
                self._calls[index] += 1
            out.append(call)
        return out

    def finish(self, result: GenerateResult, index: int = 0) -> bytes:
        out = b""
        if result.text or result.tool_calls or result.logprobs:
            out += self.chunk(TokenChunk(result.request_id, result.text, tool_calls=result.tool_calls,
                                         logprobs=result.logprobs), index)
        if self._chat:
            final = {"index": index, "delta": {}, "finish_reason": result.finish_reason}
        else:
            final = {"index": index, "text": "", "finish_reason": result.finish_reason}
        out += data(self._envelope(final))
        u = self._usage
        self._usage = Usage(u.prompt_tokens + result.usage.prompt_tokens,
                            u.completion_tokens + result.usage.completion_tokens,
                            u.cached_tokens + result.usage.cached_tokens)
        self._open.discard(index)
        if self._open:
            return out
        if self._include_usage:
            out += data(self._envelope(None, usage=usage_body(self._usage)))
        return out + DONE
