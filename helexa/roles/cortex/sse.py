"""All server-sent-event framing of the gateway, in one place.

A stream, as the official OpenAI client expects it::

    data: {first chunk: delta {"role": "assistant", "content": ""}}   (chat only)
    : keep-alive                                                      (while a model loads)
    data: {chunk: delta {"content": "..."}} ...
    data: {final chunk: empty delta, finish_reason}
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

from helexa.protocol import GenerateRequest, GenerateResult, Task, TokenChunk

from .errors import error_body, to_gateway_error
from .openai_api import usage_body

DONE = b"data: [DONE]\n\n"
CONTENT_TYPE = b"text/event-stream"

_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def data(obj: Any) -> bytes:
    """One ``data:`` event carrying ``obj`` as compact JSON."""
    return b"data: " + _dumps(obj).encode() + b"\n\n"


def comment(text: str = "keep-alive") -> bytes:
    """A comment line: ignored by clients, keeps proxies and idle timers from closing."""
    return b": " + text.replace("\n", " ").encode() + b"\n\n"


def error_event(exc: BaseException) -> bytes:
    """The final event of a stream that failed: the OpenAI error envelope."""
    return data(error_body(to_gateway_error(exc)))


class StreamEncoder:
    """Frames one generation as ``chat.completion.chunk`` or ``text_completion`` events.

    Call :meth:`start` once, :meth:`chunk` per :class:`TokenChunk`, :meth:`finish` with the
    :class:`GenerateResult`; each returns the bytes to send (possibly empty).
    """

    __slots__ = ("_chat", "_prefix", "_suffix", "_include_usage", "_response_id", "_model", "_created")

    def __init__(self, request: GenerateRequest, response_id: str, *, include_usage: bool = False) -> None:
        self._chat = request.task is Task.CHAT
        self._include_usage = include_usage
        self._response_id = response_id
        self._model = request.model_id
        self._created = int(time.time())
        # Every content chunk shares its envelope: format it once, splice the text in.
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
        return data(self._envelope({"index": 0, "delta": {"role": "assistant", "content": ""},
                                    "finish_reason": None}))

    def chunk(self, chunk: TokenChunk) -> bytes:
        out = b""
        if chunk.text:
            out = self._prefix + _dumps(chunk.text).encode() + self._suffix
        if chunk.tool_calls and self._chat:
            out += data(self._envelope({"index": 0, "delta": {"tool_calls": list(chunk.tool_calls)},
                                        "finish_reason": None}))
        return out

    def finish(self, result: GenerateResult) -> bytes:
        out = b""
        if result.text or result.tool_calls:
            out += self.chunk(TokenChunk(result.request_id, result.text, tool_calls=result.tool_calls))
        if self._chat:
            final = {"index": 0, "delta": {}, "finish_reason": result.finish_reason}
        else:
            final = {"index": 0, "text": "", "finish_reason": result.finish_reason}
        out += data(self._envelope(final))
        if self._include_usage:
            out += data(self._envelope(None, usage=usage_body(result.usage)))
        return out + DONE
