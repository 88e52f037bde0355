"""Tool calling for models whose chat template knows no tools, through a JSON grammar.

Pure functions, no I/O. A model like SmolLM2 has a ChatML template with no tool syntax,
and llama.cpp then answers a request with ``tools`` as plain text (measured: even under
``tool_choice: required``). For such a model the backend instead:

1. describes the tools in a system message (:func:`prepare`), and shows earlier tool calls
   and their results in the conversation as the JSON the model is asked to write;
2. enforces, with a JSON schema turned into a grammar by the backend, an answer of the form
   ``{"tool_call": {"name": ..., "arguments": {...}}}`` (``required``, or one named
   function), or either that or ``{"response": "..."}`` (``auto``);
3. reads the answer back (:func:`parse`) as OpenAI ``tool_calls`` whose ``arguments`` are
   the JSON the grammar forced to match the tool's ``parameters``, or as plain content.

This is the format llama.cpp itself once called "generic". Its costs: the answer is JSON
until it is complete, so a streamed answer arrives as one piece at the end; logprobs are
not reported (they would be those of the JSON); and ``response_format`` cannot be combined
with tools (both need the one grammar).
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass, replace
from typing import Any

from helexa.protocol import GenerateRequest, OutputFormat, ResponseFormat, ToolChoiceMode, ToolSpec


@dataclass(frozen=True, slots=True)
class Parsed:
    """What a generic answer said: ``content`` text, or ``tool_calls`` (OpenAI's shape)."""

    content: str
    tool_calls: tuple[dict[str, Any], ...] = ()


def offered(request: GenerateRequest) -> tuple[ToolSpec, ...]:
    """The tools the model may call under the request's ``tool_choice``."""
    choice = request.tool_choice
    if not request.wants_tools:
        return ()
    if choice is not None and choice.mode is ToolChoiceMode.FUNCTION:
        return tuple(t for t in request.tools if t.name == choice.name)
    return request.tools


def must_call(request: GenerateRequest) -> bool:
    choice = request.tool_choice
    return choice is not None and choice.mode in (ToolChoiceMode.REQUIRED, ToolChoiceMode.FUNCTION)


def schema(request: GenerateRequest) -> dict[str, Any]:
    """The JSON schema every answer must match (the backend turns it into a grammar).

    Each tool's parameters sit inside it, so their local definitions (``$defs``, or draft
    7's ``definitions``: what pydantic writes for nested models) move to its root, renamed
    per tool, and their ``$ref`` s with them: ``#/$defs/Addr`` of the second tool is
    ``#/$defs/t1_Addr`` here."""
    defs: dict[str, Any] = {}
    calls = [_call_schema(t, f"t{i}_", defs) for i, t in enumerate(offered(request))]
    call = calls[0] if len(calls) == 1 else {"anyOf": calls}
    tool_call = _object({"tool_call": call})
    out = tool_call if must_call(request) else {"anyOf": [tool_call, _object({"response": {"type": "string"}})]}
    return {**out, "$defs": defs} if defs else out


def _object(properties: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": list(properties), "additionalProperties": False}


NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}, "additionalProperties": False}
"""The arguments of a tool defined without ``parameters``: OpenAI's "empty parameter list",
so the call's ``arguments`` are ``{}`` (any object let the model invent some)."""


def _call_schema(tool: ToolSpec, prefix: str, defs: dict[str, Any]) -> dict[str, Any]:
    arguments = tool.parameters if isinstance(tool.parameters, dict) else NO_PARAMETERS
    local = {**(arguments.get("definitions") or {}), **(arguments.get("$defs") or {})}
    # A $ref to another place in the tool's schema (#/properties/a) would point into the
    # answer's schema here: the tool's schema then moves to $defs too, and such refs with it.
    body = f"#/$defs/{prefix}arguments" if _points_into_body(arguments) else None
    if local or body:
        arguments = _rebased({k: v for k, v in arguments.items() if k not in ("$defs", "definitions")}, prefix, body)
        defs.update({prefix + name: _rebased(value, prefix, body) for name, value in local.items()})
    if body:
        defs[prefix + "arguments"], arguments = arguments, {"$ref": body}
    return _object({"name": {"type": "string", "const": tool.name}, "arguments": arguments})


_DEFS_ROOTS = ("#/$defs/", "#/definitions/")


def _points_into_body(node: Any) -> bool:
    """Whether a ``$ref`` in ``node`` is a pointer into it outside its definitions."""
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/") and not ref.startswith(_DEFS_ROOTS):
            return True
        return any(_points_into_body(value) for value in node.values())
    if isinstance(node, list):
        return any(_points_into_body(item) for item in node)
    return False


def _rebased(node: Any, prefix: str, body: str | None = None) -> Any:
    """``node`` with each local ``$ref`` into its definitions renamed as :func:`schema` moves
    them, and (``body``: where the tool's schema moved) each other pointer into the tool's
    schema pointing there."""
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                for root in _DEFS_ROOTS:
                    if value.startswith(root):
                        value = "#/$defs/" + prefix + value[len(root):]
                        break
                else:
                    if body is not None and value.startswith("#/"):
                        value = body + value[1:]
            out[key] = _rebased(value, prefix, body)
        return out
    if isinstance(node, list):
        return [_rebased(item, prefix, body) for item in node]
    return node


