"""One ``/v1/responses`` answer being built from fabric events: the Response object and,
for a stream, its events, in the order the official SDK's ``responses.stream()``
accumulator requires. Sans-IO: fed :class:`TokenChunk` / :class:`GenerateResult`, it
returns event dicts (each with its ``sequence_number``) and holds no socket.

The events of a text answer::

    response.created               (status in_progress, no output)
    response.in_progress
    response.output_item.added     (a message item, status in_progress, no content)
    response.content_part.added    (an output_text part, text "")
    response.output_text.delta     (each piece; logprobs [] unless asked for) ...
    response.output_text.done      (the whole text)
    response.content_part.done
    response.output_item.done      (the message, status completed)
    response.completed             (the whole Response; response.incomplete when cut by
                                    max_output_tokens)

and of a function call::

    response.output_item.added     (a function_call item, arguments "")
    response.function_call_arguments.delta ...
    response.function_call_arguments.done
    response.output_item.done

Opening an item closes the one before it. A failure after the stream began is
``response.failed`` with the Response's ``error``.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from helexa.protocol import GenerateResult, TokenChunk, TokenLogprob, Usage

from .errors import GatewayError
from .responses_api import ResponsesRequest


def _id(prefix: str) -> str:
    return prefix + uuid.uuid4().hex


def logprobs_body(logprobs: tuple[TokenLogprob, ...] | None) -> list[dict[str, Any]]:
    def one(token: str, logprob: float, raw: bytes | None) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(raw if raw is not None else token.encode())}

    return [{**one(lp.token, lp.logprob, lp.token_bytes), "top_logprobs": [one(t.token, t.logprob, t.token_bytes)
                                                                           for t in lp.top]}
            for lp in logprobs or ()]


def usage_body(usage: Usage) -> dict[str, Any]:
    return {"input_tokens": usage.prompt_tokens, "input_tokens_details": {"cached_tokens": usage.cached_tokens},
            "output_tokens": usage.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": usage.total_tokens}


def response_object(body: ResponsesRequest, response_id: str, created_at: int) -> dict[str, Any]:
    """A Response with the request's settings echoed, in progress, with no output yet."""
    fmt = body.text.format if body.text is not None and body.text.format is not None else None
    tools = [{"type": "function", "name": t.name, "description": t.description, "parameters": t.parameters,
              "strict": bool(t.strict)} for t in body.tools or ()]
    choice: Any = body.tool_choice if body.tool_choice is not None else "auto"
    if not isinstance(choice, str):
        choice = {"type": "function", "name": choice.name}
    return {
        "id": response_id, "object": "response", "created_at": created_at, "status": "in_progress",
        "background": False, "error": None, "incomplete_details": None, "instructions": body.instructions,
        "max_output_tokens": body.max_output_tokens, "max_tool_calls": body.max_tool_calls, "model": body.model,
        "output": [], "parallel_tool_calls": body.parallel_tool_calls is not False,
        "previous_response_id": body.previous_response_id, "reasoning": {"effort": None, "summary": None},
        "service_tier": "default", "store": body.stored,
        "temperature": body.temperature if body.temperature is not None else 1.0,
        "text": {"format": fmt.model_dump(by_alias=True, exclude_none=True) if fmt is not None else {"type": "text"}},
        "tool_choice": choice, "tools": tools, "top_logprobs": body.top_logprobs or 0,
        "top_p": body.top_p if body.top_p is not None else 1.0, "truncation": body.truncation or "disabled",
        "usage": None, "user": body.user, "metadata": dict(body.metadata or {}),
    }


class _Item:
    """An output item being built: a message's text, or a function call's arguments."""

    __slots__ = ("index", "kind", "id", "text", "logprobs", "call_id", "name", "open")

    def __init__(self, index: int, kind: str, name: str = "", call_id: str = "") -> None:
        self.index = index
        self.kind = kind
        self.id = _id("msg_" if kind == "message" else "fc_")
        self.text = ""
        self.logprobs: list[dict[str, Any]] = []
        self.name = name
        self.call_id = call_id
        self.open = True

    def part(self) -> dict[str, Any]:
        return {"type": "output_text", "text": self.text, "annotations": [], "logprobs": self.logprobs}

    def body(self) -> dict[str, Any]:
        status = "in_progress" if self.open else "completed"
        if self.kind == "message":
            return {"id": self.id, "type": "message", "status": status, "role": "assistant",
                    "content": [self.part()] if not self.open else []}
        return {"id": self.id, "type": "function_call", "status": status, "call_id": self.call_id,
                "name": self.name, "arguments": self.text if not self.open else ""}


