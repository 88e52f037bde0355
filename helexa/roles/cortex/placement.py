"""Where models go and which give way: pure decisions over snapshots of the fleet.

* :func:`place` picks the neuron for a load of one model (pinned neurons first, then those
  with room, then the cheapest evictions) and the residents to evict there.
* :func:`plan_loads` decides, from the whole queue's view, which waiting models to load
  now, in which order, and when to look again if none can be placed yet; and which busy
  models get another copy where there is room to spare.
* :func:`idle_unloads` lists models idle past their TTL; :func:`warm_loads` keep-warm
  models resident nowhere.

Eviction follows a :class:`Policy`:

``cost`` (the default)
    A resident gives way only if it is of the same or a lower priority class, is neither
    keep-warm nor pinned to that neuron, has been resident for ``min_residency`` (so a mixed
    stream A B A C does not reload A), and, until the model that needs the room has waited
    ``swap_drain``, has no requests running or waiting and is not worth more than that model
    (its own work drains first, and a popular model is not given up at once for a rarer
    one; a busy victim is then drained before it unloads). Among those, the one cheapest to
    lose goes first: its measured load time times its demand (recent request rate plus the
    work queued for it; requests running on it are drained, not lost), least recently used
    on a tie; a cheaper one still protected is waited for, at most its drain, rather than
    a dearer one evicted now. With ``hold_loads``, a model whose load time was measured is
    held (resident, or draining its own work) at most that many load times, and its
    residency ends sooner once the requests waiting for the room have waited, together,
    :data:`RESIDENCY_PRESSURE` such holds (per request of its own it would strand). Waiting models
    are loaded by class, then by how many wait, then by the longest wait: requests are
    grouped by model instead of swapping at each arrival.
``lru``
    Any idle resident of the same or a lower class, least recently used first; every
    waiting model is loaded as soon as it can be placed (the behaviour before the queue).
``fifo``
    As ``lru``, but only the model of the longest-waiting request is loaded: strict arrival
    order, one model at a time.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

from helexa.protocol import Hardware

from .catalogue import Catalogue, CatalogueEntry, Priority
from .queue import Demand

DEFAULT_LOAD_SECONDS = 10.0
"""What bringing back a model costs before its load was ever measured."""
DEMAND_HORIZON = 60.0
"""Queued or running work counts as this many seconds of demand, against the request rate."""
RESIDENCY_PRESSURE = 2.0
"""With ``hold_loads``, a resident's minimum residency ends once the requests waiting for
the room have waited, together, this many times ``hold_loads`` times what bringing the
resident back would cost (its load time, for each request queued for it and one more)."""


@dataclass(frozen=True, slots=True)
class Resident:
    """A model loaded (or loading) on a neuron, with what eviction weighs."""

    model_id: str
    memory_mb: int
    on_gpu: bool
    priority: Priority
    last_used: float
    busy: bool = False
    evictable: bool = True  # False for loading models and models outside the catalogue
    loaded_at: float = float("-inf")
    keep_warm: bool = False
    pinned: bool = False  # pinned to this neuron
    queued: int = 0  # requests waiting for it
    rate: float = 0.0  # recent requests per second
    load_time: float | None = None  # its last measured load, seconds
    draining: bool = False  # being unloaded: its memory is held until it is gone, it is not evictable


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


@dataclass(frozen=True, slots=True)
class Policy:
    """How eviction chooses (see the module docstring)."""

    kind: str = "lru"  # cost | lru | fifo
    min_residency: float = 0.0
    swap_drain: float = 0.0
    hold_loads: float = 0.0  # 0: off; else residency and drain last at most this many of the resident's load times


class NoPlacement(Exception):
    """No neuron can take the model now; ``ever`` says whether any could with memory free,
    ``retry_at`` when a resident's protection lapses (None: nothing to wait for)."""

    def __init__(self, message: str, *, ever: bool, retry_at: float | None = None) -> None:
        super().__init__(message)
        self.ever = ever
        self.retry_at = retry_at


def value(r: Resident) -> float:
    """What losing ``r`` costs: the time to bring it back times how much it is wanted (its
    recent request rate plus the requests queued for it, over :data:`DEMAND_HORIZON`)."""
    load = r.load_time if r.load_time is not None else DEFAULT_LOAD_SECONDS
    # Requests running on it are not lost (an eviction drains them first): only the requests
    # that will want it (its rate) and those queued for it count.
    return load * (r.rate + r.queued / DEMAND_HORIZON)


