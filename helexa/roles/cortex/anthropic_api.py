"""Anthropic's Messages API at the HTTP edge: requests in, the fabric's request out, answers back.

Request bodies are typed in :mod:`.anthropic_requests`; :func:`to_generate_request` turns
one into the fabric's :class:`~helexa.protocol.GenerateRequest` with OpenAI-shaped
``messages`` (the fabric's own chat shape):

* ``system`` (a string, or text blocks joined by newlines) becomes the first ``system``
  message;
* a turn's text blocks are joined by newlines (as the edge's token counter and llama.cpp
  join OpenAI text parts); image blocks become ``image_url`` parts (a base64 source as a
  ``data:`` URL), refused by the metered path for a model that cannot see;
* an assistant turn's ``tool_use`` blocks become ``tool_calls`` (``input`` as the JSON
  ``arguments``), a user turn's ``tool_result`` blocks become ``tool`` messages, in
  order, before the turn's other content (``is_error`` results are prefixed ``Error:``);
* ``tools`` become :class:`~helexa.protocol.ToolSpec` (``input_schema`` as the
  parameters) and ``tool_choice`` ``auto`` / ``any`` / ``tool`` / ``none`` the fabric's
  ``auto`` / ``required`` / ``function`` / ``none``: the same path (and, for a model whose
  template has no tool syntax, the same JSON grammar) as Chat Completions' tools.

Answers: :func:`message_body` is a non-streamed ``message``; :class:`MessageStream`
(in :mod:`.anthropic_stream`) frames a streamed one. A tool call becomes a ``tool_use``
block whose ``input`` is the complete JSON object the model wrote; arguments that are not
a JSON object fail the request (502 ``api_error``) rather than reach an agent as ``{}``.

Errors: :func:`error_shape` renders the gateway's error tree (:mod:`.errors`) in
Anthropic's shape, ``{"type": "error", "error": {"type", "message"}}``::

    400 invalid_request_error   BadRequest (the message names the field)   x-should-retry: false
    401 authentication_error    Unauthorized                               x-should-retry: false
    403 permission_error        Forbidden                                  x-should-retry: false
    404 not_found_error         NotFound, ModelNotFound                    x-should-retry: false
    405 invalid_request_error   MethodNotAllowed                           x-should-retry: false
    408 invalid_request_error   RequestTimeout (the body came too slowly; the connection closes)
    413 request_too_large       PayloadTooLarge                            x-should-retry: false
    429 rate_limit_error        RateLimited (+ retry-after; x-should-retry: false when retrying cannot help)
    429 rate_limit_error        InsufficientQuota (a budget is spent)     x-should-retry: false
    500 api_error               UpstreamError, an internal error
    504 timeout_error           UpstreamTimeout
    529 overloaded_error        NoCapacity (+ retry-after)
"""

from __future__ import annotations

import json
import secrets
from typing import Any

from helexa.protocol import (GenerateRequest, GenerateResult, OutputFormat, ResponseFormat, SamplingParams, Task,
                             ToolChoice, ToolChoiceMode, ToolSpec, Usage)

from .anthropic_requests import (
    AnyChoice,
    AutoChoice,
    CountTokensRequest,
    DocumentBlock,
    ImageBlock,
    MessagesRequest,
    NamedChoice,
    NoneChoice,
    TextBlock,
    ToolResultBlock,
    ToolUseBlock,
    UrlSource,
    Base64Source,
    UserTurn,
)
from .errors import (
    BadRequest,
    Forbidden,
    NO_RETRY,
    GatewayError,
    MethodNotAllowed,
    NoCapacity,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    RequestTimeout,
    Unauthorized,
    UpstreamError,
    UpstreamTimeout,
    to_gateway_error,
)
from .openai_answers import merge_tool_calls
from .schema_check import check_schema

__all__ = ["to_generate_request", "to_messages", "to_tools", "image_location", "message_body", "stop_reason",
           "stop_sequence",
           "tool_use_blocks", "usage_body", "error_shape", "error_body", "ThreadUnsupported"]

STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use", "function_call": "tool_use",
                "content_filter": "refusal"}
"""The fabric's (OpenAI's) finish reasons as Anthropic's stop reasons; anything else ends the turn."""


# --- requests ------------------------------------------------------------------------------


def _joined(blocks: list[Any]) -> str:
    return "\n".join(b.text for b in blocks if isinstance(b, TextBlock))


def _user(turn: UserTurn, i: int) -> list[dict[str, Any]]:
    if isinstance(turn.content, str):
        return [{"role": "user", "content": turn.content}]
    out: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    for j, block in enumerate(turn.content):
        match block:
            case ToolResultBlock():
                content = block.content
                if isinstance(content, list):
                    if any(isinstance(p, ImageBlock) for p in content):
                        raise BadRequest("images inside a tool_result are not supported",
                                         param=f"messages[{i}].content[{j}].content", code="unsupported")
                    content = _joined(content)
                out.append({"role": "tool", "tool_call_id": block.tool_use_id,
                            "content": f"Error: {content}" if block.is_error else content})
            case TextBlock():
                parts.append({"type": "text", "text": block.text})
            case ImageBlock():
                parts.append({"type": "image_url", "image_url": {"url": _image_url(block, f"messages[{i}].content[{j}]")}})
            case DocumentBlock():
                raise BadRequest("document blocks are not supported: no backend here reads documents",
                                 param=f"messages[{i}].content[{j}]", code="unsupported")
    if parts:
        if all(p["type"] == "text" for p in parts):
            out.append({"role": "user", "content": "\n".join(p["text"] for p in parts)})
        else:
            out.append({"role": "user", "content": parts})
    return out


def _image_url(block: ImageBlock, where: str) -> str:
    source = block.source
    if isinstance(source, Base64Source):
        return f"data:{source.media_type};base64,{source.data}"
    if isinstance(source, UrlSource):
        return source.url
    raise BadRequest("file sources are not supported: this gateway keeps no files", param=f"{where}.source",
                     code="unsupported")


def _assistant(content: Any) -> dict[str, Any]:
    if isinstance(content, str):
        return {"role": "assistant", "content": content}
    calls = [{"id": b.id, "type": "function", "function": {"name": b.name,
                                                           "arguments": json.dumps(b.input, ensure_ascii=False)}}
             for b in content if isinstance(b, ToolUseBlock)]
    message: dict[str, Any] = {"role": "assistant", "content": _joined(content) or (None if calls else "")}
    if calls:
        message["tool_calls"] = calls
    return message


def to_messages(body: CountTokensRequest) -> list[dict[str, Any]]:
    """The conversation as the fabric's (OpenAI-shaped) chat messages (module docstring).
    Raises :class:`BadRequest` for blocks no backend here takes (documents, files,
    images inside tool results)."""
    messages: list[dict[str, Any]] = []
    system = body.system if isinstance(body.system, str) else _joined(body.system or [])
    if system:
        messages.append({"role": "system", "content": system})
    for i, turn in enumerate(body.messages):
        messages.extend(_user(turn, i) if isinstance(turn, UserTurn) else [_assistant(turn.content)])
    return messages


def to_tools(body: CountTokensRequest) -> tuple[tuple[ToolSpec, ...], ToolChoice | None, bool | None]:
    """``(tools, tool_choice, parallel tool calls)`` in the fabric's terms."""
    for i, t in enumerate(body.tools or ()):
        check_schema(t.input_schema, f"tools.{i}.input_schema")
    tools = tuple(ToolSpec(t.name, t.description, t.input_schema) for t in body.tools or ())
    choice = body.tool_choice
    match choice:
        case None:
            return tools, None, None
        case AutoChoice():
            mode = ToolChoice(ToolChoiceMode.AUTO)
        case AnyChoice():
            mode = ToolChoice(ToolChoiceMode.REQUIRED)
        case NamedChoice():
            mode = ToolChoice(ToolChoiceMode.FUNCTION, choice.name)
        case NoneChoice():
            return tools, ToolChoice(ToolChoiceMode.NONE), None
    disable = choice.disable_parallel_tool_use
    return tools, mode, (not disable) if disable is not None else None


