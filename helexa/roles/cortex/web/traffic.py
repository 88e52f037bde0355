"""What the console's Traffic page draws: requests, tokens, time to first token and errors
per portal and model, in 10-second buckets over the last hour, in memory.

The metered path (:mod:`..portal.metering`) calls :meth:`Traffic.observe` once per settled
request; the ring holds 360 buckets per ``(portal, model)`` series and forgets older ones
as time moves on. A restart starts it empty (the usage ledger is the durable record).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

BUCKET = 10.0
"""Seconds per bucket."""
SPAN = 360
"""Buckets kept (an hour)."""

# requests, errors, prompt tokens, completion tokens, ttft sum, ttft count
_FIELDS = 6


class Traffic:
    """Per-10-second counters of every ``(portal, model)`` over the last hour."""

    def __init__(self, clock: Callable[[], float] = time.time, *, max_series: int = 500) -> None:
        self.clock = clock
        self.max_series = max_series
        self._series: dict[tuple[str, str], dict[int, list[float]]] = {}
        self._version = 0
        self._cached: tuple[int, int, dict[str, Any]] | None = None
        self.key_seen: dict[str, float] = {}
        """When each API key was last used (since the cortex started)."""

    def observe(self, portal: str, model: str, *, ok: bool, prompt_tokens: int, completion_tokens: int,
                ttft: float | None, key_id: str = "") -> None:
        """Count one finished request (``ok``: it did not fail)."""
        now = self.clock()
        self._version += 1
        if key_id:
            self.key_seen[key_id] = now
        slot = int(now // BUCKET)
        key = (portal, model)
        series = self._series.get(key)
        if series is None:
            if len(self._series) >= self.max_series:
                return  # bounded: a flood of distinct model names cannot grow memory
            series = self._series[key] = {}
        bucket = series.get(slot)
        if bucket is None:
            bucket = series[slot] = [0.0] * _FIELDS
            oldest = slot - SPAN
            for old in [s for s in series if s <= oldest]:
                del series[old]
        bucket[0] += 1
        if not ok:
            bucket[1] += 1
        bucket[2] += prompt_tokens
        bucket[3] += completion_tokens
        if ttft is not None:
            bucket[4] += ttft
            bucket[5] += 1

    def view(self) -> dict[str, Any]:
        """The last hour as JSON-ready data: ``start`` (Unix time of the first bucket),
        ``bucket`` seconds, and per series ``portal``, ``model`` and per-bucket lists
        ``requests_per_s``, ``tokens_per_s``, ``ttft`` (mean seconds, or None), ``errors``."""
        now_slot = int(self.clock() // BUCKET)
        if self._cached is not None and self._cached[:2] == (now_slot, self._version):
            return self._cached[2]  # every open console asks every 10 s: build it once
        first = now_slot - SPAN + 1
        out = []
        for (portal, model), series in sorted(self._series.items()):
            req: list[float] = []
            tok: list[float] = []
            ttft: list[float | None] = []
            err: list[int] = []
            totals = [0.0] * _FIELDS
            for slot in range(first, now_slot + 1):
                b = series.get(slot)
                if b is None:
                    req.append(0.0)
                    tok.append(0.0)
                    ttft.append(None)
                    err.append(0)
                else:
                    totals = [t + v for t, v in zip(totals, b)]
                    req.append(round(b[0] / BUCKET, 3))
                    tok.append(round((b[2] + b[3]) / BUCKET, 2))
                    ttft.append(round(b[4] / b[5], 4) if b[5] else None)
                    err.append(int(b[1]))
            if any(req):
                out.append({"portal": portal, "model": model, "requests_per_s": req, "tokens_per_s": tok,
                            "ttft": ttft, "errors": err,
                            "totals": {"requests": int(totals[0]), "errors": int(totals[1]),
                                       "tokens": int(totals[2] + totals[3]),
                                       "ttft": round(totals[4] / totals[5], 4) if totals[5] else None}})
        view = {"start": first * BUCKET, "bucket": BUCKET, "series": out}
        self._cached = (now_slot, self._version, view)
        return view
