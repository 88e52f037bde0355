"""Failed loads, remembered per (model, neuron), so that a load that always fails is not
tried again for every new request.

A model whose load fails on a neuron (a bad path, a broken file, a config the engine
refuses) is not placed there again until its backoff ends: ``load_backoff`` seconds after
the first failure, doubling with each failure after it, at most ``load_backoff_max``.
Meanwhile the requests for it get ``503 load_failed`` at once, with a ``Retry-After`` of
what is left of the backoff, instead of starting a load that fails the same way. A load that
succeeds there, a change of the model's config (a reload), or an operator's explicit load
(``helexa models load``) forgets it.

:class:`LoadBackoff` is plain data over times passed in (trio's clock in the provisioner);
it does no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import ColdLoadFailed

if TYPE_CHECKING:
    from .catalogue import Catalogue
    from .placement import NodeView

__all__ = ["Failure", "LoadBackoff"]


@dataclass(frozen=True, slots=True)
class Failure:
    """The last failed load of a model on a neuron: when it failed, how many times in a
    row, the error (the operator's words: a neuron's own message), and when it may be
    tried again."""

    at: float
    count: int
    error: str
    until: float


class LoadBackoff:
    """The failed loads still in their backoff (see the module docstring)."""

    def __init__(self) -> None:
        self._failures: dict[tuple[str, str], Failure] = {}  # (model, node) -> its last failure

    def failed(self, model_id: str, node_id: str, now: float, error: str, *, base: float,
               ceiling: float) -> Failure:
        """A load of ``model_id`` on ``node_id`` failed at ``now``; returns its backoff:
        ``base`` seconds after a first failure, doubled for each one in a row after it, at
        most ``ceiling``."""
        last = self._failures.get((model_id, node_id))
        count = 1 if last is None else last.count + 1
        wait = min(ceiling, base * 2 ** min(count - 1, 32))
        failure = self._failures[(model_id, node_id)] = Failure(now, count, error, now + wait)
        return failure

    def forget(self, model_id: str, node_id: str | None = None) -> None:
        """The model loaded on ``node_id``, or its config changed, or the operator asked for
        a load (``node_id`` None: on every neuron): its next load is tried at once."""
        for key in [k for k in self._failures if k[0] == model_id and node_id in (None, k[1])]:
            del self._failures[key]

    def forget_node(self, node_id: str) -> None:
        """``node_id`` left the fleet for good: what it failed goes with it."""
        for key in [k for k in self._failures if k[1] == node_id]:
            del self._failures[key]

    def barred(self, model_id: str, now: float) -> frozenset[str]:
        """The neurons ``model_id`` may not be loaded on at ``now`` (still in their backoff)."""
        return frozenset(node for (model, node), f in self._failures.items() if model == model_id and f.until > now)

    def stuck(self, model_ids: Iterable[str], views: list[NodeView], catalogue: Catalogue, headroom: float,
              now: float) -> dict[str, list[str]]:
        """Those of ``model_ids`` (resident nowhere) barred from every neuron in ``views`` that
        could hold them, each with those neurons: nothing can load them before a backoff ends."""
        out = {}
        for model_id in model_ids:
            entry = catalogue.get(model_id)
            barred = self.barred(model_id, now)
            if entry is None or not barred:
                continue
            feasible = [v.node_id for v in views if entry.is_feasible_on(v.hardware, headroom)]
            if feasible and barred.issuperset(feasible):
                out[model_id] = feasible
        return out

    def retry_at(self, model_id: str, nodes: Iterable[str]) -> float | None:
        """When the first of ``nodes`` may be tried again for ``model_id`` (None: any now)."""
        ends = [f.until for node in nodes if (f := self._failures.get((model_id, node))) is not None]
        return min(ends) if ends else None

    def last(self, model_id: str, nodes: Iterable[str]) -> Failure | None:
        """The latest failure of ``model_id`` on one of ``nodes``."""
        failures = [f for node in nodes if (f := self._failures.get((model_id, node))) is not None]
        return max(failures, key=lambda f: f.at) if failures else None

    def error(self, model_id: str, nodes: Iterable[str], now: float) -> ColdLoadFailed:
        """The 503 for a request of ``model_id`` while its loads on ``nodes`` (every neuron
        that could hold it) are in their backoff: ``Retry-After`` is when the first ends."""
        nodes = sorted(nodes)
        last = self.last(model_id, nodes)
        retry_at = self.retry_at(model_id, nodes)
        wait = max(0.0, (retry_at if retry_at is not None else now) - now)
        detail = f" ({last.count} in a row; the last: {last.error})" if last is not None else ""
        return ColdLoadFailed(f"loading model {model_id!r} failed lately on {', '.join(nodes)}{detail}; "
                              f"not tried again for {wait:.0f}s", retry_after=max(1.0, wait), model=model_id)

    def view(self, model_id: str, now: float) -> dict[str, dict[str, Any]]:
        """What the admin API shows of ``model_id``'s failed loads, per neuron: ``failures``
        in a row, the last ``error``, and ``retry_in`` seconds (0: it may be tried now)."""
        return {node: {"failures": f.count, "error": f.error, "retry_in": round(max(0.0, f.until - now), 3)}
                for (model, node), f in sorted(self._failures.items()) if model == model_id}
