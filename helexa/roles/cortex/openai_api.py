"""OpenAI's requests read at the HTTP edge of the cortex.

The request models are in :mod:`.openai_requests` (typed, lenient to unknown fields: kept
and logged once per field name, never fatal). Turning a validated body into the fabric's
own :class:`~helexa.protocol.GenerateRequest` or :class:`~helexa.protocol.EmbedRequest` is
serving code and lives in the functions below, not on the models. The answers' bodies are
:mod:`.openai_answers` (non-streaming) and :mod:`.sse` (streamed chunks).

Errors: :func:`parse` raises :class:`~.errors.BadRequest` (400) naming the field.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, TypeVar

from pydantic import ValidationError

from helexa.protocol import (
    EmbedRequest,
    GenerateRequest,
    OutputFormat,
    ResponseFormat,
    SamplingParams,
    Task,
    ToolChoice,
    ToolChoiceMode,
    ToolSpec,
)

from .errors import BadRequest
from .openai_requests import (
    AudioPart,
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    FilePart,
    GenerateBody,
    ImagePart,
    JsonObjectFormat,
    JsonSchemaResponseFormat,
    Lenient,
    NamedToolChoice,
    UserMessage,
    WireJsonError,
    FieldError,
    check_wire_json,
)
from .schema_check import check_schema

log = logging.getLogger(__name__)

PASSTHROUGH = frozenset({"grammar", "json_schema"})
"""Unknown body fields handed to the backend untouched (``GenerateRequest.extra``): llama.cpp's
own ways of constraining output. ``logit_bias`` and ``parallel_tool_calls`` are typed fields
that travel the same way."""

# Fields the official client may send that we accept and deliberately ignore.
_IGNORED = frozenset({"user", "store", "metadata", "service_tier", "modalities", "prediction", "reasoning_effort",
                      "stream_options", "web_search_options", "safety_identifier", "prompt_cache_key", "verbosity"})
_logged_unknown: set[str] = set()
MAX_LOGGED_UNKNOWN = 200
"""Distinct unknown field names logged (once each, by their first 64 characters); past that,
a client inventing names cannot grow the set or the log."""

__all__ = ["ChatCompletionRequest", "CompletionRequest", "EmbeddingRequest", "parse", "to_generate_request",
           "to_embed_request"]

M = TypeVar("M", bound=Lenient)

_TYPE_LABELS = frozenset({"str", "int", "float", "bool", "dict", "list", "none"})


def param_of(loc: tuple[Any, ...]) -> str:
    """A pydantic error location as the field path a client wrote: ``messages[0].content``.
    Union-member labels (``str``, ``list[...]``, ``role=user``) are left out."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif (not part or "[" in part or "=" in part or part in _TYPE_LABELS or part[0].isupper()
              or part.startswith(("function-", "json-or-python", "nullable", "literal"))):
            continue
        else:
            out += ("." if out else "") + ("schema" if part == "schema_" else part)
    return out


