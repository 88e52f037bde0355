"""The admin API's request bodies: a key's fields and their bounds, times, and parsing a body
into a 400 that names the field (:mod:`.admin`, :mod:`.admin_models`)."""

from __future__ import annotations

import math
from datetime import date, datetime, timezone
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import BadRequest

LIMIT_FIELDS = ("rpm", "tpm", "max_concurrent", "budget", "budget_unit", "period")
MAX_INT = 2**63 - 1
"""The largest ``rpm``, ``tpm`` or ``max_concurrent`` (SQLite's and most clients' integers)."""
MAX_BUDGET = 1e15
MAX_TIME = datetime(9999, 12, 31, 23, 59, 59, tzinfo=timezone.utc).timestamp()
"""The latest ``expires_at``: what a date can still show."""


def parse_time(value: Any, name: str) -> float | None:
    """Unix seconds from a number or an ISO 8601 date or time (naive means UTC)."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise BadRequest(f"{name}: expected Unix seconds or an ISO 8601 date, got {value!r}", param=name)
    if isinstance(value, (int, float)):
        try:
            return _finite(float(value), name)
        except OverflowError:
            raise BadRequest(f"{name}: {value} is out of range", param=name) from None
    text = str(value).strip()
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        return _finite(seconds, name)
    try:
        if len(text) == 10:
            d = date.fromisoformat(text)
            return datetime(d.year, d.month, d.day, tzinfo=timezone.utc).timestamp()
        t = datetime.fromisoformat(text.replace("Z", "+00:00"))
        return (t if t.tzinfo else t.replace(tzinfo=timezone.utc)).timestamp()
    except ValueError:
        raise BadRequest(f"{name}: expected Unix seconds or an ISO 8601 date, got {text!r}", param=name) from None


def _finite(seconds: float, name: str) -> float:
    """``seconds``, unless it is NaN or infinite: as a bound, NaN matched no row and
    ``-inf`` every one, silently."""
    if not math.isfinite(seconds):
        raise BadRequest(f"{name}: expected Unix seconds or an ISO 8601 date, got {seconds!r}", param=name)
    return seconds


def expiry(value: Any, now: float, *, new: bool) -> float | None:
    """``expires_at`` as Unix seconds (None: never), refused unless it can be shown as a date:
    from 1970 to the end of 9999, and after ``now`` for a ``new`` key (one born expired is
    a mistake; an existing key may be set to a past time, which expires it until changed)."""
    when = parse_time(value, "expires_at")
    if when is None:
        return None
    if not math.isfinite(when) or not 0 <= when <= MAX_TIME:
        raise BadRequest(f"expires_at: must be between 1970-01-01 and 9999-12-31 (Unix seconds 0 to "
                         f"{MAX_TIME:.0f}), got {value!r}", param="expires_at")
    if new and when <= now:
        raise BadRequest(f"expires_at: {value!r} is not in the future; a new key would be born expired",
                         param="expires_at")
    return when


def check_name(name: str | None) -> None:
    if name is not None and any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise BadRequest("name: must not contain control characters (NUL, newline, tab...)", param="name")


class KeyFields(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)  # rpm: true is no limit of 1

    name: str | None = Field(None, min_length=1, max_length=200)
    rpm: int | None = Field(None, ge=1, le=MAX_INT)
    tpm: int | None = Field(None, ge=1, le=MAX_INT)
    max_concurrent: int | None = Field(None, ge=1, le=MAX_INT)
    budget: float | None = Field(None, ge=0, le=MAX_BUDGET)
    budget_unit: str | None = Field(None, pattern="^(money|tokens)$")
    period: str | None = Field(None, pattern="^(day|month|total)$")
    models: list[str] | None = None
    expires_at: Any = None  # Unix seconds or ISO 8601: checked by expiry(), which names the field


class KeyCreate(KeyFields):
    portal: str = Field(min_length=1)
    name: str = Field(min_length=1, max_length=200)


def parse_body(model: type[BaseModel], raw: bytes) -> BaseModel:
    try:
        return model.model_validate_json(raw or b"{}")
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        loc = ".".join(str(p) for p in first["loc"]) or "body"
        msg = "unknown field" if first["type"] == "extra_forbidden" else first["msg"]
        raise BadRequest(f"{loc}: {msg}", param=loc) from None
