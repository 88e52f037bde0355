"""A streamed OpenAI answer (server-sent events) read into the fabric's events, sans-IO.

:class:`StreamReader` is fed the body of a streamed ``/v1/chat/completions`` or
``/v1/completions`` response as it arrives and returns :class:`~helexa.protocol.TokenChunk`\\ s;
:meth:`StreamReader.result` gives the closing :class:`~helexa.protocol.GenerateResult`.

It parses no more than it must. Events are cut at blank lines with ``bytes.find``; the
usual event (one ``data:`` line) is taken as it is, anything else goes through the full
SSE line rules (CR, LF or CRLF line ends, comments, multi-line data). Each chunk's JSON is
read with orjson, and only the fields the fabric carries are looked at: the delta's text
and tool calls, ``finish_reason``, and the usage. Every chunk that arrived in one read
becomes one ``TokenChunk`` (texts joined, ``tokens`` counting the chunks), so a burst costs
one event downstream, not one per token; a chunk carrying tool calls stays its own event.
An upstream that reports its usage before its first text gives the first chunk the
prompt's count (``TokenChunk.prompt_tokens``); most report it only at the end.

Errors: an ``{"error": ...}`` chunk, a ``"object": "error"`` chunk (older vLLM) and
llama.cpp's ``error:`` field raise the runtime error the envelope stands for
(:func:`~helexa.runtime.openai_shapes.raise_for_error`); a chunk that is not a JSON object
raises :class:`~helexa.runtime.upstream.UpstreamProtocolError`.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, NoReturn

import orjson

from helexa.protocol import GenerateResult, TokenChunk, Usage

from . import openai_shapes
from .base import BackendError
from .upstream import UpstreamProtocolError

MAX_EVENT = 16 << 20
"""The longest event accepted (bytes without a blank line)."""


class StreamReader:
    """The events of one streamed answer (see the module docstring).

    Attributes, once the stream has been fed: ``done`` (``data: [DONE]`` was seen; later
    bytes are ignored), ``finish_reason``, ``stop_sequence`` (which of ``stops``, the
    request's stop sequences, ended it, where the server says so), ``usage`` and ``chunks``
    (chunks with text or tool calls).
    """

    __slots__ = ("request_id", "done", "finish_reason", "stop_sequence", "usage", "chunks", "_stops", "_pending",
                 "_cr", "_error")

    def __init__(self, request_id: str, stops: tuple[str, ...] = ()) -> None:
        self.request_id = request_id
        self.done = False
        self.finish_reason: str | None = None
        self.stop_sequence: str | None = None
        self._stops = stops
        self.usage: Usage | None = None
        self.chunks = 0
        self._pending = b""
        self._cr = False
        self._error: BackendError | None = None

    def feed(self, data: bytes) -> list[TokenChunk]:
        """The events the bytes so far complete; ``b""`` says the body ended. Raises as the
        module docstring says; an error that follows text in the same bytes is raised by
        the next call (or by :meth:`result`), so that the text before it is not lost."""
        if self._error is not None:
            raise self._error
        if self.done:
            return []
        buf = self._pending + data if self._pending else data
        if self._cr or b"\r" in buf:
            self._cr = True
            # A CR at the very end may be half of a CRLF: keep it raw until the next read.
            keep = b"\r" if data and buf.endswith(b"\r") else b""
            buf = buf[:len(buf) - len(keep)].replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        else:
            keep = b""
        end = buf.rfind(b"\n\n")
        if end < 0:
            if len(buf) > MAX_EVENT:
                raise UpstreamProtocolError(f"a streamed event longer than {MAX_EVENT} bytes")
            self._pending = buf + keep
            return []
        self._pending = buf[end + 2:] + keep
        out: list[TokenChunk] = []
        texts: list[str] = []
        loads, chunks = orjson.loads, 0
        try:
            # One loop for every chunk of a read, inlined: this runs once per token.
            for event in buf[:end].split(b"\n\n"):
                if event[:6] == b"data: " and b"\n" not in event:
                    payload = event[6:]
                else:
                    payload, field = _parse_event(event)
                    if payload is None:
                        continue
                    if field == b"error":  # llama.cpp's server: "error: {...}"
                        _raise_error(payload)
                if payload == b"[DONE]":
                    self.done = True
                    break
                try:
                    chunk = loads(payload)
                except orjson.JSONDecodeError:
                    raise UpstreamProtocolError(f"a streamed chunk is not JSON: {payload[:200]!r}") from None
                if type(chunk) is not dict:
                    raise UpstreamProtocolError(f"a streamed chunk is not a JSON object: {payload[:200]!r}")
                if "error" in chunk:
                    _raise_error(payload)
                if "usage" in chunk or "timings" in chunk:
                    self.usage = openai_shapes.usage_of(chunk) or self.usage
                choices = chunk.get("choices")
                if choices is None:
                    if chunk.get("object") == "error":  # older vLLM: the envelope's fields at the top
                        _raise_error(payload)
                    continue
                try:
                    for choice in choices:
                        delta = choice.get("delta")
                        if delta is not None:
                            text, calls = delta.get("content"), delta.get("tool_calls")
                        else:
                            text, calls = choice.get("text"), None
                        reason = choice.get("finish_reason")
                        if reason:
                            self.finish_reason = str(reason)
                            self.stop_sequence = openai_shapes.stop_sequence_of(chunk, choice, self._stops)
                        if calls:
                            if texts:
                                out.append(TokenChunk(self.request_id, "".join(texts), len(texts)))
                                texts = []
                            out.append(TokenChunk(self.request_id, text or "", 1, tool_calls=tuple(calls)))
                            chunks += 1
                        elif text:
                            if type(text) is not str:
                                raise TypeError("text")
                            texts.append(text)
                            chunks += 1
                except (AttributeError, TypeError):
                    raise UpstreamProtocolError(f"a streamed chunk has an unexpected shape: {payload[:200]!r}") from None
        except BackendError as exc:
            if not out and not texts:
                self.chunks += chunks
                raise
            self._error = exc
        first = not self.chunks
        self.chunks += chunks
        if texts:
            out.append(TokenChunk(self.request_id, "".join(texts), len(texts)))
        if first and out and self.usage is not None and self.usage.prompt_tokens:
            # An upstream that reported usage before its text (vLLM's continuous usage
            # stats, llama.cpp's timings per token): its prompt count goes on the first chunk.
            out[0] = replace(out[0], prompt_tokens=self.usage.prompt_tokens)
        return out

    def result(self) -> GenerateResult:
        """The closing result: finish reason (default ``stop``) and usage (default: the
        number of chunks as completion tokens). Raises an error still held back."""
        if self._error is not None:
            raise self._error
        return GenerateResult(self.request_id, self.finish_reason or "stop",
                              self.usage or Usage(completion_tokens=self.chunks), stop_sequence=self.stop_sequence)


def _raise_error(payload: bytes) -> NoReturn:
    """Raise what an error chunk stands for: ``{"error": {...}}``, older vLLM's
    ``{"object": "error", ...}``, or the data of llama.cpp's ``error:`` field."""
    try:
        chunk = orjson.loads(payload)
    except orjson.JSONDecodeError:
        raise BackendError(f"the upstream reported an error: {payload[:200]!r}") from None
    if isinstance(chunk, dict):
        openai_shapes.raise_for_error(chunk if "error" in chunk else {"error": chunk})
    raise BackendError(f"the upstream reported an error: {payload[:200]!r}")


def _parse_event(event: bytes) -> tuple[bytes | None, bytes]:
    """(data, field) of one event by the full SSE rules; data ``None`` when it has none.
    ``field`` is ``b"error"`` for llama.cpp's error lines, else ``b"data"``."""
    data: list[bytes] = []
    field_of_data = b"data"
    for line in event.split(b"\n"):
        if not line or line[:1] == b":":
            continue
        name, colon, value = line.partition(b":")
        if colon and value[:1] == b" ":
            value = value[1:]
        if name == b"data":
            data.append(value)
        elif name == b"error":
            data.append(value)
            field_of_data = b"error"
    if not data:
        return None, field_of_data
    return b"\n".join(data), field_of_data


def loads_object(raw: bytes, what: str) -> dict[str, Any]:
    """``raw`` as a JSON object, or :class:`UpstreamProtocolError` naming ``what``."""
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise UpstreamProtocolError(f"{what} is not JSON: {raw[:200]!r}") from None
    if not isinstance(value, dict):
        raise UpstreamProtocolError(f"{what} is not a JSON object: {raw[:200]!r}")
    return value
