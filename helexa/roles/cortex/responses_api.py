"""OpenAI's Responses API (``POST /v1/responses``): its request body as typed models, and
the one translation of a validated body into the fabric's :class:`GenerateRequest`.

The request is lenient to unknown fields (kept, logged once) and strict about the ones it
knows, like the Chat Completions models (:mod:`.openai_requests`, whose parts it shares):
a malformed body is a 400 naming the field (``input[2].call_id``) before a neuron sees it.
What helexa cannot do is refused the same way, with ``code: "unsupported"``: built-in
tools (``web_search``, ``file_search``, ...), ``background``, ``conversation``, prompt
templates, ``item_reference`` items, file inputs.

The conversation becomes chat messages: ``instructions`` a system message first (never
inherited from a previous response, as OpenAI does), then the stored history of
``previous_response_id``, then ``input``: message items by role (``developer`` as
``system``), ``function_call`` items as an assistant message's ``tool_calls`` (consecutive
calls share one message), ``function_call_output`` items as ``tool`` messages.
``text.format`` maps onto the same ``response_format`` Chat Completions uses, so the
backend's grammar enforces it. The answer is built and streamed by
:mod:`.responses_stream`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, Tag, field_validator, model_validator

from helexa.protocol import GenerateRequest, OutputFormat, ResponseFormat, SamplingParams, Task, ToolChoice, \
    ToolChoiceMode, ToolSpec

from .errors import BadRequest
from .openai_requests import FieldError, JsonObjectFormat, Lenient, Name, Off, TextFormat, _tagged, _wire_json
from .schema_check import check_schema

MAX_METADATA = 16
LOGPROBS_INCLUDE = "message.output_text.logprobs"


# --- input items --------------------------------------------------------------------------


class InputText(Lenient):
    type: Literal["input_text"]
    text: str


class OutputText(Lenient):
    type: Literal["output_text"]
    text: str


class Refusal(Lenient):
    type: Literal["refusal"]
    refusal: str


class InputImage(Lenient):
    type: Literal["input_image"]
    image_url: str | None = None
    file_id: str | None = None
    detail: Literal["auto", "low", "high", "original"] | None = None


class InputFile(Lenient):
    type: Literal["input_file"]
    file_data: str | None = None
    file_id: str | None = None
    file_url: str | None = None
    filename: str | None = None


ContentPart = _tagged("type", InputText, OutputText, Refusal, InputImage, InputFile)


class MessageItem(Lenient):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[ContentPart]
    id: str | None = None
    status: str | None = None


class FunctionCallItem(Lenient):
    type: Literal["function_call"]
    call_id: str = Field(min_length=1, max_length=256)
    name: Name
    arguments: str
    id: str | None = None
    status: str | None = None


class FunctionCallOutputItem(Lenient):
    type: Literal["function_call_output"]
    call_id: str = Field(min_length=1, max_length=256)
    output: str | list[ContentPart]
    id: str | None = None
    status: str | None = None


class ItemReference(Lenient):
    type: Literal["item_reference"]
    id: str


_ITEMS = {"message": MessageItem, "function_call": FunctionCallItem, "function_call_output": FunctionCallOutputItem,
          "item_reference": ItemReference}


def _item_tag(value: Any) -> str | None:
    # A message item may leave out its type (OpenAI's "easy input message").
    got = value.get("type", "message") if isinstance(value, dict) else getattr(value, "type", None)
    return f"type={got}" if got in _ITEMS else None


InputItem = Annotated[
    Annotated[MessageItem, Tag("type=message")] | Annotated[FunctionCallItem, Tag("type=function_call")]
    | Annotated[FunctionCallOutputItem, Tag("type=function_call_output")]
    | Annotated[ItemReference, Tag("type=item_reference")],
    Discriminator(_item_tag, custom_error_type="invalid_type",
                  custom_error_message=f"type must be one of {', '.join(sorted(_ITEMS))}"),
]


# --- tools, tool_choice, text.format ------------------------------------------------------


class FunctionTool(Lenient):
    type: Literal["function"]
    name: Name
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    @field_validator("parameters")
    @classmethod
    def _travels(cls, value: Any) -> Any:
        return _wire_json(value)


Tool = _tagged("type", FunctionTool)


class FunctionChoice(Lenient):
    type: Literal["function"]
    name: Name


class JsonSchemaTextFormat(Lenient):
    type: Literal["json_schema"]
    name: Name
    schema_: dict[str, Any] = Field(alias="schema")
    description: str | None = None
    strict: bool | None = None

    @field_validator("schema_")
    @classmethod
    def _travels(cls, value: Any) -> Any:
        return _wire_json(value)


TextFormatParam = _tagged("type", TextFormat, JsonObjectFormat, JsonSchemaTextFormat)


class TextConfig(Lenient):
    format: TextFormatParam | None = None
    verbosity: Literal["low", "medium", "high"] | None = None


# --- the body -----------------------------------------------------------------------------


class ResponsesRequest(Lenient):
    model: str = Field(min_length=1)
    input: str | list[InputItem] | None = None
    instructions: str | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | FunctionChoice | None = None
    parallel_tool_calls: bool | None = None
    max_output_tokens: int | None = Field(None, ge=1, le=2**31 - 1)
    max_tool_calls: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    top_logprobs: int | None = Field(None, ge=0, le=20)
    text: TextConfig | None = None
    stream: Off = False
    store: bool | None = None
    previous_response_id: str | None = Field(None, min_length=1, max_length=256)
    metadata: dict[str, Annotated[str, Field(max_length=512)]] | None = None
    include: list[str] | None = None
    truncation: Literal["auto", "disabled"] | None = None
    user: str | None = None
    background: bool | None = None
    conversation: Any = None
    prompt: Any = None

    @model_validator(mode="after")
    def _consistent(self) -> "ResponsesRequest":
        if self.input is None and self.previous_response_id is None:
            raise FieldError("input is required (or previous_response_id to continue a response)", "input")
        if self.metadata is not None and len(self.metadata) > MAX_METADATA:
            raise FieldError(f"at most {MAX_METADATA} metadata keys", "metadata")
        if self.tool_choice is not None and self.tool_choice != "none" and not self.tools:
            raise FieldError("tool_choice needs tools", "tool_choice")
        names = [t.name for t in self.tools or ()]
        if isinstance(self.tool_choice, FunctionChoice) and self.tool_choice.name not in names:
            raise FieldError(f"tool_choice names {self.tool_choice.name!r}, which is not in tools", "tool_choice")
        if len(set(names)) != len(names):
            raise FieldError("tool names must be unique", "tools")
        return self

    @property
    def stored(self) -> bool:
        return self.store is not False

    @property
    def logprobs(self) -> bool:
        return bool(self.top_logprobs) or LOGPROBS_INCLUDE in (self.include or ())


def refuse_unsupported(body: ResponsesRequest) -> None:
    """Raise :class:`BadRequest` (``unsupported``) for what the types allow but helexa does not do."""
    for name in ("background", "conversation", "prompt"):
        if getattr(body, name):
            raise BadRequest(f"{name} is not supported here", param=name, code="unsupported")


# --- the conversation ---------------------------------------------------------------------


def _text(content: str | list[Any], where: str) -> str:
    if isinstance(content, str):
        return content
    out = []
    for j, part in enumerate(content):
        if isinstance(part, (InputText, OutputText)):
            out.append(part.text)
        elif isinstance(part, Refusal):
            out.append(part.refusal)
        else:
            raise BadRequest(f"{part.type} is not supported in this item", param=f"{where}.content[{j}]",
                             code="unsupported")
    return "\n".join(out)


def _user_content(content: str | list[Any], where: str) -> tuple[Any, str | None]:
    """A user message's chat content, and where its first image is (None: no image)."""
    if isinstance(content, str):
        return content, None
    parts: list[dict[str, Any]] = []
    image = None
    for j, part in enumerate(content):
        here = f"{where}.content[{j}]"
        match part:
            case InputText() | OutputText():
                parts.append({"type": "text", "text": part.text})
            case InputImage():
                if not part.image_url:
                    raise BadRequest("an input_image needs image_url (file ids are not supported here)",
                                     param=here, code="unsupported")
                image = image or here
                url: dict[str, Any] = {"url": part.image_url}
                if part.detail in ("auto", "low", "high"):
                    url["detail"] = part.detail
                parts.append({"type": "image_url", "image_url": url})
            case _:
                raise BadRequest(f"{part.type} content is not supported: no backend here takes it", param=here,
                                 code="unsupported")
    return parts, image


