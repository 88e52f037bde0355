"""A stored response's input items (``GET /v1/responses/{id}/input_items``), sans-IO.

:func:`input_items` turns a request's ``input`` into the items OpenAI lists, each with an
``id`` (the client's, or a new one) and ``status: "completed"``: a string input is one
``user`` message of ``input_text``; message items keep their role, with ``input_text``
parts (``output_text`` ones, with ``annotations``, for the assistant's); function calls
and their outputs keep their fields. They are this response's own input, not those of
the responses it continues. :func:`item_page` pages them as OpenAI's cursor list.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from typing import Any

from .errors import BadRequest
from .responses_api import FunctionCallItem, FunctionCallOutputItem, MessageItem, ResponsesRequest

DEFAULT_LIMIT, MAX_LIMIT = 20, 100


def _id(prefix: str, given: str | None) -> str:
    return given or f"{prefix}_{secrets.token_hex(16)}"


def _parts(content: str | list[Any], assistant: bool) -> list[dict[str, Any]]:
    if isinstance(content, str):
        content_parts: list[dict[str, Any]] = [{"type": "output_text" if assistant else "input_text", "text": content}]
    else:
        content_parts = [p.model_dump(exclude_none=True) for p in content]
    if assistant:
        for part in content_parts:
            if part["type"] == "output_text":
                part.setdefault("annotations", [])
    return content_parts


def input_items(body: ResponsesRequest) -> list[dict[str, Any]]:
    """The request's ``input`` as listed items, in order (see the module docstring)."""
    if body.input is None:
        return []
    if isinstance(body.input, str):
        return [{"id": _id("msg", None), "type": "message", "role": "user", "status": "completed",
                 "content": _parts(body.input, False)}]
    out: list[dict[str, Any]] = []
    for item in body.input:
        match item:
            case MessageItem():
                out.append({"id": _id("msg", item.id), "type": "message", "role": item.role, "status": "completed",
                            "content": _parts(item.content, item.role == "assistant")})
            case FunctionCallItem():
                out.append({"id": _id("fc", item.id), "type": "function_call", "call_id": item.call_id,
                            "name": item.name, "arguments": item.arguments, "status": "completed"})
            case FunctionCallOutputItem():
                output = item.output if isinstance(item.output, str) else [
                    p.model_dump(exclude_none=True) for p in item.output]
                out.append({"id": _id("fco", item.id), "type": "function_call_output", "call_id": item.call_id,
                            "output": output, "status": "completed"})
    return out


def item_page(items: Sequence[Mapping[str, Any]], query: Mapping[str, str]) -> dict[str, Any]:
    """The page of ``items`` that ``query`` asks for: ``order`` (``desc``, the default, or
    ``asc``), ``after`` (an item id: the items after it in that order), ``limit`` (1-100,
    default 20). ``include`` is accepted. Raises :class:`BadRequest` naming the parameter."""
    order = query.get("order", "desc")
    if order not in ("asc", "desc"):
        raise BadRequest("must be 'asc' or 'desc'", param="order")
    raw = query.get("limit", str(DEFAULT_LIMIT))
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_LIMIT:
        raise BadRequest(f"must be an integer from 1 to {MAX_LIMIT}", param="limit")
    limit = int(raw)
    ordered = list(items) if order == "asc" else list(reversed(items))
    start = 0
    after = query.get("after")
    if after is not None:
        ids = [i["id"] for i in ordered]
        if after not in ids:
            raise BadRequest(f"no item {after!r} in this response's input", param="after")
        start = ids.index(after) + 1
    page = ordered[start:start + limit]
    return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None, "has_more": start + limit < len(ordered)}
