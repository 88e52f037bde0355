"""OpenAI's request bodies as typed models: what a client may send, checked at the edge.

Every shape OpenAI defines for ``/v1/chat/completions``, ``/v1/completions`` and
``/v1/embeddings`` is a pydantic model here: messages by ``role``, content parts by
``type``, tools, ``tool_choice``, ``response_format``. The models are lenient to unknown
*extra* fields (kept, logged once, never forwarded unless listed in
:data:`~.openai_api.PASSTHROUGH`) and strict about the types of the fields they know:
a ``content`` that is a number, a ``tools`` that is a string, a float that is ``NaN``, an
integer beyond 64 bits, a ``max_tokens`` of ``"10"``, ``true`` or ``1e3``, a ``stream`` of
``"yes"`` are all refused here, with the field named, before a request
costs a neuron anything.

Free-form JSON that travels to a neuron (a tool's ``parameters``, a ``json_schema``'s
``schema``, ``logit_bias``) is checked by :func:`check_wire_json`: every integer must
fit the control plane's msgpack codec (64 bits), every float must be finite, and nesting
is bounded.

Turning a validated body into the fabric's own request is :mod:`.openai_api`'s job.
"""

from __future__ import annotations

import functools
import math
import operator
import typing
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, Tag, field_validator, model_validator

INT64_MIN = -(2**63)
UINT64_MAX = 2**64 - 1
MAX_JSON_DEPTH = 64
"""Nesting allowed in free-form JSON (a tool's parameters, a schema). The JSON parser
already stops at 200; msgpack's own limit is higher; 64 is deeper than any real schema."""
MAX_N = 16
"""Choices one request may ask for (each is a whole generation)."""


class WireJsonError(ValueError):
    """A free-form JSON value cannot travel on the control plane (see :func:`check_wire_json`)."""

    def __init__(self, message: str, path: str) -> None:
        super().__init__(message)
        self.path = path


def check_wire_json(value: Any, path: str = "", depth: int = 0) -> None:
    """Raise :class:`WireJsonError` (with the path of the bad value) unless ``value`` can be
    encoded by the msgpack codec and re-encoded as strict JSON: integers within
    [-2**63, 2**64-1], finite floats, string keys, at most :data:`MAX_JSON_DEPTH` levels."""
    if depth > MAX_JSON_DEPTH:
        raise WireJsonError(f"nested deeper than {MAX_JSON_DEPTH} levels", path)
    match value:
        case bool() | str() | None:
            return
        case int():
            if not INT64_MIN <= value <= UINT64_MAX:
                raise WireJsonError("integer out of the 64-bit range", path)
        case float():
            if not math.isfinite(value):
                raise WireJsonError("number must be finite", path)
        case dict():
            for k, v in value.items():
                check_wire_json(v, f"{path}.{k}" if path else str(k), depth + 1)
        case list() | tuple():
            for i, v in enumerate(value):
                check_wire_json(v, f"{path}[{i}]", depth + 1)
        case _:
            raise WireJsonError(f"unsupported value of type {type(value).__name__}", path)


def _wire_json(value: Any) -> Any:
    check_wire_json(value)
    return value


class Lenient(BaseModel):
    """Unknown extra fields are kept (and reported by :meth:`unknown_fields`); known fields
    are typed strictly (pydantic's strict mode, for every model of every surface): a
    boolean is ``true`` or ``false``, an integer a JSON integer (not ``"10"``, ``true`` or
    ``10.0``: OpenAI refuses a decimal number where it wants an integer too), a string a
    JSON string; a number where a float is meant may be written as an integer."""

    model_config = ConfigDict(extra="allow", frozen=True, allow_inf_nan=False, strict=True)

    def unknown_fields(self) -> list[str]:
        return sorted(self.model_extra or ())


Name = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
"""A function or schema name, as OpenAI constrains it."""

Int64 = Annotated[int, Field(ge=INT64_MIN, le=2**63 - 1)]


def _null_as(default: Any) -> BeforeValidator:
    return BeforeValidator(lambda value: default if value is None else value)


Off = Annotated[bool, _null_as(False)]
"""A switch off unless ``true``; ``null`` is its default, as OpenAI's schemas make these
fields nullable and clients send ``"stream": null`` for a value not given."""

On = Annotated[bool, _null_as(True)]
"""A switch on unless ``false`` (Ollama's ``stream``); ``null`` is its default."""


# --- content parts ------------------------------------------------------------------------


