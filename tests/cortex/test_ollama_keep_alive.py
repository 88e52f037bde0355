"""``keep_alive`` parsed as Ollama's ``api.Duration`` parses it (its own tests' cases)."""

from __future__ import annotations

import math

import pytest

from helexa.roles.cortex.ollama_keep_alive import seconds, unloads


@pytest.mark.parametrize(("value", "expected"), [
    (42, 42.0), (42.5, 42.0), (0.5, 0.0), (0, 0.0), (-1, math.inf), (-0.5, math.inf),
    ("42m", 2520.0), ("1h30m", 5400.0), ("1.5h", 5400.0), (".5s", 0.5), ("250ms", 0.25),
    ("0", 0.0), ("+0", 0.0), ("0s", 0.0), ("0m", 0.0), ("-0s", 0.0), ("-1m", math.inf), (None, None),
])
def test_keep_alive_in_seconds_as_ollama_reads_it(value, expected) -> None:
    assert seconds(value) == expected


@pytest.mark.parametrize("value", ["5", "", "abc", "5 m", " 5m", "5x", True, [1], {"s": 1}, math.nan])
def test_what_ollama_refuses_is_refused(value) -> None:
    with pytest.raises(ValueError):
        seconds(value)


def test_only_zero_unloads() -> None:
    assert unloads(0.0) and unloads(seconds("0m"))
    assert not unloads(None) and not unloads(math.inf) and not unloads(0.25)
