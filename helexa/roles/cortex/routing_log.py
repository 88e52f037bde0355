"""The orchestrator's recent routing decisions, for the console: why each request went where.

:class:`RoutingLog` keeps the last few hundred :class:`~.scheduler.RoutingDecision` s in a
ring, each with the neuron chosen and when, and hands them to the console's Models page
newest first: the mode (``local``, ``queue``, ``cold_load``, ``peer``, ``none``), the
cache verdict (prefix blocks matched, session affinity, miss), the time it waited in the
admission queue, and the evictions its cold load caused. Pure: the clock is passed in.
"""

from __future__ import annotations

from collections import deque
from dataclasses import replace
from typing import Any

from helexa.logs import redact

from .scheduler import RoutingDecision

__all__ = ["RoutingLog"]

CAPACITY = 200
"""Decisions kept (older ones are forgotten)."""
MAX_NAME = 64
"""Characters of a model name kept: a name nothing serves is the client's to choose (up to
the body's limit), and the console shows it."""


def shown(model_id: str) -> str:
    """``model_id`` as the console may show it: a key or token pasted into it masked, cut
    to :data:`MAX_NAME` characters."""
    text = redact(model_id)
    return text if len(text) <= MAX_NAME else text[:MAX_NAME - 1] + "\u2026"


class RoutingLog:
    """The last ``capacity`` routing decisions."""

    def __init__(self, capacity: int = CAPACITY) -> None:
        self._ring: deque[tuple[float, str | None, RoutingDecision]] = deque(maxlen=capacity)

    def record(self, decision: RoutingDecision, node_id: str | None, at: float, *, known: bool = True) -> None:
        """``decision`` was taken at ``at`` (Unix time) and sent the request to ``node_id``
        (None: nowhere, it failed). ``known``: the model is the operator's (in the
        catalogue); any other name is the client's to choose and is kept as :func:`shown`,
        so a ring of them holds neither its secrets nor megabytes."""
        if not known and (name := shown(decision.model_id)) != decision.model_id:
            decision = replace(decision, model_id=name)
        self._ring.append((at, node_id, decision))

    def view(self, limit: int = 50) -> list[dict[str, Any]]:
        """The newest ``limit`` decisions, newest first, as plain data: ``at``, ``model``,
        ``node``, ``mode``, ``cache`` (with ``matched`` of ``blocks``), ``waited`` (seconds,
        or None when it did not queue), ``evictions`` and ``reason``."""
        out = []
        for at, node_id, d in list(reversed(self._ring))[:max(0, limit)]:
            out.append({"at": at, "model": d.model_id, "node": node_id, "mode": d.mode, "cache": d.cache,
                        "matched": d.matched, "blocks": d.blocks,
                        "waited": None if d.waited is None else round(d.waited, 3),
                        "evictions": list(d.evictions), "reason": d.reason})
        return out

    def __len__(self) -> int:
        return len(self._ring)
