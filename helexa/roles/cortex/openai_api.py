"""OpenAI's request and response shapes, kept at the HTTP edge of the cortex.

Request models are lenient: unknown fields are kept (and logged once per field name), never
fatal. Turning a validated body into the fabric's own :class:`~helexa.protocol.GenerateRequest`
or :class:`~helexa.protocol.EmbedRequest` is serving code and lives in the functions below,
not on the models. Response bodies (non-streaming) are built here too; streamed chunks are
framed in :mod:`.sse`.

Errors: :func:`parse` raises :class:`~.errors.BadRequest` (400) naming the field.
"""

from __future__ import annotations

import base64
import logging
import struct
import time
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from helexa.protocol import (
    EmbedRequest,
    EmbedResult,
    GenerateRequest,
    GenerateResult,
    SamplingParams,
    Task,
    Usage,
)

from .errors import BadRequest

log = logging.getLogger(__name__)

PASSTHROUGH = frozenset(
    {"tools", "tool_choice", "parallel_tool_calls", "response_format", "logit_bias", "grammar", "json_schema"}
)
"""Body fields handed to the backend untouched (``GenerateRequest.extra``)."""

# Fields the official client may send that we accept and deliberately ignore.
_IGNORED = frozenset({"user", "store", "metadata", "service_tier", "logprobs", "top_logprobs", "echo", "best_of",
                      "suffix", "modalities", "prediction", "reasoning_effort", "dimensions"})
_logged_unknown: set[str] = set()


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)

    def unknown_fields(self) -> list[str]:
        return sorted(self.model_extra or ())


class StreamOptions(_Lenient):
    include_usage: bool = False


class _GenerateBody(_Lenient):
    model: str = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, le=1)
    n: int = Field(1, ge=1, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ChatCompletionRequest(_GenerateBody):
    messages: list[dict[str, Any]] = Field(min_length=1)


class CompletionRequest(_GenerateBody):
    prompt: str | list[str]


class EmbeddingRequest(_Lenient):
    model: str = Field(min_length=1)
    input: str | list[str] = Field(min_length=1)
    encoding_format: Literal["float", "base64"] = "float"


M = TypeVar("M", bound=_Lenient)


def parse(model: type[M], raw: bytes) -> M:
    """Validate a JSON body. Raises :class:`BadRequest` naming the first bad field."""
    try:
        body = model.model_validate_json(raw)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        loc = ".".join(str(p) for p in first["loc"])
        if first["type"] == "json_invalid":
            raise BadRequest(f"the body is not valid JSON: {first['msg']}") from None
        if first["type"] == "model_type" and not loc:
            raise BadRequest("the body must be a JSON object") from None
        raise BadRequest(f"{loc or 'body'}: {first['msg']}", param=loc or None) from None
    for name in body.unknown_fields():
        if name not in PASSTHROUGH and name not in _IGNORED and name not in _logged_unknown:
            _logged_unknown.add(name)
            log.info("ignoring unknown request field %r (%s)", name, model.__name__)
    return body


def to_generate_request(body: ChatCompletionRequest | CompletionRequest, request_id: str) -> GenerateRequest:
    """The fabric request for a validated chat or completion body."""
    stop: tuple[str, ...] = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    if any(not s for s in stop):
        raise BadRequest("stop sequences must not be empty", param="stop")
    try:
        sampling = SamplingParams(
            max_tokens=body.max_completion_tokens or body.max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            top_k=body.top_k,
            min_p=body.min_p,
            stop=stop,
            seed=body.seed,
            repetition_penalty=body.repetition_penalty,
            frequency_penalty=body.frequency_penalty,
            presence_penalty=body.presence_penalty,
        )
    except ValueError as exc:
        raise BadRequest(str(exc)) from None
    extra = {k: v for k, v in (body.model_extra or {}).items() if k in PASSTHROUGH}
    if isinstance(body, ChatCompletionRequest):
        for i, m in enumerate(body.messages):
            if not isinstance(m.get("role"), str):
                raise BadRequest(f"messages[{i}] needs a string 'role'", param=f"messages.{i}.role")
        return GenerateRequest(request_id, body.model, Task.CHAT, messages=tuple(body.messages),
                               sampling=sampling, stream=body.stream, extra=extra)
    prompt = body.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise BadRequest("exactly one prompt per request is supported", param="prompt")
        prompt = prompt[0]
    return GenerateRequest(request_id, body.model, Task.COMPLETION, prompt=prompt, sampling=sampling,
                           stream=body.stream, extra=extra)


def to_embed_request(body: EmbeddingRequest, request_id: str) -> EmbedRequest:
    inputs = (body.input,) if isinstance(body.input, str) else tuple(body.input)
    if any(not isinstance(i, str) or not i for i in inputs):
        raise BadRequest("every input must be a non-empty string", param="input")
    return EmbedRequest(request_id, body.model, inputs)


# --- responses ---------------------------------------------------------------------------


def usage_body(usage: Usage) -> dict[str, int]:
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens}