def _protected_until(r: Resident, entry: CatalogueEntry, policy: Policy, now: float,
                     waited: float, worth: float = math.inf, pressure: tuple[float, int] = (0.0, 0)
                     ) -> float | None:
    """When ``r`` may give way to ``entry`` (``now`` or before: it may), or None: never."""
    if not r.evictable or r.priority > entry.priority:
        return None
    if policy.kind != "cost":
        return None if r.busy else now
    if r.keep_warm or r.pinned:
        return None
    residency, drain = policy.min_residency, policy.swap_drain
    until = max(now, r.loaded_at + residency)
    if policy.hold_loads > 0 and r.load_time is not None:
        # Holding a model longer than it takes to load it again saves less than it costs the
        # model waiting for the room (a mixed stream A B A C still loads A once); so does
        # holding it once the requests waiting have waited, together, well past its load.
        hold = policy.hold_loads * r.load_time
        drain = min(drain, hold)
        waited_sum, waiting = pressure
        pressed = now + max(0.0, RESIDENCY_PRESSURE * hold * (1 + r.queued) - waited_sum) / max(1, waiting)
        until = max(now, min(r.loaded_at + min(residency, hold), pressed))
    # Its own work drains first; and a model wanted more than the newcomer is not given up
    # for it at once (the newcomer's wait grows its claim, up to the drain).
    if (r.busy or r.queued or value(r) > worth) and waited < drain:
        until = max(until, now + drain - waited)
    return until


def _patience(r: Resident, policy: Policy) -> float:
    """How long a swap may wait for ``r`` to lapse rather than evict a dearer resident now:
    as long as ``r``'s own work may hold a swap off (its drain)."""
    if policy.hold_loads > 0 and r.load_time is not None:
        return min(policy.swap_drain, policy.hold_loads * r.load_time)
    return policy.swap_drain


def _evictions(entry: CatalogueEntry, node: NodeView, headroom: float, policy: Policy = Policy(), now: float = 0.0,
               waited: float = 0.0, worth: float = math.inf, pressure: tuple[float, int] = (0.0, 0)
               ) -> tuple[tuple[str, ...] | None, float | None]:
    """Residents to unload from ``node`` so ``entry`` fits (None: not now), and when that
    could change (None: not by waiting)."""
    pool = [r for r in node.residents if r.on_gpu == entry.on_gpu]
    free = entry.capacity_mb(node.hardware) * headroom - sum(r.memory_mb for r in pool)
    if free >= entry.memory_mb:
        return (), None
    ready, later = [], []
    for r in pool:
        until = _protected_until(r, entry, policy, now, waited, worth, pressure)
        if until is not None:
            (ready if until <= now else later).append((until, r))
    if policy.kind == "cost":
        # The cheapest victims, even one still protected for a while: evicting a dearer model
        # now, because a cheaper one is held a moment longer, reloads the dearer one soon.
        pool = ready + [(u, r) for u, r in later if u - now <= _patience(r, policy)]
        key = lambda ur: (value(ur[1]), ur[1].last_used, ur[1].model_id)  # noqa: E731
    else:
        pool, key = ready, (lambda ur: (ur[1].last_used, ur[1].model_id))
    chosen: list[str] = []
    wait = now
    for until, r in sorted(pool, key=key):
        chosen.append(r.model_id)
        free += r.memory_mb
        wait = max(wait, until)
        if free >= entry.memory_mb:
            return (tuple(chosen), None) if wait <= now else (None, wait)
    if later and free + sum(r.memory_mb for _, r in later) >= entry.memory_mb:
        return None, min(until for until, _ in later)
    return None, None


def place(entry: CatalogueEntry, nodes: list[NodeView], *, headroom: float = 1.0,
          exclude: frozenset[str] = frozenset(), policy: Policy = Policy(), now: float = 0.0,
          waited: float = 0.0, worth: float = math.inf, pressure: tuple[float, int] = (0.0, 0)) -> LoadPlan:
    """Choose the neuron for a load of ``entry`` (``waited``: how long its oldest request
    has waited; ``worth``: its :func:`worth`, inf for a load nobody queued for, which a
    resident's value never holds off; ``pressure``: the seconds its requests have waited,
    summed, and how many wait). Raises :class:`NoPlacement`."""
    feasible = [n for n in nodes if n.node_id not in exclude and entry.is_feasible_on(n.hardware, headroom)]
    if not feasible:
        raise NoPlacement(f"no connected neuron has the hardware for model {entry.id!r}", ever=False)
    ranked = []
    retry: float | None = None
    for n in feasible:
        evict, until = _evictions(entry, n, headroom, policy, now, waited, worth, pressure)
        if evict is None:
            if until is not None:
                retry = until if retry is None else min(retry, until)
            continue
        lost = [r for r in n.residents if r.model_id in evict]
        cost = sum(value(r) for r in lost) if policy.kind == "cost" else 0.0
        ranked.append(((n.node_id not in entry.pinned_on, len(evict) > 0, cost, sum(r.memory_mb for r in lost),
                        n.node_id), n.node_id, evict))
    if not ranked:
        raise NoPlacement(f"no neuron has room for model {entry.id!r} now: memory is held by busy, "
                          "recently loaded or higher-priority models", ever=True, retry_at=retry)
    _, node_id, evict = min(ranked)
    return LoadPlan(entry.id, node_id, evict)


