"""OpenAI-shaped bodies, as spoken by llama.cpp (in-process) and by external servers.

Pure functions, no I/O: :func:`request_body` turns a validated
:class:`~helexa.protocol.GenerateRequest` into a ``/v1/chat/completions`` or
``/v1/completions`` body; :func:`parse_chunk` reads one streamed chunk back;
:func:`raise_for_error` maps an ``{"error": ...}`` envelope onto the runtime's exception
tree. Both :mod:`helexa.runtime.llama_cpp` and :mod:`helexa.runtime.openai_proxy` use them,
so that sampling parameters mean the same thing on every backend.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from helexa.protocol import (
    Feature,
    GenerateRequest,
    OutputFormat,
    Task,
    TokenLogprob,
    ToolChoiceMode,
    TopLogprob,
    Usage,
)
from helexa.protocol.inference import MAX_TOP_LOGPROBS

from .base import BackendError, ContextLengthExceeded, InvalidRequest, Overloaded, Unsupported

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


def validate(request: GenerateRequest, *, max_context: int | None = None,
             features: frozenset[Feature] | None = None, vision: bool = False) -> None:
    """Reject what no backend can serve, and (given the backend's ``features``, and whether
    it can see images) what this one cannot. Raises :class:`InvalidRequest` naming the
    field, or :class:`Unsupported`. The cortex's edge checks all this first; this is for
    requests from elsewhere (a peer's cortex, an older one)."""
    s = request.sampling
    if request.task is Task.CHAT:
        if not request.messages:
            raise InvalidRequest("a chat request needs at least one message")
        for i, m in enumerate(request.messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise InvalidRequest(f"messages[{i}] must be an object with a string 'role'")
            _check_content(m.get("content"), f"messages[{i}].content", request.model_id, vision=vision)
    elif request.prompt is None:
        raise InvalidRequest("a completion request needs a prompt")
    # Each check looks at its field first and does its work only when the field is set:
    # this runs on every request a backend takes (most set none of them).
    if request.extra and not PASSTHROUGH_EXTRA.issuperset(request.extra):
        unknown = sorted(set(request.extra) - PASSTHROUGH_EXTRA)
        raise InvalidRequest(f"unsupported request fields: {', '.join(unknown)}")
    if s.min_p is not None and not 0.0 <= s.min_p <= 1.0:
        raise InvalidRequest("min_p must be between 0 and 1")
    if s.frequency_penalty is not None and not -2.0 <= s.frequency_penalty <= 2.0:
        raise InvalidRequest("frequency_penalty must be between -2 and 2")
    if s.presence_penalty is not None and not -2.0 <= s.presence_penalty <= 2.0:
        raise InvalidRequest("presence_penalty must be between -2 and 2")
    if s.repetition_penalty is not None and s.repetition_penalty <= 0.0:
        raise InvalidRequest("repetition_penalty must be positive")
    if s.max_tokens is not None and max_context is not None and s.max_tokens > max_context:
        raise InvalidRequest(f"max_tokens {s.max_tokens} exceeds the model's context of {max_context}")
    if s.stop and not all(s.stop):
        raise InvalidRequest("stop sequences must not be empty")
    if not 0 <= s.top_logprobs <= MAX_TOP_LOGPROBS:
        raise InvalidRequest(f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}")
    choice, fmt = request.tool_choice, request.response_format
    if request.tools or choice is not None:
        names = [t.name for t in request.tools]
        if any(not n for n in names) or len(set(names)) != len(names):
            raise InvalidRequest("tools need unique, non-empty names")
        if any(t.parameters is not None and not isinstance(t.parameters, dict) for t in request.tools):
            raise InvalidRequest("a tool's parameters must be a JSON Schema object")
        if choice is not None and choice.mode is ToolChoiceMode.FUNCTION and choice.name not in names:
            raise InvalidRequest(f"tool_choice names {choice.name!r}, which is not among the tools")
        if choice is not None and choice.mode is not ToolChoiceMode.NONE and not names:
            raise InvalidRequest("tool_choice needs tools")
    if fmt is not None and fmt.kind is OutputFormat.JSON_SCHEMA and not isinstance(fmt.schema, dict):
        raise InvalidRequest("a json_schema response format needs a schema object")
    if features is not None and (request.tools or fmt is not None or s.logprobs):
        wanted = {Feature.TOOLS: request.wants_tools, Feature.STRUCTURED_OUTPUT: request.wants_json,
                  Feature.LOGPROBS: s.logprobs}
        missing = sorted(f.value for f, on in wanted.items() if on and f not in features)
        if missing:
            raise Unsupported(f"model {request.model_id!r} cannot do {', '.join(missing)} on its backend")


def _check_content(content: Any, where: str, model_id: str, *, vision: bool) -> None:
    if content is None or isinstance(content, str):
        return
    if not isinstance(content, list):
        raise InvalidRequest(f"{where} must be a string or an array of content parts")
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if not isinstance(kind, str):
            raise InvalidRequest(f"{where}[{j}] must be an object with a string 'type'")
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise InvalidRequest(f"{where}[{j}].text must be a string")
        elif kind in ("image_url", "input_image") and vision:
            continue
        elif kind in ("image_url", "input_image", "input_audio", "file", "refusal"):
            if kind != "refusal":
                raise Unsupported(f"model {model_id!r} cannot take {kind} content ({where}[{j}])")
        else:
            raise InvalidRequest(f"{where}[{j}] has an unknown type {kind!r}")


def _refusals_as_text(message: dict[str, Any]) -> dict[str, Any]:
    """``message`` with its ``refusal`` parts (an assistant's earlier refusal, sent back in
    the history) as text parts: llama.cpp refuses a part type it does not know."""
    content = message.get("content")
    if not isinstance(content, list) or not any(isinstance(p, dict) and p.get("type") == "refusal" for p in content):
        return dict(message)
    parts = [{"type": "text", "text": p.get("refusal") or ""} if isinstance(p, dict) and p.get("type") == "refusal"
             else p for p in content]
    return {**message, "content": parts}


def request_body(request: GenerateRequest, *, dialect: str = "llama.cpp", model: str | None = None,
                 stream: bool = True) -> dict[str, Any]:
    """The OpenAI body for ``request`` (call :func:`validate` first): streamed with usage,
    or with ``stream=False`` a single JSON answer (read it with :func:`parse_completion`)."""
    s = request.sampling
    body: dict[str, Any] = {"stream": True, "stream_options": {"include_usage": True}} if stream else {"stream": False}
    if model is not None:
        body["model"] = model
    if request.task is Task.CHAT:
        body["messages"] = [dict(m) if dialect != "llama.cpp" or isinstance(m.get("content"), str | None)
                            else _refusals_as_text(m) for m in request.messages]
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
    if s.seed is not None and dialect == "llama.cpp":
        # Any 64-bit seed (negative ones too) folds, deterministically, into llama.cpp's
        # uint32 short of 0xFFFFFFFF, which means "random" there (docs/api.md).
        body["seed"] = s.seed % 0xFFFFFFFF
    if s.stop:
        body["stop"] = list(s.stop)
        if dialect == "llama.cpp":
            # llama.cpp names the stop word that ended the text only in its verbose block
            # (read by stop_sequence_of), so it is asked for only when there are stops.
            body["verbose"] = True
    for ours, theirs in _DIALECT_NAMES[dialect].items():
        value = getattr(s, ours)
        if value is not None:
            body[theirs] = value
    if s.logprobs:
        # llama.cpp reports probabilities only when asked for at least one alternative (the
        # sampled token's own logprob comes with them); the backend trims them back to 0.
        top = max(1, s.top_logprobs) if dialect == "llama.cpp" else s.top_logprobs
        if request.task is Task.CHAT:
            body["logprobs"] = True
            body["top_logprobs"] = top
        else:
            body["logprobs"] = top
    body.update(request.extra)
    if dialect == "vllm" and request.cache_scope:  # vLLM's prefix cache, salted per scope (after extra: ours)
        body["cache_salt"] = request.cache_scope
    if request.tools:
        body["tools"] = [tool_body(t) for t in request.tools]
    if request.tool_choice is not None:
        c = request.tool_choice
        body["tool_choice"] = ({"type": "function", "function": {"name": c.name}}
                               if c.mode is ToolChoiceMode.FUNCTION else c.mode.value)
    if request.response_format is not None:
        body["response_format"] = response_format_body(request)
    return body


def tool_body(tool: Any) -> dict[str, Any]:
    """One :class:`~helexa.protocol.ToolSpec` as OpenAI's ``{"type": "function", ...}``."""
    fn: dict[str, Any] = {"name": tool.name}
    if tool.description is not None:
        fn["description"] = tool.description
    if tool.parameters is not None:
        fn["parameters"] = tool.parameters
    if tool.strict:
        fn["strict"] = True
    return {"type": "function", "function": fn}


def response_format_body(request: GenerateRequest) -> dict[str, Any]:
    fmt = request.response_format
    assert fmt is not None
    if fmt.kind is not OutputFormat.JSON_SCHEMA:
        return {"type": fmt.kind.value}
    spec: dict[str, Any] = {"name": fmt.name or "response", "schema": fmt.schema}
    if fmt.strict:
        spec["strict"] = True
    return {"type": "json_schema", "json_schema": spec}


@dataclass(slots=True)
class ChunkView:
    """What one streamed chunk carries: new text, tool-call deltas, the end, the usage."""

    text: str = ""
    tool_calls: list[Any] | None = None
    finish_reason: str | None = None
    usage: Usage | None = None
    logprobs: list[TokenLogprob] | None = None
    stop_sequence: str | None = None


def stop_sequence_of(body: dict[str, Any], choice: dict[str, Any], stops: tuple[str, ...]) -> str | None:
    """Which of the request's ``stops`` ended a choice, where the server says so: vLLM's
    ``stop_reason`` (the matched string; a number is a stop token), or llama.cpp's
    ``__verbose`` block (``stop_type: "word"``, ``stopping_word``; present when the request
    asked for ``verbose``). A word the request did not ask for is not reported."""
    if not stops:
        return None
    word = choice.get("stop_reason")
    if type(word) is str and word in stops:
        return word
    verbose = body.get("__verbose")
    if isinstance(verbose, dict) and verbose.get("stop_type") == "word":
        word = verbose.get("stopping_word")
        if type(word) is str and word in stops:
            return word
    return None


def parse_chunk(chunk: dict[str, Any], stops: tuple[str, ...] = ()) -> ChunkView:
    """Read a ``chat.completion.chunk`` or ``text_completion`` chunk (``stops``: the
    request's stop sequences, to say which one ended it). Raises the mapped
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
            view.stop_sequence = stop_sequence_of(chunk, choice, stops)
        if choice.get("logprobs"):
            view.logprobs = (view.logprobs or []) + logprobs_of(choice["logprobs"])
    return view


_OPENING_DELTA = {"role": "assistant", "content": None}
_NEWS = ("usage", "timings", "error", "prompt_progress")


def says_nothing(chunk: Any) -> bool:
    """Whether ``chunk`` is a chat stream's opening chunk that only names the role (no text,
    no end, no usage, no error): :func:`parse_chunk` would find nothing in it."""
    if type(chunk) is not dict:
        return False
    choices = chunk.get("choices")
    if type(choices) is not list or len(choices) != 1 or type(choices[0]) is not dict:
        return False
    choice = choices[0]
    return (choice.get("delta") == _OPENING_DELTA and not choice.get("finish_reason") and not choice.get("logprobs")
            and not any(k in chunk for k in _NEWS))


LOGPROB_FLOOR = -9999.0
"""What a log-probability of -inf (or NaN) is reported as: JSON has no infinity, and
OpenAI itself reports the impossible as -9999."""


def _logprob(value: Any) -> float:
    try:
        f = float(value)
    except (TypeError, ValueError):
        return LOGPROB_FLOOR
    return f if math.isfinite(f) else LOGPROB_FLOOR


def _token_bytes(value: Any) -> bytes | None:
    if isinstance(value, list) and all(isinstance(b, int) and 0 <= b < 256 for b in value):
        return bytes(value)
    return None


def logprobs_of(body: Any) -> list[TokenLogprob]:
    """The tokens of a choice's ``logprobs``: OpenAI's chat shape (``content``: one entry
    per token with ``top_logprobs``, as llama.cpp answers both endpoints) or the legacy
    completions shape (``tokens`` / ``token_logprobs`` / ``top_logprobs`` maps)."""
    if not isinstance(body, dict):
        return []
    out: list[TokenLogprob] = []
    if isinstance(body.get("content"), list):
        for e in body["content"]:
            if not isinstance(e, dict):
                continue
            top = tuple(TopLogprob(str(t.get("token", "")), _logprob(t.get("logprob")), _token_bytes(t.get("bytes")))
                        for t in e.get("top_logprobs") or () if isinstance(t, dict))
            out.append(TokenLogprob(str(e.get("token", "")), _logprob(e.get("logprob")), _token_bytes(e.get("bytes")),
                                    top))
        return out
    tokens, lps, tops = body.get("tokens") or [], body.get("token_logprobs") or [], body.get("top_logprobs") or []
    for i, token in enumerate(tokens):
        alts = tops[i] if i < len(tops) and isinstance(tops[i], dict) else {}
        out.append(TokenLogprob(str(token), _logprob(lps[i] if i < len(lps) else None), None,
                                tuple(TopLogprob(str(k), _logprob(v)) for k, v in alts.items())))
    return out


def parse_completion(body: dict[str, Any], stops: tuple[str, ...] = ()) -> ChunkView:
    """Read a non-streamed ``chat.completion`` or ``text_completion`` answer (its first
    choice; ``stops`` as for :func:`parse_chunk`). Raises the mapped :class:`BackendError`
    for an error envelope."""
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
        view.stop_sequence = stop_sequence_of(body, choice, stops)
        if choice.get("logprobs"):
            view.logprobs = logprobs_of(choice["logprobs"])
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


_TOO_LARGE = re.compile(r"input \((\d+) tokens\) is too large to process.*batch size: (\d+)", re.S)


def raise_for_embed_error(answer: Any) -> None:
    """As :func:`raise_for_error`; an input longer than llama.cpp embeds at
    once (its physical batch) is the client's to shorten: :class:`ContextLengthExceeded`."""
    try:
        raise_for_error(answer)
    except BackendError as exc:
        if (found := _TOO_LARGE.search(str(exc))) is None:
            raise
        tokens, most = found.groups()
        raise ContextLengthExceeded(f"an input of {tokens} tokens is longer than this model's maximum of {most} "
                                    "tokens per input; shorten it") from None
