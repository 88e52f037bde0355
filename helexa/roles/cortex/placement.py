"""Where models go: the provisioner's pure decisions over :class:`NodeView` snapshots.

* :func:`place` picks the neuron for a cold load (pinned neurons first, then those with
  room, then the fewest evictions) and the models to evict there: only models of the same
  or a lower priority class, idle ones, least recently used first.
* :func:`idle_unloads` lists models idle past their TTL, and when the next one falls due.
* :func:`warm_loads` lists keep-warm models resident nowhere.
* :func:`pinned_loads` lists models pinned on a neuron (``helexa models pin``) and not
  resident there.

No I/O and no clock: :mod:`.provisioner` carries the decisions out.
"""

from __future__ import annotations

from dataclasses import dataclass

from helexa.protocol import Hardware

from .catalogue import Catalogue, CatalogueEntry, Priority


@dataclass(frozen=True, slots=True)
class Resident:
    """A model loaded (or loading) on a neuron."""

    model_id: str
    memory_mb: int
    on_gpu: bool
    priority: Priority
    last_used: float
    busy: bool = False
    evictable: bool = True  # False for loading models and models outside the catalogue


@dataclass(frozen=True, slots=True)
class NodeView:
    node_id: str
    hardware: Hardware
    residents: tuple[Resident, ...] = ()


@dataclass(frozen=True, slots=True)
class LoadPlan:
    model_id: str
    node_id: str
    evict: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Unload:
    node_id: str
    model_id: str


class NoPlacement(Exception):
    """No neuron can take the model now; ``ever`` says whether any could with memory free."""

    def __init__(self, message: str, *, ever: bool) -> None:
        super().__init__(message)
        self.ever = ever


def _evictions(entry: CatalogueEntry, node: NodeView, headroom: float) -> tuple[str, ...] | None:
    """Models to unload from ``node`` so ``entry`` fits; None if it cannot fit."""
    pool = [r for r in node.residents if r.on_gpu == entry.on_gpu]
    free = entry.capacity_mb(node.hardware) * headroom - sum(r.memory_mb for r in pool)
    if free >= entry.memory_mb:
        return ()
    victims = sorted(
        (r for r in pool if r.evictable and not r.busy and r.priority <= entry.priority),
        key=lambda r: (r.last_used, r.model_id),
    )
    chosen: list[str] = []
    for r in victims:
        chosen.append(r.model_id)
        free += r.memory_mb
        if free >= entry.memory_mb:
            return tuple(chosen)
    return None


def place(
    entry: CatalogueEntry, nodes: list[NodeView], *, headroom: float = 1.0, exclude: frozenset[str] = frozenset()
) -> LoadPlan:
    """Choose the neuron for a cold load of ``entry``. Raises :class:`NoPlacement`."""
    feasible = [n for n in nodes if n.node_id not in exclude and entry.is_feasible_on(n.hardware)]
    if not feasible:
        raise NoPlacement(f"no connected neuron has the hardware for model {entry.id!r}", ever=False)
    ranked = []
    for n in feasible:
        evict = _evictions(entry, n, headroom)
        if evict is None:
            continue
        evicted_mb = sum(r.memory_mb for r in n.residents if r.model_id in evict)
        ranked.append(((n.node_id not in entry.pinned_on, len(evict) > 0, evicted_mb, n.node_id), n.node_id, evict))
    if not ranked:
        raise NoPlacement(
            f"no neuron has room for model {entry.id!r}: memory is held by busy or higher-priority models",
            ever=True,
        )
    _, node_id, evict = min(ranked)
    return LoadPlan(entry.id, node_id, evict)


def idle_unloads(catalogue: Catalogue, nodes: list[NodeView], now: float) -> tuple[list[Unload], float | None]:
    """Models idle past their ``idle_ttl`` (keep-warm and busy ones never), and the time
    to look again (None: nothing to wait for)."""
    due: list[Unload] = []
    upcoming: float | None = None
    for node in nodes:
        for r in node.residents:
            entry = catalogue.get(r.model_id)
            if entry is None or entry.keep_warm or entry.idle_ttl <= 0 or not r.evictable:
                continue
            # A busy model is looked at again a TTL from now: by then its last use is known.
            deadline = now + entry.idle_ttl if r.busy else r.last_used + entry.idle_ttl
            if deadline <= now:
                due.append(Unload(node.node_id, r.model_id))
            elif upcoming is None or deadline < upcoming:
                upcoming = deadline
    return due, upcoming


def warm_loads(catalogue: Catalogue, nodes: list[NodeView]) -> list[str]:
    """Keep-warm models resident on no neuron (loading counts as resident)."""
    resident = {r.model_id for n in nodes for r in n.residents}
    return [e.id for e in catalogue if e.keep_warm and e.id not in resident]


def pinned_loads(pins: dict[str, frozenset[str]], nodes: list[NodeView]) -> list[tuple[str, str]]:
    """``(model, node)`` pairs pinned but not resident (loading counts) on a connected node."""
    out = []
    for node in nodes:
        resident = {r.model_id for r in node.residents}
        out += [(model_id, node.node_id) for model_id, on in sorted(pins.items())
                if node.node_id in on and model_id not in resident]
    return out