def to_generate_request(body: MessagesRequest, request_id: str) -> GenerateRequest:
    """The fabric request for a validated Messages body (a chat under the model name asked).
    Raises :class:`BadRequest` for what the types alone could not rule out."""
    sampling = SamplingParams(max_tokens=body.max_tokens, temperature=body.temperature, top_p=body.top_p,
                              top_k=body.top_k, stop=tuple(body.stop_sequences or ()))
    tools, choice, parallel = to_tools(body)
    extra: dict[str, Any] = {} if parallel is None else {"parallel_tool_calls": parallel}
    return GenerateRequest(request_id, body.model, Task.CHAT, messages=tuple(to_messages(body)), sampling=sampling,
                           stream=body.stream, extra=extra, tools=tools, tool_choice=choice,
                           response_format=to_response_format(body))


def to_response_format(body: MessagesRequest) -> ResponseFormat | None:
    """Structured output (``output_config.format``, or the beta's ``output_format``) as the
    fabric's ``json_schema`` response format (a grammar on llama.cpp), its schema checked
    at the edge as every surface checks one."""
    fmt, param = body.output_format, "output_format"
    if body.output_config is not None and body.output_config.format is not None:
        fmt, param = body.output_config.format, FORMAT_PARAM
    if fmt is None:
        return None
    check_schema(fmt.schema_, f"{param}.schema")
    return ResponseFormat(OutputFormat.JSON_SCHEMA, fmt.schema_, None, True)


FORMAT_PARAM = "output_config.format"
PARAMS = {"response_format": FORMAT_PARAM}
"""The shared path's field names (Chat Completions') as this API names them, for errors."""


def image_location(body: CountTokensRequest) -> str | None:
    """Where the first image block is (``messages[0].content[1]``), if any."""
    for i, turn in enumerate(body.messages):
        if isinstance(turn, UserTurn) and isinstance(turn.content, list):
            for j, block in enumerate(turn.content):
                if isinstance(block, ImageBlock):
                    return f"messages[{i}].content[{j}]"
    return None


# --- answers -------------------------------------------------------------------------------


def stop_reason(result: GenerateResult, has_tool_use: bool) -> str:
    """Anthropic's ``stop_reason`` for a finished generation: ``stop_sequence`` when the
    backend named the stop sequence that ended it (:func:`stop_sequence`), ``end_turn``
    for any other stop."""
    if has_tool_use:
        return "tool_use"
    if result.stop_sequence is not None and result.finish_reason == "stop":
        return "stop_sequence"
    return STOP_REASONS.get(result.finish_reason, "end_turn")


def stop_sequence(result: GenerateResult, has_tool_use: bool) -> str | None:
    """Anthropic's ``stop_sequence``: the one of the request's ``stop_sequences`` that
    ended the answer, when :func:`stop_reason` says ``stop_sequence``; else ``None``."""
    return result.stop_sequence if stop_reason(result, has_tool_use) == "stop_sequence" else None


def tool_use_blocks(parts: list[Any]) -> list[dict[str, Any]]:
    """The ``tool_use`` blocks for the tool calls a generation relayed (whole calls or
    OpenAI deltas, merged). Raises :class:`UpstreamError` when a call's arguments are not
    a complete JSON object: an agent must never see a partial or empty ``input``."""
    blocks = []
    for call in merge_tool_calls(parts):
        fn = call.get("function") or {}
        raw = fn.get("arguments") or "{}"
        try:
            arguments = json.loads(raw) if isinstance(raw, str) else raw
        except ValueError:
            arguments = None
        if not isinstance(arguments, dict):
            raise UpstreamError(f"the model's call of tool {fn.get('name')!r} has arguments that are not a JSON "
                                "object", code="bad_tool_call")
        blocks.append({"type": "tool_use", "id": call.get("id") or "toolu_" + secrets.token_hex(12),
                       "name": fn.get("name") or "", "input": arguments})
    return blocks