class TextPart(Lenient):
    type: Literal["text"]
    text: str


class ImageUrl(Lenient):
    url: str = Field(min_length=1)
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(Lenient):
    type: Literal["image_url"]
    image_url: ImageUrl


class InputAudio(Lenient):
    data: str
    format: str


class AudioPart(Lenient):
    type: Literal["input_audio"]
    input_audio: InputAudio


class FileRef(Lenient):
    file_data: str | None = None
    file_id: str | None = None
    filename: str | None = None


class FilePart(Lenient):
    type: Literal["file"]
    file: FileRef


class RefusalPart(Lenient):
    type: Literal["refusal"]
    refusal: str


def _tagged(field: str, *members: type[BaseModel]) -> Any:
    """A union of models told apart by ``field``. Each member is tagged ``field=value`` so
    that an error's location names the field, not a type (see :func:`param_of`)."""
    tags: dict[str, str] = {}
    tagged = []
    for m in members:
        values = typing.get_args(m.model_fields[field].annotation)
        for value in values:
            tags[value] = f"{field}={values[0]}"
        tagged.append(Annotated[m, Tag(f"{field}={values[0]}")])

    def tag(value: Any) -> str | None:
        # type() and `in` for the plain dict and str that a JSON body gives: no method call,
        # once per message and content part of every request.
        if type(value) is dict:
            got = value[field] if field in value else None
        else:
            got = value.get(field) if isinstance(value, dict) else getattr(value, field, None)
        if type(got) is str:
            return tags[got] if got in tags else None
        return tags.get(got) if isinstance(got, str) else None

    names = ", ".join(sorted(tags))
    return Annotated[
        functools.reduce(operator.or_, tagged),
        Discriminator(tag, custom_error_type=f"invalid_{field}",
                      custom_error_message=f"{field} must be one of {names}"),
    ]


UserPart = _tagged("type", TextPart, ImagePart, AudioPart, FilePart)
AssistantPart = _tagged("type", TextPart, RefusalPart)
TextParts = list[_tagged("type", TextPart)]


# --- messages -----------------------------------------------------------------------------


class FunctionCall(Lenient):
    name: str = Field(min_length=1)
    arguments: str


class ToolCall(Lenient):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class SystemMessage(Lenient):
    role: Literal["system", "developer"]
    content: str | TextParts
    name: str | None = None


class UserMessage(Lenient):
    role: Literal["user"]
    content: str | list[UserPart]
    name: str | None = None


class AssistantMessage(Lenient):
    role: Literal["assistant"]
    content: str | list[AssistantPart] | None = None
    name: str | None = None
    refusal: str | None = None
    tool_calls: list[ToolCall] | None = None
    function_call: FunctionCall | None = None

    @model_validator(mode="after")
    def _says_something(self) -> "AssistantMessage":
        if self.content is None and not self.tool_calls and self.function_call is None:
            raise ValueError("an assistant message needs content or tool_calls")
        return self


class ToolMessage(Lenient):
    role: Literal["tool"]
    content: str | TextParts
    tool_call_id: str


class FunctionMessage(Lenient):
    role: Literal["function"]
    content: str | None
    name: str = Field(min_length=1)


Message = _tagged("role", SystemMessage, UserMessage, AssistantMessage, ToolMessage, FunctionMessage)


# --- tools, tool_choice, response_format --------------------------------------------------


class FunctionDefinition(Lenient):
    name: Name
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    @field_validator("parameters")
    @classmethod
    def _travels(cls, value: Any) -> Any:
        return _wire_json(value)


class Tool(Lenient):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(Lenient):
    name: Name


class NamedToolChoice(Lenient):
    type: Literal["function"]
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class JsonSchemaFormat(Lenient):
    name: Name
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None

    @field_validator("schema_")
    @classmethod
    def _travels(cls, value: Any) -> Any:
        return _wire_json(value)


class TextFormat(Lenient):
    type: Literal["text"]


class JsonObjectFormat(Lenient):
    type: Literal["json_object"]


class JsonSchemaResponseFormat(Lenient):
    type: Literal["json_schema"]
    json_schema: JsonSchemaFormat


ResponseFormat = _tagged("type", TextFormat, JsonObjectFormat, JsonSchemaResponseFormat)


# --- request bodies -----------------------------------------------------------------------