def input_messages(body: ResponsesRequest) -> tuple[list[dict[str, Any]], str | None]:
    """``input`` as chat messages (OpenAI's shape), and where its first image is."""
    if body.input is None:
        return [], None
    if isinstance(body.input, str):
        return [{"role": "user", "content": body.input}], None
    out: list[dict[str, Any]] = []
    image: str | None = None
    for i, item in enumerate(body.input):
        where = f"input[{i}]"
        match item:
            case MessageItem(role="user"):
                content, seen = _user_content(item.content, where)
                image = image or seen
                out.append({"role": "user", "content": content})
            case MessageItem(role="assistant"):
                out.append({"role": "assistant", "content": _text(item.content, where)})
            case MessageItem():
                out.append({"role": "system", "content": _text(item.content, where)})
            case FunctionCallItem():
                call = {"id": item.call_id, "type": "function",
                        "function": {"name": item.name, "arguments": item.arguments}}
                last = out[-1] if out else None
                if last is not None and last["role"] == "assistant" and "tool_calls" in last:
                    last["tool_calls"].append(call)
                else:
                    out.append({"role": "assistant", "tool_calls": [call]})
            case FunctionCallOutputItem():
                out.append({"role": "tool", "tool_call_id": item.call_id, "content": _text(item.output, where)})
            case ItemReference():
                raise BadRequest("item_reference is not supported: send the item itself, or previous_response_id",
                                 param=where, code="unsupported")
    return out, image


