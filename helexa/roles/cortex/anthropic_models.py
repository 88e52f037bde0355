"""Anthropic's shape of ``GET /v1/models`` and ``GET /v1/models/{id}``, sans-IO.

The two routes are shared with OpenAI's API (:mod:`.openai_surface`), which lists the same
models; a request in Anthropic's dialect (it carries ``anthropic-version`` or
``x-api-key``, as the ``anthropic`` SDK's requests do, and OpenAI's never do) is answered
in Anthropic's shape, and its errors in Anthropic's error shape::

    {"data": [{"type": "model", "id", "display_name", "created_at", "lifecycle": "active"}, ...],
     "has_more", "first_id", "last_id"}

Paging follows Anthropic's cursors over the portal's listing order: ``limit`` (1-1000,
default 20), ``after_id`` (the page after that model), ``before_id`` (the page that ends
just before it). A cursor naming a model not listed, or a ``limit`` out of range, is a 400
naming the parameter.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from .errors import BadRequest

DEFAULT_LIMIT, MAX_LIMIT = 20, 1000


def speaks_anthropic(headers: Sequence[tuple[bytes, bytes]]) -> bool:
    """The request is in Anthropic's dialect (``anthropic-version`` or ``x-api-key``)."""
    return any(name in (b"anthropic-version", b"x-api-key") for name, _ in headers)


def model_object(entry: Mapping[str, Any]) -> dict[str, Any]:
    """One model of the portal's listing (OpenAI-shaped, with ``created`` in Unix seconds)
    as Anthropic's ``ModelInfo``."""
    created = datetime.fromtimestamp(int(entry.get("created") or 0), UTC)
    return {"type": "model", "id": entry["id"], "display_name": entry["id"],
            "created_at": created.isoformat().replace("+00:00", "Z"), "lifecycle": "active"}


def model_page(entries: Sequence[Mapping[str, Any]], query: Mapping[str, str]) -> dict[str, Any]:
    """The page of ``entries`` that ``query`` (``limit``, ``after_id``, ``before_id``) asks
    for. Raises :class:`BadRequest` naming the parameter at fault."""
    raw = query.get("limit", str(DEFAULT_LIMIT))
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_LIMIT:
        raise BadRequest(f"must be an integer from 1 to {MAX_LIMIT}", param="limit")
    limit = int(raw)
    ids = [e["id"] for e in entries]
    after, before = query.get("after_id"), query.get("before_id")
    if after is not None and before is not None:
        raise BadRequest("give after_id or before_id, not both", param="before_id")
    if before is not None:
        if before not in ids:
            raise BadRequest(f"no model {before!r} in this listing", param="before_id")
        end = ids.index(before)
        start = max(0, end - limit)
        page, has_more = entries[start:end], start > 0
    else:
        start = 0
        if after is not None:
            if after not in ids:
                raise BadRequest(f"no model {after!r} in this listing", param="after_id")
            start = ids.index(after) + 1
        page, has_more = entries[start:start + limit], start + limit < len(entries)
    data = [model_object(e) for e in page]
    return {"data": data, "has_more": has_more, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None}