MAX_TOKEN_ID = 2**31 - 1
"""The largest token id a ``logit_bias`` key may name (llama.cpp's are 32-bit); the model's
vocabulary, where the cortex reads it, bounds them further (:mod:`.request_limits`)."""


def logit_biases(value: dict[str, Any]) -> dict[str, float]:
    """OpenAI's ``logit_bias``: token ids (decimal integers, as strings) to biases from -100
    to 100. Raises :class:`FieldError` naming ``logit_bias`` (llama.cpp would take a key
    that is not a number as text to tokenize, and quietly ignore an id it does not have)."""
    out: dict[str, float] = {}
    for key, bias in value.items():
        if not (key.isascii() and key.isdigit() and len(key) <= 10) or int(key) > MAX_TOKEN_ID:
            shown = key if len(key) <= 40 else key[:40] + "..."
            raise FieldError(f"Invalid key in 'logit_bias': {shown!r} is not a token id (an integer from 0 to "
                             f"{MAX_TOKEN_ID}, written as a string)", "logit_bias")
        if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not -100 <= bias <= 100:
            raise FieldError(f"Invalid value in 'logit_bias' for token {key}: a bias must be a number from -100 to "
                             "100", "logit_bias")
        out[key] = float(bias)
    return out


class StreamOptions(Lenient):
    include_usage: Off = False


class GenerateBody(Lenient):
    """What chat completions and completions share."""

    model: str = Field(min_length=1)
    stream: Off = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1, le=2**31 - 1)
    max_completion_tokens: int | None = Field(None, ge=1, le=2**31 - 1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    top_k: int | None = Field(None, ge=0, le=2**31 - 1)
    min_p: float | None = Field(None, ge=0, le=1)
    n: int = Field(1, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    seed: Int64 | None = None
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0, le=100)
    logit_bias: dict[str, Any] | None = None
    user: str | None = None

    @field_validator("logit_bias")
    @classmethod
    def _token_biases(cls, value: dict[str, Any] | None) -> dict[str, float] | None:
        return None if value is None else logit_biases(value)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ChatCompletionRequest(GenerateBody):
    messages: list[Message] = Field(min_length=1)
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    functions: Any = None  # OpenAI's deprecated names for tools and tool_choice: refused, not ignored
    function_call: Any = None

    @model_validator(mode="after")
    def _consistent(self) -> "ChatCompletionRequest":
        for legacy, now in (("functions", "tools"), ("function_call", "tool_choice")):
            if getattr(self, legacy) is not None:  # ignored, a forced call came back as text
                raise FieldError(f"{legacy} is not supported (OpenAI deprecated it): send {now} instead", legacy)
        if self.top_logprobs is not None and not self.logprobs:
            raise FieldError("top_logprobs needs logprobs: true", "top_logprobs")
        if self.tool_choice is not None and self.tool_choice != "none" and not self.tools:
            raise FieldError("tool_choice needs tools", "tool_choice")
        if isinstance(self.tool_choice, NamedToolChoice):
            names = {t.function.name for t in self.tools or ()}
            if self.tool_choice.function.name not in names:
                raise FieldError(f"tool_choice names {self.tool_choice.function.name!r}, which is not in tools",
                                  "tool_choice")
        if self.tools and len({t.function.name for t in self.tools}) != len(self.tools):
            raise FieldError("tool names must be unique", "tools")
        return self


class CompletionRequest(GenerateBody):
    prompt: str | list[str]
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1, le=1)

    @field_validator("prompt")
    @classmethod
    def _not_empty(cls, value: str | list[str]) -> str | list[str]:
        # llama.cpp answers "" with an empty completion when its vocabulary adds no BOS
        # (SmolLM2's), and refuses an empty prompt otherwise; OpenAI starts from its own
        # document separator, which no other vocabulary shares (docs/api.md).
        if value == "" or (isinstance(value, list) and len(value) == 1 and value[0] == ""):
            raise FieldError("prompt must not be empty: there is nothing to complete (to generate from the start "
                             "of a document, send the model's own document separator, such as <|endoftext|>)",
                             "prompt")
        return value


class EmbeddingRequest(Lenient):
    model: str = Field(min_length=1)
    input: str | list[str] = Field(min_length=1)
    encoding_format: Annotated[Literal["float", "base64"], _null_as("float")] = "float"
    dimensions: int | None = Field(None, ge=1, le=2**31 - 1)
    user: str | None = None


class FieldError(ValueError):
    """A cross-field rule broken; ``param`` names the field (raised inside validators)."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param