def _got(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "an integer",
             float: "a decimal number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def parse(model: type[M], raw: bytes) -> M:
    """Validate a JSON body. Raises :class:`BadRequest` naming the bad field (``param``) and
    saying what was expected and what came."""
    try:
        body = model.model_validate_json(raw)
    except ValidationError as exc:
        raise _bad_request(exc) from None
    if not body.__pydantic_extra__:  # (nearly every body: no unknown field, nothing to sort)
        return body
    for name in body.unknown_fields():
        shown = name[:64]  # the name is the client's, up to the body's limit: never kept whole
        if (name not in PASSTHROUGH and name not in _IGNORED and shown not in _logged_unknown
                and len(_logged_unknown) < MAX_LOGGED_UNKNOWN):
            _logged_unknown.add(shown)
            log.info("ignoring unknown request field %r (%s)", shown, model.__name__)
    return body


def _bad_request(exc: ValidationError) -> BadRequest:
    errors = exc.errors(include_url=False)
    first = errors[0]
    if first["type"] == "json_invalid":
        return BadRequest(f"the body is not valid JSON: {first['msg']}")
    if first["type"] in ("model_type", "model_attributes_type") and not first["loc"]:
        return BadRequest("the body must be a JSON object")
    cause = (first.get("ctx") or {}).get("error")
    if isinstance(cause, FieldError):
        return BadRequest(str(cause), param=cause.param)
    # The deepest location is the most precise; errors sharing it are a union's members.
    located = [(param_of(tuple(e["loc"])), e) for e in errors]
    param = max((p for p, _ in located), key=lambda p: (p.count(".") + p.count("["), len(p)))
    here = [e for p, e in located if p == param]
    cause = (here[0].get("ctx") or {}).get("error")
    if isinstance(cause, WireJsonError):
        inner = param + ("." + cause.path if cause.path and not cause.path.startswith("[") else cause.path)
        return BadRequest(f"Invalid value for '{inner}': {cause}", param=param or None)
    messages = list(dict.fromkeys(e["msg"].removeprefix("Value error, ") for e in here))
    detail = " or ".join(messages)
    if any(e["type"].endswith("_type") or e["type"] in ("literal_error", "union_tag_invalid") for e in here):
        detail += f" (got {_got(here[0]['input'])})"
    if not param:
        return BadRequest(detail)
    return BadRequest(f"Invalid value for '{param}': {detail}", param=param)


MAX_STOP = 4
"""OpenAI's limit on ``stop`` (Chat Completions and legacy Completions): more is a 400 naming
``stop``, as OpenAI answers. Anthropic's ``stop_sequences`` and Ollama's ``options.stop`` have
no such limit of their own; the fabric's (16) bounds them."""


def to_generate_request(body: ChatCompletionRequest | CompletionRequest, request_id: str) -> GenerateRequest:
    """The fabric request for a validated chat or completion body. Raises
    :class:`BadRequest` for what the types alone could not rule out."""
    stop: tuple[str, ...] = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    if "" in stop:
        raise BadRequest("stop sequences must not be empty", param="stop")
    if len(stop) > MAX_STOP:
        raise BadRequest(f"Invalid 'stop': array too long. Expected an array with maximum length {MAX_STOP}, but got "
                         f"an array with length {len(stop)} instead.", param="stop", code="array_above_max_length")
    chat = isinstance(body, ChatCompletionRequest)
    if chat:
        logprobs, top = bool(body.logprobs), body.top_logprobs or 0
    else:
        logprobs, top = body.logprobs is not None, body.logprobs or 0
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
            logprobs=logprobs,
            top_logprobs=top,
        )
    except ValueError as exc:
        raise BadRequest(str(exc)) from None
    extra = _extra(body)
    if chat:
        for i, m in enumerate(body.messages):
            if isinstance(m, UserMessage) and isinstance(m.content, list):
                for j, part in enumerate(m.content):
                    if isinstance(part, (AudioPart, FilePart)):
                        raise BadRequest(f"{part.type} content is not supported: no backend here takes it",
                                         param=f"messages[{i}].content[{j}]", code="unsupported")
        return GenerateRequest(
            request_id, body.model, Task.CHAT,
            messages=_wire_messages(body.messages),
            sampling=sampling, stream=body.stream, extra=extra,
            tools=tool_specs(body.tools) if body.tools else (),
            tool_choice=_tool_choice(body.tool_choice) if body.tool_choice is not None else None,
            response_format=_response_format(body.response_format) if body.response_format is not None else None,
        )
    if body.echo:
        raise BadRequest("echo is not supported", param="echo")
    if body.suffix:
        raise BadRequest("suffix (fill-in-the-middle) is not supported", param="suffix")
    prompt = body.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise BadRequest("exactly one prompt per request is supported", param="prompt")
        prompt = prompt[0]
    return GenerateRequest(request_id, body.model, Task.COMPLETION, prompt=prompt, sampling=sampling,
                           stream=body.stream, extra=extra)


def _wire_messages(messages: list[Any]) -> tuple[dict[str, Any], ...]:
    """The messages as they travel to the neuron: each one's ``model_dump(mode="json",
    exclude_none=True, by_alias=True)``, every value checked by :func:`check_wire_json`.
    Raises :class:`BadRequest` naming the value that cannot travel."""
    out = []
    for i, m in enumerate(messages):
        plain = _plain_message(m)
        if plain is not None:
            out.append(plain)
            continue
        dumped = m.model_dump(mode="json", exclude_none=True, by_alias=True)
        try:
            check_wire_json(dumped, f"messages[{i}]", 1)  # depth 1: inside the messages list
        except WireJsonError as exc:  # an unknown extra field with an odd value
            raise BadRequest(f"Invalid value for '{exc.path}': {exc}", param=exc.path) from None
        out.append(dumped)
    return tuple(out)


