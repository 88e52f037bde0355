"""All server-sent-event framing of Anthropic's Messages stream, in one place. Sans-IO.

A stream, as the official ``anthropic`` client's ``messages.stream()`` accumulates it
(every event with its ``event:`` line, its ``data:`` a JSON object of the same ``type``)::

    message_start        message: id, model, content [], usage (input_tokens 0 until known)
    ping                 while the request waits (a cold load, a queue); any number
    content_block_start  index 0: {"type": "text", "text": ""}
    content_block_delta  index 0: {"type": "text_delta", "text": "..."}            ...
    content_block_stop   index 0
    content_block_start  index 1: {"type": "tool_use", "id", "name", "input": {}}  (per tool call)
    content_block_delta  index 1: {"type": "input_json_delta", "partial_json": "<the whole input>"}
    content_block_stop   index 1
    message_delta        delta: stop_reason, stop_sequence; usage: the billed usage
    message_stop

Block indices are 0, 1, 2... in order, one block open at a time. A text block opens with
the first text; tool calls are gathered as they come and sent, each as one block whose
input is the complete JSON object, once the generation ended (after its ledger record is
durable), so that no client ever accumulates a partial ``input``. A generation that
produced nothing still has one (empty) text block.

When something fails after the stream began, the stream ends with an ``error`` event in
Anthropic's error shape (:func:`.anthropic_api.error_body`), and no ``message_stop``.
"""

from __future__ import annotations

import json
from enum import Enum
from typing import Any

from helexa.protocol import GenerateResult, TokenChunk

from .anthropic_api import error_body, stop_reason, stop_sequence, tool_use_blocks, usage_body
from .errors import to_gateway_error

_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def event(name: str, obj: dict[str, Any]) -> bytes:
    """One event: ``event: NAME`` and its ``data:`` line."""
    return b"event: " + name.encode() + b"\ndata: " + _dumps(obj).encode() + b"\n\n"


PING = event("ping", {"type": "ping"})


def error_event(exc: BaseException) -> bytes:
    """The last event of a stream that failed."""
    return event("error", error_body(to_gateway_error(exc)))


class _State(Enum):
    NEW = "new"  # nothing sent
    OPEN = "open"  # message_start sent, no block open
    TEXT = "text"  # a text block is open
    DONE = "done"  # message_stop sent


class MessageStream:
    """Frames one generation as Anthropic's event stream (see the module docstring).

    Call :meth:`start` (idempotent) when the response commits, :meth:`chunk` per
    :class:`TokenChunk`, :meth:`finish` with the metered :class:`GenerateResult`; each
    returns the bytes to send (possibly empty). Raises :class:`~.errors.UpstreamError`
    from :meth:`finish` when a tool call's arguments are not a JSON object.
    """

    __slots__ = ("_id", "_model", "_state", "_index", "_calls", "_text_prefix")

    def __init__(self, message_id: str, model: str) -> None:
        self._id = message_id
        self._model = model
        self._state = _State.NEW
        self._index = 0
        self._calls: list[Any] = []
        self._text_prefix = b""

    @property
    def started(self) -> bool:
        return self._state is not _State.NEW

    def start(self) -> bytes:
        """``message_start``, the first time only."""
        if self._state is not _State.NEW:
            return b""
        self._state = _State.OPEN
        return event("message_start", {"type": "message_start", "message": {
            "id": self._id, "type": "message", "role": "assistant", "model": self._model, "content": [],
            "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": 0, "output_tokens": 0}}})

    def ping(self) -> bytes:
        """A ``ping`` (after ``message_start``, which it sends first if need be)."""
        return self.start() + PING

    def _open_text(self) -> bytes:
        self._state = _State.TEXT
        # Every delta of this block shares its envelope: format it once, splice the text in.
        self._text_prefix = (b'event: content_block_delta\ndata: {"type":"content_block_delta","index":'
                             + str(self._index).encode() + b',"delta":{"type":"text_delta","text":')
        return event("content_block_start", {"type": "content_block_start", "index": self._index,
                                             "content_block": {"type": "text", "text": ""}})

    def _close(self) -> bytes:
        out = event("content_block_stop", {"type": "content_block_stop", "index": self._index})
        self._index += 1
        self._state = _State.OPEN
        return out

    def chunk(self, chunk: TokenChunk) -> bytes:
        out = self.start()
        if chunk.tool_calls:
            self._calls.extend(chunk.tool_calls)
        if chunk.text:
            if self._state is not _State.TEXT:
                out += self._open_text()
            out += self._text_prefix + _dumps(chunk.text).encode() + b"}}\n\n"
        return out

    def finish(self, result: GenerateResult) -> bytes:
        """The rest of the answer (text and tool calls the result carries), each tool call
        as a whole block, ``message_delta`` with the stop reason and billed usage, and
        ``message_stop``."""
        out = self.chunk(TokenChunk(result.request_id, result.text, 0, tool_calls=result.tool_calls))
        tools = tool_use_blocks(self._calls)
        if self._state is _State.TEXT:
            out += self._close()
        elif self._index == 0 and not tools:
            out += self._open_text() + self._close()
        for block in tools:
            out += event("content_block_start", {"type": "content_block_start", "index": self._index,
                                                 "content_block": {**block, "input": {}}})
            out += event("content_block_delta", {"type": "content_block_delta", "index": self._index,
                                                 "delta": {"type": "input_json_delta",
                                                           "partial_json": _dumps(block["input"])}})
            out += self._close()
        out += event("message_delta", {"type": "message_delta",
                                       "delta": {"stop_reason": stop_reason(result, bool(tools)),
                                                 "stop_sequence": stop_sequence(result, bool(tools))},
                                       "usage": usage_body(result.usage)})
        self._state = _State.DONE
        return out + event("message_stop", {"type": "message_stop"})