def merge_tool_calls(parts: list[Any]) -> list[dict[str, Any]]:
    """The tool calls of a non-streamed answer, from what the neuron relayed.

    Streamed backends relay OpenAI tool-call *deltas*: pieces sharing an ``index``, the
    first with ``id``, ``type`` and the function's ``name``, the rest carrying more of its
    ``arguments``. They are joined into one call per index. A part without ``index`` is a
    whole call already (a backend that answered in one piece) and is kept as it is.
    """
    calls: list[dict[str, Any]] = []
    by_index: dict[Any, dict[str, Any]] = {}
    for part in parts:
        if not isinstance(part, dict):
            continue
        index = part.get("index")
        if index is None:
            calls.append(dict(part))
            continue
        fn = part.get("function") or {}
        call = by_index.get(index)
        if call is None:
            call = by_index[index] = {"id": part.get("id"), "type": part.get("type") or "function",
                                      "function": {"name": fn.get("name") or "", "arguments": ""}}
            calls.append(call)
        else:
            if part.get("id"):
                call["id"] = part["id"]
            if fn.get("name"):
                call["function"]["name"] = fn["name"]
        call["function"]["arguments"] += fn.get("arguments") or ""
    return calls


def completion_response(
    request: GenerateRequest, response_id: str, text: str, result: GenerateResult,
    tool_calls: list[Any] | None = None,
) -> dict[str, Any]:
    """The non-streaming body of a chat completion or a completion."""
    created = int(time.time())
    if request.task is Task.CHAT:
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if tool_calls:
            message["tool_calls"] = merge_tool_calls(tool_calls)
        choice = {"index": 0, "message": message, "finish_reason": result.finish_reason, "logprobs": None}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "finish_reason": result.finish_reason, "logprobs": None}
        obj = "text_completion"
    return {"id": response_id, "object": obj, "created": created, "model": request.model_id,
            "choices": [choice], "usage": usage_body(result.usage)}


def embedding_response(model: str, result: EmbedResult, encoding_format: str) -> dict[str, Any]:
    """The ``/v1/embeddings`` body; vectors as float lists or base64 of float32 LE."""
    n = len(result.vectors) // 4
    count = n // result.dim if result.dim else 0
    data = []
    step = result.dim * 4
    for i in range(count):
        raw = result.vectors[i * step:(i + 1) * step]
        if encoding_format == "base64":
            value: Any = base64.b64encode(raw).decode("ascii")
        else:
            value = list(struct.unpack(f"<{result.dim}f", raw))
        data.append({"object": "embedding", "index": i, "embedding": value})
    return {"object": "list", "data": data, "model": model,
            "usage": {"prompt_tokens": result.usage.prompt_tokens, "total_tokens": result.usage.prompt_tokens}}