def _plain_message(m: Lenient) -> dict[str, str] | None:
    """What the dump gives for a message whose every value, extra fields included, is a
    string or null (nearly every message: a role, a text, perhaps a name): its strings in
    field order, then the extras', the nulls left out. A string always travels, so such a
    message needs neither pydantic's dump nor the wire check's walk. None otherwise, and
    for a message class whose dump renames or reshapes a field (an alias, a serializer)."""
    if not _dumps_as_is(type(m)):
        return None
    out: dict[str, str] = {}
    for name, value in m.__dict__.items():
        if type(value) is str:
            out[name] = value
        elif value is not None:
            return None
    if m.__pydantic_extra__:
        for name, value in m.__pydantic_extra__.items():
            if type(value) is str:
                out[name] = value
            elif value is not None:
                return None
    return out


@functools.cache
def _dumps_as_is(cls: type[Lenient]) -> bool:
    """Whether ``cls``'s dump keeps every field's name and value as they are on the model
    (worked out once per class)."""
    decorators = cls.__pydantic_decorators__
    if decorators.field_serializers or decorators.model_serializers:
        return False
    return all(f.alias in (None, name) and f.serialization_alias in (None, name)
               for name, f in cls.model_fields.items())


def _extra(body: GenerateBody) -> dict[str, Any]:
    unknown = body.__pydantic_extra__
    extra = {k: v for k, v in unknown.items() if k in PASSTHROUGH} if unknown else {}
    for name, value in extra.items():
        try:
            check_wire_json(value)
        except WireJsonError as exc:
            raise BadRequest(f"Invalid value for '{name}': {exc}", param=name) from None
    if body.logit_bias:
        extra["logit_bias"] = dict(body.logit_bias)
    if isinstance(body, ChatCompletionRequest) and body.parallel_tool_calls is not None:
        extra["parallel_tool_calls"] = body.parallel_tool_calls
    return extra


def tool_specs(given: list[Any]) -> tuple[ToolSpec, ...]:
    """The fabric's tools for ``tools`` (OpenAI's shape, Ollama's too); a tool's ``parameters``
    must be a usable JSON schema (:func:`~.schema_check.check_schema`)."""
    out = []
    for i, t in enumerate(given):
        fn = t.function
        if fn.parameters is not None:
            check_schema(fn.parameters, f"tools[{i}].function.parameters")
        out.append(ToolSpec(fn.name, fn.description, fn.parameters, bool(fn.strict)))
    return tuple(out)


def _tool_choice(choice: Any) -> ToolChoice | None:
    if choice is None:
        return None
    if isinstance(choice, NamedToolChoice):
        return ToolChoice(ToolChoiceMode.FUNCTION, choice.function.name)
    return ToolChoice(ToolChoiceMode(choice))


def _response_format(fmt: Any) -> ResponseFormat | None:
    if fmt is None:
        return None
    if isinstance(fmt, JsonSchemaResponseFormat):
        spec = fmt.json_schema
        if spec.schema_ is not None:
            check_schema(spec.schema_, "response_format.json_schema.schema")
        return ResponseFormat(OutputFormat.JSON_SCHEMA, spec.schema_ or {}, spec.name, bool(spec.strict))
    if isinstance(fmt, JsonObjectFormat):
        return ResponseFormat(OutputFormat.JSON_OBJECT)
    return ResponseFormat(OutputFormat.TEXT)


def image_parts(body: ChatCompletionRequest) -> str | None:
    """The location of the first image content part (``messages[i].content[j]``), if any."""
    for i, m in enumerate(body.messages):
        if isinstance(m, UserMessage) and isinstance(m.content, list):
            for j, part in enumerate(m.content):
                if isinstance(part, ImagePart):
                    return f"messages[{i}].content[{j}]"
    return None


MAX_EMBED_INPUTS = 2048
"""Inputs one embeddings request may carry (OpenAI's limit, and the backends')."""


def to_embed_request(body: EmbeddingRequest, request_id: str) -> EmbedRequest:
    inputs = (body.input,) if isinstance(body.input, str) else tuple(body.input)
    if any(not isinstance(i, str) or not i for i in inputs):
        raise BadRequest("every input must be a non-empty string", param="input")
    if len(inputs) > MAX_EMBED_INPUTS:
        raise BadRequest(f"at most {MAX_EMBED_INPUTS} inputs per request, got {len(inputs)}", param="input")
    if body.dimensions is not None:
        raise BadRequest("dimensions is not supported: each model answers in its own size", param="dimensions")
    return EmbedRequest(request_id, body.model, inputs, truncate=False)  # OpenAI cuts nothing: a 400