class ResponseBuilder:
    """Builds one answer (see the module docstring).

    Call :meth:`start` once, :meth:`chunk` per :class:`TokenChunk`, :meth:`finish` with the
    :class:`GenerateResult` (then :attr:`response` is the whole Response, and
    :meth:`completed` its final event, sent once it is stored), or :meth:`failed` when the
    generation failed after the stream began.
    """

    def __init__(self, body: ResponsesRequest, response_id: str, *, created_at: int | None = None) -> None:
        self.response = response_object(body, response_id, int(time.time()) if created_at is None else created_at)
        self._seq = 0
        self._items: list[_Item] = []
        self._current: _Item | None = None
        self._calls: dict[Any, _Item] = {}

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        event = {"type": kind, "sequence_number": self._seq, **fields}
        self._seq += 1
        return event

    def start(self) -> list[dict[str, Any]]:
        return [self._event("response.created", response=dict(self.response)),
                self._event("response.in_progress", response=dict(self.response))]

    # --- items -----------------------------------------------------------------------------

    def _open(self, item: _Item) -> list[dict[str, Any]]:
        events = self._close()
        self._items.append(item)
        self._current = item
        events.append(self._event("response.output_item.added", output_index=item.index, item=item.body()))
        if item.kind == "message":
            events.append(self._event("response.content_part.added", item_id=item.id, output_index=item.index,
                                      content_index=0, part=item.part()))
        return events

    def _close(self) -> list[dict[str, Any]]:
        item = self._current
        if item is None:
            return []
        self._current = None
        item.open = False
        at = {"item_id": item.id, "output_index": item.index}
        if item.kind == "message":
            events = [self._event("response.output_text.done", **at, content_index=0, text=item.text,
                                  logprobs=item.logprobs),
                      self._event("response.content_part.done", **at, content_index=0, part=item.part())]
        else:
            events = [self._event("response.function_call_arguments.done", **at, name=item.name,
                                  arguments=item.text)]
        events.append(self._event("response.output_item.done", output_index=item.index, item=item.body()))
        return events

    def _text(self, text: str, logprobs: tuple[TokenLogprob, ...] | None) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        item = self._current
        if item is None or item.kind != "message":
            item = _Item(len(self._items), "message")
            events += self._open(item)
        lps = logprobs_body(logprobs)
        item.text += text
        item.logprobs += lps
        events.append(self._event("response.output_text.delta", item_id=item.id, output_index=item.index,
                                  content_index=0, delta=text, logprobs=lps))
        return events

    def _tool_call(self, part: Any) -> list[dict[str, Any]]:
        if not isinstance(part, dict):
            return []
        fn = part.get("function") or {}
        index = part.get("index")
        item = self._calls.get(index) if index is not None else None
        events: list[dict[str, Any]] = []
        if item is None:
            item = _Item(len(self._items), "function_call", fn.get("name") or "", part.get("id") or _id("call_"))
            if index is not None:
                self._calls[index] = item
            events += self._open(item)
        elif fn.get("name") and not item.name:
            item.name = fn["name"]
        delta = fn.get("arguments") or ""
        if isinstance(delta, dict):  # a backend that hands arguments over as an object
            delta = json.dumps(delta)
        if delta:
            item.text += delta
            if item.open:
                events.append(self._event("response.function_call_arguments.delta", item_id=item.id,
                                          output_index=item.index, delta=delta))
        return events

    def chunk(self, chunk: TokenChunk | GenerateResult) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        if chunk.text:
            events += self._text(chunk.text, chunk.logprobs)
        for part in chunk.tool_calls or ():
            events += self._tool_call(part)
        return events

    # --- the end ---------------------------------------------------------------------------

    def finish(self, result: GenerateResult) -> list[dict[str, Any]]:
        """The events that end the output (not the final one: :meth:`completed`)."""
        events = self.chunk(result)
        if not self._items:
            events += self._open(_Item(0, "message"))
        events += self._close()
        r = self.response
        r["output"] = [item.body() for item in self._items]
        r["usage"] = usage_body(result.usage)
        if result.finish_reason == "length":
            r["status"] = "incomplete"
            r["incomplete_details"] = {"reason": "max_output_tokens"}
        elif result.finish_reason == "content_filter":
            r["status"] = "incomplete"
            r["incomplete_details"] = {"reason": "content_filter"}
        else:
            r["status"] = "completed"
        return events

    def completed(self) -> dict[str, Any]:
        kind = "response.completed" if self.response["status"] == "completed" else "response.incomplete"
        return self._event(kind, response=self.response)

    def failed(self, error: GatewayError) -> dict[str, Any]:
        r = self.response
        r["status"] = "failed"
        r["output"] = [item.body() for item in self._items]
        r["error"] = {"code": error.code or error.type, "message": error.message}
        return self._event("response.failed", response=r)

    @property
    def output_text(self) -> str:
        return "".join(i.text for i in self._items if i.kind == "message")
