"""Ollama's ``keep_alive``, parsed as Ollama parses it (its ``api.Duration``). Pure.

A number is seconds, truncated to whole seconds (``42.5``: 42 s; ``0.5``: 0); a string is
a Go duration (``"0"``, ``"0s"``, ``"5m"``, ``"1h30m"``, ``"1.5h"``; a number without a
unit, such as ``"5"``, is malformed, as Go's ``time.ParseDuration`` has it). Negative, either
way, keeps the model loaded forever (:data:`math.inf` here). Zero, with nothing to generate,
is how Ollama's clients unload a model (:func:`unloads`).
"""

from __future__ import annotations

import math
import re
from typing import Any

_NS = {"ns": 1, "us": 1_000, "µs": 1_000, "μs": 1_000, "ms": 1_000_000, "s": 10**9, "m": 60 * 10**9,
       "h": 3600 * 10**9}
_PART = re.compile(r"(\d+\.?\d*|\.\d+)(ns|us|µs|μs|ms|s|m|h)")


def go_duration(text: str) -> float:
    """Seconds in Go's duration ``text`` (whole nanoseconds, as Go keeps them).

    Raises:
        ValueError: not a Go duration.
    """
    s = text
    sign = -1 if s[:1] == "-" else 1
    if s[:1] in ("-", "+"):
        s = s[1:]
    if s == "0":
        return 0.0
    if not s:
        raise ValueError(f"invalid duration {text!r}")
    ns, pos = 0, 0
    while pos < len(s):
        part = _PART.match(s, pos)
        if part is None:
            raise ValueError(f"invalid duration {text!r} (a number and a unit: ns, us, ms, s, m, h; e.g. \"5m\")")
        ns += int(float(part[1]) * _NS[part[2]])
        pos = part.end()
    return sign * ns / 1e9


def seconds(value: Any) -> float | None:
    """``keep_alive`` in seconds (None: absent; :data:`math.inf`: forever).

    Raises:
        ValueError: neither a number nor a Go duration string.
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError("keep_alive must be a number of seconds or a duration string such as \"5m\"")
    if isinstance(value, str):
        parsed = go_duration(value)
        return math.inf if parsed < 0 else parsed
    if value < 0:
        return math.inf
    if math.isnan(value) or math.isinf(value):
        raise ValueError("keep_alive must be a finite number of seconds")
    return float(int(value))


def unloads(keep_alive: float | None) -> bool:
    """Whether ``keep_alive`` (as :func:`seconds` gives it) asks, with nothing to generate,
    for the model to be unloaded (Ollama's ``done_reason: "unload"``)."""
    return keep_alive == 0