def instructions(request: GenerateRequest) -> str:
    """The system text that describes the tools and the answer format."""
    tools = [{"name": t.name, **({"description": t.description} if t.description else {}),
              "parameters": t.parameters if isinstance(t.parameters, dict) else {"type": "object"}}
             for t in offered(request)]
    text = ("You can call these tools:\n" + json.dumps(tools, indent=2, ensure_ascii=False) +
            '\n\nTo call a tool, answer with JSON: {"tool_call": {"name": "<tool name>", "arguments": {...}}}')
    if not must_call(request):
        text += '\nTo answer the user directly, answer with JSON: {"response": "<your answer>"}'
    return text


def prepare(request: GenerateRequest) -> list[dict[str, Any]]:
    """The conversation as the model should see it: the tool instructions joined to the
    system message (or a new one first), earlier tool calls written as the JSON the model
    writes, and tool results as plain messages."""
    messages = [_plain(dict(m)) for m in request.messages]
    note = instructions(request)
    if messages and messages[0].get("role") in ("system", "developer"):
        first = messages[0]
        messages[0] = {**first, "role": "system", "content": f"{_text(first.get('content'))}\n\n{note}".lstrip()}
    else:
        messages.insert(0, {"role": "system", "content": note})
    return messages


def plain_request(request: GenerateRequest) -> GenerateRequest:
    """``request`` as an engine with no tool syntax of its own gets it: the tools described
    in its messages (:func:`prepare`), the answer held to :func:`schema`, no tools and no
    log-probabilities (what the grammar samples is JSON, not the answer's tokens)."""
    return replace(request, messages=tuple(prepare(request)), tools=(), tool_choice=None,
                   response_format=ResponseFormat(OutputFormat.JSON_SCHEMA, schema(request), "tool_call"),
                   sampling=replace(request.sampling, logprobs=False, top_logprobs=0))


def _plain(message: dict[str, Any]) -> dict[str, Any]:
    calls = message.get("tool_calls")
    if message.get("role") == "assistant" and calls:
        shown = []
        for call in calls:
            fn = call.get("function") or {}
            try:
                args = json.loads(fn.get("arguments") or "{}")
            except ValueError:
                args = fn.get("arguments")
            shown.append(json.dumps({"tool_call": {"name": fn.get("name"), "arguments": args}}, ensure_ascii=False))
        return {"role": "assistant", "content": "\n".join(shown)}
    if message.get("role") == "tool":
        return {"role": "tool", "content": _text(message.get("content"))}
    return message


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def parse(text: str) -> Parsed:
    """Read a generic answer. An answer cut short (by ``max_tokens`` or a stop sequence) is
    not the whole JSON: its raw JSON never becomes content. What a cut ``{"response": "...``
    had said so far is its content (as a plain answer cut short keeps its text); a cut tool
    call is no content at all (the finish reason says it was cut)."""
    try:
        answer = json.loads(text)
    except ValueError:
        return Parsed(_cut_response(text))
    if isinstance(answer, dict) and isinstance(answer.get("tool_call"), dict):
        call = answer["tool_call"]
        arguments = call.get("arguments", {})
        return Parsed("", ({"id": "call_" + secrets.token_hex(12), "type": "function",
                            "function": {"name": str(call.get("name", "")),
                                         "arguments": json.dumps(arguments, ensure_ascii=False)}},))
    if isinstance(answer, dict) and isinstance(answer.get("response"), str):
        return Parsed(answer["response"])
    return Parsed("")


def stopped(content: str, stops: tuple[str, ...]) -> tuple[str, str | None]:
    """``content`` up to the first of ``stops`` in it, and that stop sequence (the one that
    starts first; of two starting together, the one listed first); ``(content, None)`` when
    none occurs. A generic answer's stop sequences apply here, to its text, never to the
    grammar's JSON, where they would cut a tool call's arguments."""
    first: tuple[int, str] | None = None
    for stop in stops:
        at = content.find(stop) if stop else -1
        if at >= 0 and (first is None or at < first[0]):
            first = (at, stop)
    return (content, None) if first is None else (content[:first[0]], first[1])


_CUT_RESPONSE = re.compile(r'\s*\{\s*"response"\s*:\s*"')


def _cut_response(text: str) -> str:
    """The text of a ``{"response": "...`` cut short: its string as far as it decodes (a
    half-written escape at the end is dropped); "" for anything else."""
    start = _CUT_RESPONSE.match(text)
    if start is None:
        return ""
    rest = text[start.end():]
    for cut in range(min(len(rest), 7) + 1):  # the longest escape, \uXXXX, is 6 characters; and its quote
        try:
            return json.loads('"' + rest[:len(rest) - cut] + '"')
        except ValueError:
            continue
    return ""