def output_messages(output: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A response's ``output`` items as the chat messages a continuation sees."""
    out: list[dict[str, Any]] = []
    for item in output:
        if item["type"] == "message":
            text = "".join(p.get("text") or p.get("refusal") or "" for p in item["content"])
            out.append({"role": "assistant", "content": text})
        elif item["type"] == "function_call":
            call = {"id": item["call_id"], "type": "function",
                    "function": {"name": item["name"], "arguments": item["arguments"]}}
            last = out[-1] if out else None
            if last is not None and last["role"] == "assistant" and "tool_calls" in last:
                last["tool_calls"].append(call)
            else:
                out.append({"role": "assistant", "tool_calls": [call]})
    return out


def _tool_choice(choice: Any) -> ToolChoice | None:
    if choice is None:
        return None
    if isinstance(choice, FunctionChoice):
        return ToolChoice(ToolChoiceMode.FUNCTION, choice.name)
    return ToolChoice(ToolChoiceMode(choice))


def _tools(body: ResponsesRequest) -> tuple[ToolSpec, ...]:
    for i, t in enumerate(body.tools or ()):
        if t.parameters is not None:
            check_schema(t.parameters, f"tools[{i}].parameters")
    return tuple(ToolSpec(t.name, t.description, t.parameters, bool(t.strict)) for t in body.tools or ())


def _response_format(text: TextConfig | None) -> ResponseFormat | None:
    fmt = text.format if text is not None else None
    if fmt is None or isinstance(fmt, TextFormat):
        return None
    if isinstance(fmt, JsonSchemaTextFormat):
        check_schema(fmt.schema_, "text.format.schema")
        return ResponseFormat(OutputFormat.JSON_SCHEMA, fmt.schema_, fmt.name, bool(fmt.strict))
    return ResponseFormat(OutputFormat.JSON_OBJECT)


def to_generate_request(body: ResponsesRequest, request_id: str, history: list[dict[str, Any]]
                        ) -> tuple[GenerateRequest, list[dict[str, Any]], str | None]:
    """The fabric request for a validated body continuing ``history`` (a previous
    response's conversation; empty for a new one).

    Returns ``(request, conversation, image)``: ``conversation`` is ``history`` plus this
    input (without ``instructions``), what a stored response keeps; ``image`` where the
    first image part is (for the model's vision check), or None.

    Raises :class:`BadRequest` for what the types alone could not rule out.
    """
    refuse_unsupported(body)
    new, image = input_messages(body)
    conversation = [*history, *new]
    if not conversation:
        raise BadRequest("input must not be empty", param="input")
    messages = ([{"role": "system", "content": body.instructions}] if body.instructions else []) + conversation
    try:
        sampling = SamplingParams(max_tokens=body.max_output_tokens, temperature=body.temperature, top_p=body.top_p,
                                  logprobs=body.logprobs, top_logprobs=body.top_logprobs or 0)
    except ValueError as exc:
        raise BadRequest(str(exc)) from None
    extra: dict[str, Any] = {}
    if body.parallel_tool_calls is not None:
        extra["parallel_tool_calls"] = body.parallel_tool_calls
    request = GenerateRequest(
        request_id, body.model, Task.CHAT, messages=tuple(messages), sampling=sampling, stream=body.stream,
        extra=extra, tools=_tools(body),
        tool_choice=_tool_choice(body.tool_choice), response_format=_response_format(body.text))
    return request, conversation, image


PARAMS = {"max_tokens": "max_output_tokens", "messages": "input", "response_format": "text.format",
          "logprobs": "top_logprobs"}
"""The shared path's field names (Chat Completions') as this API names them, for errors."""
