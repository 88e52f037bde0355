"""Anthropic's Messages request bodies as typed models: what a client may send, checked at the edge.

``POST /v1/messages`` and ``POST /v1/messages/count_tokens`` bodies: ``system`` (a string
or text blocks), ``messages`` of ``user`` / ``assistant`` turns whose ``content`` is a
string or content blocks by ``type`` (``text``, ``image``, ``tool_use``, ``tool_result``,
``thinking`` / ``redacted_thinking``), ``tools``, ``tool_choice``, sampling. As with
OpenAI's models (:mod:`.openai_requests`, whose :class:`~.openai_requests.Lenient` base
these share), unknown extra fields are kept and logged once, never forwarded; the fields
known here are typed strictly, so that a malformed body is a 400 naming the field before
it costs a neuron anything. A tool's ``input_schema`` and a ``tool_use``'s ``input`` must
be able to travel on the control plane (:func:`~.openai_requests.check_wire_json`).

Turning a validated body into the fabric's request is :mod:`.anthropic_api`'s job.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from .openai_requests import FieldError, Lenient, Off, _tagged, _wire_json

ToolName = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_-]+$")]
"""A tool's name, as Anthropic constrains it."""


# --- content blocks -----------------------------------------------------------------------


class TextBlock(Lenient):
    type: Literal["text"]
    text: str


class Base64Source(Lenient):
    type: Literal["base64"]
    media_type: Literal["image/jpeg", "image/png", "image/gif", "image/webp"]
    data: str = Field(min_length=1)


class UrlSource(Lenient):
    type: Literal["url"]
    url: str = Field(min_length=1)


class FileSource(Lenient):
    type: Literal["file"]
    file_id: str = Field(min_length=1)


ImageSource = _tagged("type", Base64Source, UrlSource, FileSource)


class ImageBlock(Lenient):
    type: Literal["image"]
    source: ImageSource


class DocumentBlock(Lenient):
    """Accepted by the types so that the refusal names the block (no backend reads documents)."""

    type: Literal["document"]


class ToolUseBlock(Lenient):
    type: Literal["tool_use"]
    id: str = Field(min_length=1)
    name: ToolName
    input: dict[str, Any]

    @field_validator("input")
    @classmethod
    def _travels(cls, value: Any) -> Any:
        return _wire_json(value)


ToolResultPart = _tagged("type", TextBlock, ImageBlock)


class ToolResultBlock(Lenient):
    type: Literal["tool_result"]
    tool_use_id: str = Field(min_length=1)
    content: str | list[ToolResultPart] = ""
    is_error: bool | None = None


class ThinkingBlock(Lenient):
    """An earlier turn's reasoning, sent back by a client: dropped (no model here reasons aloud)."""

    type: Literal["thinking", "redacted_thinking"]


UserBlock = _tagged("type", TextBlock, ImageBlock, DocumentBlock, ToolResultBlock)
AssistantBlock = _tagged("type", TextBlock, ToolUseBlock, ThinkingBlock)


class UserTurn(Lenient):
    role: Literal["user"]
    content: str | list[UserBlock]


class AssistantTurn(Lenient):
    role: Literal["assistant"]
    content: str | list[AssistantBlock]


Turn = _tagged("role", UserTurn, AssistantTurn)


# --- tools and tool_choice ----------------------------------------------------------------


class Tool(Lenient):
    """A client tool. Anthropic's server tools (``web_search_20250305``, ``bash_...``) are
    not served here: a ``type`` other than ``custom`` is refused."""

    name: ToolName
    description: str | None = None
    input_schema: dict[str, Any]
    type: Literal["custom"] | None = None

    @field_validator("input_schema")
    @classmethod
    def _travels(cls, value: Any) -> Any:
        return _wire_json(value)


class AutoChoice(Lenient):
    type: Literal["auto"]
    disable_parallel_tool_use: bool | None = None


class AnyChoice(Lenient):
    type: Literal["any"]
    disable_parallel_tool_use: bool | None = None


class NamedChoice(Lenient):
    type: Literal["tool"]
    name: ToolName
    disable_parallel_tool_use: bool | None = None


class NoneChoice(Lenient):
    type: Literal["none"]


ToolChoice = _tagged("type", AutoChoice, AnyChoice, NamedChoice, NoneChoice)


class JsonSchemaFormat(Lenient):
    """Structured output: the answer is JSON valid against ``schema`` (Anthropic's
    ``output_config.format``; the beta's ``output_format``)."""

    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")

    @field_validator("schema_")
    @classmethod
    def _travels(cls, value: Any) -> Any:
        return _wire_json(value)


class OutputConfig(Lenient):
    """``output_config``: its ``format`` is served; other settings (``effort``) are ignored."""

    format: JsonSchemaFormat | None = None


class Thinking(Lenient):
    """Extended thinking: accepted and ignored (no thinking blocks are produced)."""

    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: int | None = Field(None, ge=0)


# --- request bodies -----------------------------------------------------------------------


class CountTokensRequest(Lenient):
    """``POST /v1/messages/count_tokens``: a conversation, without sampling."""

    model: str = Field(min_length=1)
    messages: list[Turn] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    thinking: Thinking | None = None

    @model_validator(mode="after")
    def _consistent(self) -> "CountTokensRequest":
        names = [t.name for t in self.tools or ()]
        if len(set(names)) != len(names):
            raise FieldError("tool names must be unique", "tools")
        if isinstance(self.tool_choice, (AnyChoice, NamedChoice)) and not self.tools:
            raise FieldError("tool_choice needs tools", "tool_choice")
        if isinstance(self.tool_choice, NamedChoice) and self.tool_choice.name not in names:
            raise FieldError(f"tool_choice names {self.tool_choice.name!r}, which is not in tools", "tool_choice.name")
        for i, turn in enumerate(self.messages):
            if isinstance(turn.content, list) and not turn.content:
                raise FieldError("content must not be an empty list", f"messages[{i}].content")
        return self


class MessagesRequest(CountTokensRequest):
    """``POST /v1/messages``. ``max_tokens`` is required, as Anthropic requires it."""

    max_tokens: int = Field(ge=1, le=2**31 - 1)
    stream: Off = False
    temperature: float | None = Field(None, ge=0, le=1)
    top_p: float | None = Field(None, ge=0, le=1)
    top_k: int | None = Field(None, ge=0, le=2**31 - 1)
    stop_sequences: list[Annotated[str, Field(min_length=1)]] | None = Field(None, max_length=16)
    thread: dict[str, Any] | None = None  # a server-held conversation (Threads): refused, see anthropic_api
    output_config: OutputConfig | None = None
    output_format: JsonSchemaFormat | None = None  # the structured-outputs beta's name for output_config.format
    metadata: dict[str, Any] | None = None
    service_tier: str | None = None