def usage_body(usage: Usage) -> dict[str, int]:
    """Anthropic's usage for the billed usage: ``input_tokens`` excludes the prompt tokens
    read from cache, which are ``cache_read_input_tokens`` (their sum is the prompt)."""
    return {"input_tokens": usage.prompt_tokens - usage.cached_tokens, "output_tokens": usage.completion_tokens,
            "cache_creation_input_tokens": 0, "cache_read_input_tokens": usage.cached_tokens}


def message_body(message_id: str, model: str, text: str, tool_calls: list[Any], result: GenerateResult
                 ) -> dict[str, Any]:
    """A non-streamed ``message``: a text block (when there is text, or nothing else), then
    a ``tool_use`` block per call; the usage billed."""
    tools = tool_use_blocks(tool_calls)
    content: list[dict[str, Any]] = [{"type": "text", "text": text}] if text or not tools else []
    return {"id": message_id, "type": "message", "role": "assistant", "model": model, "content": content + tools,
            "stop_reason": stop_reason(result, bool(tools)), "stop_sequence": stop_sequence(result, bool(tools)),
            "usage": usage_body(result.usage)}


# --- errors --------------------------------------------------------------------------------

def _kind(error: GatewayError) -> tuple[int, str, bool]:
    """``(status, Anthropic error type, retrying can help)``."""
    match error:
        case Unauthorized():
            return 401, "authentication_error", False
        case Forbidden():
            return 403, "permission_error", False
        case NotFound():
            return 404, "not_found_error", False
        case PayloadTooLarge():
            return 413, "request_too_large", False
        case RequestTimeout():
            return 408, "invalid_request_error", True
        case MethodNotAllowed():
            return 405, "invalid_request_error", False
        case BadRequest():
            return 400, "invalid_request_error", False
        case RateLimited():  # InsufficientQuota too: its headers say whether to retry
            return 429, "rate_limit_error", True
        case NoCapacity():
            return 529, "overloaded_error", True
        case UpstreamTimeout():
            return 504, "timeout_error", True
    return 500, "api_error", True


class ThreadUnsupported(BadRequest):
    """A request with ``thread``: Anthropic's Threads keep a conversation on the server
    between requests, which helexa does not. Ignored, a ``continue`` turn reached the model
    with only its new messages (the SDK's tool runner threads by default, and its second
    turn was a lone tool result); refused, the SDK's own recovery sends the whole
    conversation again without ``thread`` (``error.details.error_code``
    ``thread_unsupported_request``)."""

    def __init__(self) -> None:
        super().__init__("this server keeps no conversation between requests (Threads are not supported): send the "
                         "whole conversation without thread", param="thread")


def error_body(error: GatewayError) -> dict[str, Any]:
    """``{"type": "error", "error": {...}}``; the message names the field when one is at fault."""
    message = error.message
    param = PARAMS.get(error.param or "", error.param)
    if param and param not in message:
        message = f"{param}: {message}"
    body: dict[str, Any] = {"type": _kind(error)[1], "message": message}
    if isinstance(error, ThreadUnsupported):
        body["details"] = {"error_code": "thread_unsupported_request"}
    return {"type": "error", "error": body}


def error_shape(exc: BaseException) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """``(status, headers, body)`` of the error response for ``exc``, in Anthropic's shape
    (the table in the module docstring); a :data:`~.asgi.ErrorShape`."""
    error = to_gateway_error(exc)
    status, _, retry = _kind(error)
    headers = [(b"content-type", b"application/json"), *error.headers()]
    if not retry:
        headers.append(NO_RETRY)
    return status, headers, json.dumps(error_body(error)).encode()