def plan_loads(needs: Iterable[Demand], entries: Mapping[str, CatalogueEntry], nodes: list[NodeView], *,
               policy: Policy, headroom: float = 1.0, now: float = 0.0, replicas: Iterable[Demand] = (),
               barred: Mapping[str, frozenset[str]] | None = None) -> tuple[list[LoadPlan], float | None]:
    """Which of the waiting models (``needs``: none resident anywhere usable, none loading)
    to load now, and where; and when to plan again if some must wait (None: on the next
    change). Models that cannot be placed ever are left out (their requests wait out their
    deadlines or are refused by the caller). Then ``replicas``: models resident somewhere
    whose requests still wait (every slot busy) get one more copy on a neuron with room for
    it, but never at the price of an eviction. No model is placed on a neuron ``barred``
    lists for it (its load failed there lately: :mod:`.load_backoff`)."""
    barred = barred or {}
    if policy.kind == "cost":
        order = sorted(needs, key=lambda d: (d.priority, -d.waiting, d.oldest, d.model_id))
    else:
        order = sorted(needs, key=lambda d: (d.oldest, d.model_id))
    plans: list[LoadPlan] = []
    retry: float | None = None
    views = list(nodes)
    for need in order:
        entry = entries.get(need.model_id)
        if entry is None:
            continue
        try:
            plan = place(entry, views, headroom=headroom, exclude=barred.get(entry.id, frozenset()), policy=policy,
                         now=now, waited=now - need.oldest,
                         worth=worth(need), pressure=(0.0, 0) if need.arrived_sum is None
                         else (need.waiting * now - need.arrived_sum, need.waiting))
        except NoPlacement as exc:
            if exc.retry_at is not None:
                retry = exc.retry_at if retry is None else min(retry, exc.retry_at)
            if policy.kind == "fifo" and exc.ever:
                break  # head of line: nothing behind it is loaded first
            continue
        plans.append(plan)
        views = [_applied(v, plan, entry) if v.node_id == plan.node_id else v for v in views]
        if policy.kind == "fifo":
            break
    for need in sorted(replicas, key=lambda d: (d.priority, -d.waiting, d.oldest, d.model_id)):
        entry = entries.get(need.model_id)
        if entry is None:
            continue
        holders = frozenset(v.node_id for v in views if any(r.model_id == entry.id for r in v.residents))
        try:
            plan = place(entry, views, headroom=headroom, exclude=holders | barred.get(entry.id, frozenset()),
                         policy=policy, now=now)
        except NoPlacement:
            continue
        if not plan.evict:
            plans.append(plan)
            views = [_applied(v, plan, entry) if v.node_id == plan.node_id else v for v in views]
    return plans, retry


def worth(need: Demand) -> float:
    """What loading the waiting model is worth, in :func:`value`'s terms (its rate and its
    waiting requests; an unmeasured load counts :data:`DEFAULT_LOAD_SECONDS`)."""
    load = need.load_time if need.load_time is not None else DEFAULT_LOAD_SECONDS
    return load * (need.rate + need.waiting / DEMAND_HORIZON)


def _applied(view: NodeView, plan: LoadPlan, entry: CatalogueEntry) -> NodeView:
    """``view`` once ``plan`` is carried out (the new model counts as loading)."""
    kept = tuple(r for r in view.residents if r.model_id not in plan.evict)
    new = Resident(entry.id, entry.memory_mb, entry.on_gpu, entry.priority, float("inf"), evictable=False)
    return replace(view, residents=kept + (new,))


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
            deadline = now + entry.idle_ttl if r.busy or r.queued else r.last_used + entry.idle_ttl
            if deadline <= now:
                due.append(Unload(node.node_id, r.model_id))
            elif upcoming is None or deadline < upcoming:
                upcoming = deadline
    return due, upcoming


def warm_loads(catalogue: Catalogue, nodes: list[NodeView]) -> list[str]:
    """Keep-warm models resident on no neuron (loading counts as resident)."""
    resident = {r.model_id for n in nodes for r in n.residents}
    return [e.id for e in catalogue if e.keep_warm and e.id not in resident]
