"""OpenAI-shaped bodies, as spoken by llama.cpp (in-process) and by external servers.

Pure functions, no I/O: :func:`request_body` turns a validated
:class:`~helexa.protocol.GenerateRequest` into a ``/v1/chat/completions`` or
``/v1/completions`` body; :func:`parse_chunk` reads one streamed chunk back;
:func:`raise_for_error` maps an ``{"error": ...}`` envelope onto the runtime's exception
tree. Both :mod:`helexa.runtime.llama_cpp` and :mod:`helexa.runtime.openai_proxy` use them,
so that sampling parameters mean the same thing on every backend.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from helexa.protocol import GenerateRequest, Task, Usage

from .base import BackendError, InvalidRequest, Overloaded, Unsupported

PASSTHROUGH_EXTRA = frozenset(
    {"tools", "tool_choice", "parallel_tool_calls", "response_format", "logit_bias", "grammar", "json_schema", "n_probs"}
)
"""``GenerateRequest.extra`` keys forwarded untouched; any other key is rejected."""

# Fields outside the OpenAI spec, by server dialect.
_DIALECT_NAMES = {
    "llama.cpp": {"top_k": "top_k", "min_p": "min_p", "repetition_penalty": "repeat_penalty"},
    "vllm": {"top_k": "top_k", "min_p": "min_p", "repetition_penalty": "repetition_penalty"},
    "openai": {},
}


def validate(request: GenerateRequest, *, max_context: int | None = None) -> None:
    """Reject what no backend can serve. Raises :class:`InvalidRequest` naming the field."""
    s = request.sampling
    if request.task is Task.CHAT:
        if not request.messages:
            raise InvalidRequest("a chat request needs at least one message")
        for i, m in enumerate(request.messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise InvalidRequest(f"messages[{i}] must be an object with a string 'role'")
    elif request.prompt is None:
        raise InvalidRequest("a completion request needs a prompt")
    unknown = sorted(set(request.extra) - PASSTHROUGH_EXTRA)
    if unknown:
        raise InvalidRequest(f"unsupported request fields: {', '.join(unknown)}")
    if s.min_p is not None and not 0.0 <= s.min_p <= 1.0:
        raise InvalidRequest("min_p must be between 0 and 1")
    for name in ("frequency_penalty", "presence_penalty"):
        value = getattr(s, name)
        if value is not None and not -2.0 <= value <= 2.0:
            raise InvalidRequest(f"{name} must be between -2 and 2")
    if s.repetition_penalty is not None and s.repetition_penalty <= 0.0:
        raise InvalidRequest("repetition_penalty must be positive")
    if s.seed is not None and s.seed < 0:
        raise InvalidRequest("seed must not be negative")
    if s.max_tokens is not None and max_context is not None and s.max_tokens > max_context:
        raise InvalidRequest(f"max_tokens {s.max_tokens} exceeds the model's context of {max_context}")
    if any(not stop for stop in s.stop):
        raise InvalidRequest("stop sequences must not be empty")


def request_body(request: GenerateRequest, *, dialect: str = "llama.cpp", model: str | None = None,
                 stream: bool = True) -> dict[str, Any]:
    """The OpenAI body for ``request`` (call :func:`validate` first): streamed with usage,
    or with ``stream=False`` a single JSON answer (read it with :func:`parse_completion`)."""
    s = request.sampling
    body: dict[str, Any] = {"stream": True, "stream_options": {"include_usage": True}} if stream else {"stream": False}
    if model is not None:
        body["model"] = model
    if request.task is Task.CHAT:
        body["messages"] = [dict(m) for m in request.messages]
    else:
        body["prompt"] = request.prompt
    standard = {
        "max_tokens": s.max_tokens,
        "temperature": s.temperature,
        "top_p": s.top_p,
        "seed": s.seed,
        "frequency_penalty": s.frequency_penalty,
        "presence_penalty": s.presence_penalty,
    }
    body.update({k: v for k, v in standard.items() if v is not None})
    if s.stop:
        body["stop"] = list(s.stop)
    for ours, theirs in _DIALECT_NAMES[dialect].items():
        value = getattr(s, ours)
        if value is not None:
            body[theirs] = value
    body.update(request.extra)
    return body


@dataclass(slots=True)
class ChunkView:
    """What one streamed chunk carries: new text, tool-call deltas, the end, the usage."""

    text: str = ""
    tool_calls: list[Any] | None = None
    finish_reason: str | None = None
    usage: Usage | None = None


def parse_chunk(chunk: dict[str, Any]) -> ChunkView:
    """Read a ``chat.completion.chunk`` or ``text_completion`` chunk. Raises the mapped
    :class:`BackendError` for an error envelope."""
    raise_for_error(chunk)
    view = ChunkView(usage=usage_of(chunk))
    for choice in chunk.get("choices") or ():
        delta = choice.get("delta")
        if delta is not None:
            view.text += delta.get("content") or ""
            if delta.get("tool_calls"):
                view.tool_calls = list(delta["tool_calls"])
        else:
            view.text += choice.get("text") or ""
        if choice.get("finish_reason"):
            view.finish_reason = choice["finish_reason"]
    return view


def parse_completion(body: dict[str, Any]) -> ChunkView:
    """Read a non-streamed ``chat.completion`` or ``text_completion`` answer (its first
    choice). Raises the mapped :class:`BackendError` for an error envelope."""
    raise_for_error(body)
    view = ChunkView(usage=usage_of(body))
    choices = body.get("choices") or ()
    if choices:
        choice = choices[0]
        message = choice.get("message")
        if message is not None:
            view.text = message.get("content") or ""
            if message.get("tool_calls"):
                view.tool_calls = list(message["tool_calls"])
        else:
            view.text = choice.get("text") or ""
        view.finish_reason = choice.get("finish_reason")
    return view


def usage_of(body: dict[str, Any]) -> Usage | None:
    """Usage from ``usage`` (with ``prompt_tokens_details.cached_tokens``), else from
    llama.cpp's ``timings``; ``None`` when the body carries neither."""
    usage = body.get("usage")
    if usage:
        details = usage.get("prompt_tokens_details") or {}
        return Usage(
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or 0),
            cached_tokens=int(details.get("cached_tokens") or 0),
        )
    timings = body.get("timings")
    if timings:
        cached = int(timings.get("cache_n") or 0)
        return Usage(
            prompt_tokens=int(timings.get("prompt_n") or 0) + cached,
            completion_tokens=int(timings.get("predicted_n") or 0),
            cached_tokens=cached,
        )
    return None


def raise_for_error(body: Any) -> None:
    """Raise the runtime error an ``{"error": {...}}`` envelope stands for (no-op otherwise)."""
    if not isinstance(body, dict) or "error" not in body:
        return
    err = body["error"]
    if not isinstance(err, dict):
        raise BackendError(str(err))
    message = str(err.get("message") or err)
    code, kind = err.get("code"), err.get("type")
    if code in (400, 422) or kind == "invalid_request_error":
        raise InvalidRequest(message)
    if code == 501 or kind == "not_supported_error":
        raise Unsupported(message)
    if code in (429, 503) or kind == "unavailable_error":
        raise Overloaded(message)
    raise BackendError(message)
