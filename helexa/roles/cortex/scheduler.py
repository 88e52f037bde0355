"""Choosing where a request runs: pure functions over plain data.

:func:`classify` turns a request into a :class:`~helexa.protocol.WorkloadClass`;
:func:`schedule` ranks the healthy neurons that have the model loaded and a slot free for
it, and returns a :class:`RoutingDecision`. Neither does I/O, so the tests run them
synchronously.

Ranking is cache-aware when the caller says so (``max_skew``): the neuron the request's
session last went to, then one where it pushes no other conversation out of the cache (it
goes on with its own, or a slot is free), then the one holding the longest prefix of its
prompt (see :mod:`.prefix`), then the least loaded; but a neuron more than ``max_skew`` requests busier
than the least busy candidate loses its cache preference, so one hot conversation (or a
system prompt every conversation shares) does not pile onto one neuron. With nothing
cached anywhere it is least-busy routing.

:class:`LiveLoad` is the feedback record the dispatcher updates after every request (in
flight, latency, errors); :func:`snapshot` reads it together with the fleet into the
immutable :class:`SchedulerState` that :func:`schedule` decides on.
"""

from __future__ import annotations

import math
from collections.abc import Container, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from helexa.protocol import GenerateRequest, ModelState, Task, WorkloadClass

from .fleet import Health

if TYPE_CHECKING:
    from .neuron_link import NeuronLink

BULK_PROMPT_CHARS = 8_000
"""Prompts longer than this (or asking for more than ``BULK_MAX_TOKENS``) are bulk work."""
BULK_MAX_TOKENS = 1_024

DEFAULT_LATENCY = 0.05  # s; assumed for a neuron with no history yet
ERROR_WEIGHT = 4.0  # a neuron failing every request scores as if five times as loaded
EWMA_ALPHA = 0.2
DEMAND_DECAY = 60.0  # s; how long a request counts toward its model's demand rate


def classify(task: Task | None, *, prompt_chars: int = 0, max_tokens: int | None = None) -> WorkloadClass:
    """Interactive vs bulk by size; ``task=None`` means an embedding request."""
    if task is None:
        return WorkloadClass.EMBEDDING
    bulk = prompt_chars > BULK_PROMPT_CHARS or (max_tokens or 0) > BULK_MAX_TOKENS
    if task is Task.CHAT:
        return WorkloadClass.CHAT_BULK if bulk else WorkloadClass.CHAT_INTERACTIVE
    return WorkloadClass.COMPLETION_BULK if bulk else WorkloadClass.COMPLETION_INTERACTIVE


def prompt_size(request: GenerateRequest) -> int:
    """Characters of prompt: the size signal :func:`classify` uses."""
    if request.prompt is not None:
        return len(request.prompt)
    total = 0
    for m in request.messages:
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, str):
            total += len(content)
        elif isinstance(content, list):
            total += sum(len(p.get("text", "")) for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return total


def slots_for(slots: int, priority: int, held: int) -> int:
    """The slots of a model on one neuron that a request of class ``priority`` (its rank:
    0 is ``interactive``) may fill, when ``held`` of them are kept for interactive ones
    (``orchestrator.interactive_slots``): all for an interactive request or when the slots
    are unknown (0), else ``held`` fewer but never fewer than one."""
    if slots <= 0 or held <= 0 or priority <= 0:
        return slots
    return max(1, slots - held)


@dataclass(frozen=True, slots=True)
class NeuronLoad:
    """One neuron as the scheduler sees it."""

    node_id: str
    healthy: bool
    loaded: frozenset[str]
    in_flight: int = 0
    queued: int = 0
    latency: float | None = None  # EWMA of request latency, seconds
    error_rate: float = 0.0  # EWMA of failures, 0..1
    slots: int = 0  # requests the model can run at once here (0: no limit known)
    model_in_flight: int = 0  # requests of this model running (or admitted) here
    cached: int = 0  # leading blocks of the request's prompt this neuron likely holds
    session: bool = False  # the request's session last went here
    room: bool = True  # the request would push no other conversation out of this neuron's cache

    @property
    def free(self) -> bool:
        """A slot is free for one more request of the model."""
        return self.slots <= 0 or self.model_in_flight < self.slots


@dataclass(frozen=True, slots=True)
class SchedulerState:
    neurons: tuple[NeuronLoad, ...] = ()


@dataclass(frozen=True, slots=True)
class Hints:
    """What the caller asks for: the model, neurons to avoid (already failed), and
    neurons to prefer when otherwise equal."""

    model_id: str
    exclude: frozenset[str] = frozenset()
    prefer: frozenset[str] = frozenset()
    blocks: int = 0  # blocks in the request's prompt (for the prefix match)


@dataclass(frozen=True, slots=True)
class RoutingDecision:
    """Where to run (the seed's ``RoutingDecision``).

    ``mode`` is ``local`` (``targets``: neurons that have the model loaded and a slot free,
    best first; the rest are fallbacks), ``queue`` (it is loaded, but no slot is free or
    others wait ahead: wait in the admission queue), ``cold_load`` (no usable neuron has it:
    wait for a load), ``peer`` (send it to a peer cortex) or ``none`` (nothing can serve it).
    ``reason`` says why, for logs and metrics; ``cache`` whether the first target holds the
    prompt's prefix (``hit`` with ``matched`` of ``blocks`` blocks, ``session`` for session
    affinity, ``miss``, or ``none`` when not looked at). Once the request is admitted the
    orchestrator adds how long it ``waited`` and the ``evictions`` its cold load caused.
    """

    model_id: str
    workload: WorkloadClass
    targets: tuple[str, ...]
    mode: str = "local"
    reason: str = ""
    cache: str = "none"
    matched: int = 0
    blocks: int = 0
    waited: float | None = None
    evictions: tuple[str, ...] = ()


def score(n: NeuronLoad, workload: WorkloadClass) -> float:
    """Expected cost of sending one more request to ``n``: lower is better."""
    latency = n.latency if n.latency is not None else DEFAULT_LATENCY
    busy = n.in_flight + n.queued + 1
    if workload in (WorkloadClass.CHAT_BULK, WorkloadClass.COMPLETION_BULK):
        # Bulk work tolerates latency: spread by occupancy alone.
        latency = DEFAULT_LATENCY
    return busy * latency * (1.0 + ERROR_WEIGHT * n.error_rate)


def schedule(workload: WorkloadClass, hints: Hints, state: SchedulerState, *,
             max_skew: int | None = None) -> RoutingDecision:
    """Rank the healthy, non-excluded neurons with ``hints.model_id`` loaded and a slot free
    (see the module docstring; ``max_skew=None``: least busy only). With none free but some
    busy, ``mode`` is ``queue``; with none at all, ``local`` with no ``targets`` (the
    orchestrator decides what then)."""
    candidates = [
        n for n in state.neurons if n.healthy and hints.model_id in n.loaded and n.node_id not in hints.exclude
    ]
    free = [n for n in candidates if n.free]
    if not free:
        if candidates:
            return RoutingDecision(hints.model_id, workload, (), mode="queue",
                                   reason=f"every slot busy on {len(candidates)} neuron(s)")
        return RoutingDecision(hints.model_id, workload, (), reason="not loaded on a usable neuron")
    aware = max_skew is not None
    if len(free) > 1:  # (one candidate, the common fleet of one neuron per model: nothing to rank)
        least = min(n.in_flight + n.queued for n in free)

        def key(n: NeuronLoad) -> tuple:
            far = aware and n.in_flight + n.queued - least > max_skew  # type: ignore[operator]
            near = aware and not far
            return (far, not (near and n.session), not (near and n.room), -(n.cached if near else 0),
                    score(n, workload), n.node_id not in hints.prefer, n.node_id)

        free.sort(key=key)
    best = free[0]
    if not aware:
        cache, reason = "none", "least loaded"
    elif best.session:
        cache, reason = "session", "the session's neuron"
    elif best.cached:
        cache, reason = "hit", f"holds {best.cached}/{hints.blocks} prompt blocks"
    else:
        cache, reason = "miss", "nothing cached: least loaded"
    if aware and not best.session and len(free) > 1 and any(n.cached > best.cached and not n.room for n in free[1:]):
        reason += "; a neuron holding more would push out another conversation"
    return RoutingDecision(hints.model_id, workload, tuple([n.node_id for n in free]), reason=reason, cache=cache,
                           matched=best.cached if cache == "hit" else 0, blocks=hints.blocks)


# --- the feedback record -----------------------------------------------------------------


@dataclass(slots=True)
class _NodeStats:
    in_flight: int = 0
    latency: float | None = None
    error_rate: float = 0.0


@dataclass
class LiveLoad:
    """Live load fed back by the dispatcher: no I/O, the clock is passed in.

    ``last_used[(node_id, model_id)]`` is read by the provisioner for LRU eviction and idle
    unloading; ``model_in_flight`` keeps it from unloading a model that is serving.
    """

    nodes: dict[str, _NodeStats] = field(default_factory=dict)
    last_used: dict[tuple[str, str], float] = field(default_factory=dict)
    model_in_flight: dict[tuple[str, str], int] = field(default_factory=dict)
    demand: dict[str, tuple[float, float]] = field(default_factory=dict)  # model -> (decayed count, at)

    def arrived(self, model_id: str, now: float) -> None:
        """A request for ``model_id`` arrived (served at once or not): demand for it."""
        count, at = self.demand.get(model_id, (0.0, now))
        self.demand[model_id] = (count * math.exp(-(now - at) / DEMAND_DECAY) + 1.0, now)

    def rate(self, model_id: str, now: float) -> float:
        """Recent requests per second for ``model_id`` (decaying over ``DEMAND_DECAY``)."""
        count, at = self.demand.get(model_id, (0.0, now))
        return count * math.exp(-(now - at) / DEMAND_DECAY) / DEMAND_DECAY

    def begin(self, node_id: str, model_id: str, now: float) -> None:
        self.nodes.setdefault(node_id, _NodeStats()).in_flight += 1
        key = (node_id, model_id)
        self.model_in_flight[key] = self.model_in_flight.get(key, 0) + 1
        self.last_used[key] = now

    def end(self, node_id: str, model_id: str, now: float, *, latency: float | None, ok: bool) -> None:
        stats = self.nodes.setdefault(node_id, _NodeStats())
        stats.in_flight = max(0, stats.in_flight - 1)
        key = (node_id, model_id)
        self.model_in_flight[key] = max(0, self.model_in_flight.get(key, 0) - 1)
        self.last_used[key] = now
        if latency is not None:
            stats.latency = latency if stats.latency is None else stats.latency + EWMA_ALPHA * (latency - stats.latency)
        stats.error_rate += EWMA_ALPHA * ((0.0 if ok else 1.0) - stats.error_rate)

    def touch(self, node_id: str, model_id: str, now: float) -> None:
        self.last_used[(node_id, model_id)] = now

    def forget(self, node_id: str, model_id: str) -> None:
        self.last_used.pop((node_id, model_id), None)
        self.model_in_flight.pop((node_id, model_id), None)

    def forget_node(self, node_id: str) -> None:
        """``node_id`` left the fleet: nothing of it is kept (a fleet whose neurons come and
        go under new ids would otherwise keep an entry of each, for good)."""
        self.nodes.pop(node_id, None)
        for key in [k for k in self.last_used if k[0] == node_id]:
            del self.last_used[key]
        for key in [k for k in self.model_in_flight if k[0] == node_id]:
            del self.model_in_flight[key]


def snapshot(links: Iterable[NeuronLink], live: LiveLoad, *, model_id: str | None = None, slots: int = 0,
             reserved: Mapping[tuple[str, str], int] | None = None, matches: Mapping[str, int] | None = None,
             session_node: str | None = None, draining: Container[tuple[str, str]] = (),
             rooms: Mapping[str, bool] | None = None) -> SchedulerState:
    """The scheduler's view of the fleet right now; with ``model_id``, only the neurons
    that have it loaded and are not draining it (the only ones :func:`schedule` can pick
    for it: per request on a large fleet, the rest would cost a record each for nothing),
    each with its ``slots``, the model's requests running or ``reserved`` there, the prompt
    blocks it ``matches``, whether it is the ``session_node`` and whether it has cache
    ``rooms`` for the request without pushing another conversation out."""
    neurons = []
    for link in links:
        in_model = 0
        if model_id is not None:
            status = link.models.get(model_id)
            key = (link.node_id, model_id)
            if status is None or status.state is not ModelState.LOADED or key in draining:
                continue
            in_model = live.model_in_flight.get(key, 0) + (reserved.get(key, 0) if reserved else 0)
        stats = live.nodes.get(link.node_id)
        neurons.append(
            NeuronLoad(
                node_id=link.node_id,
                healthy=link.health is Health.HEALTHY,
                loaded=frozenset(m for m, st in link.models.items() if st.state is ModelState.LOADED),
                in_flight=max(link.in_flight, stats.in_flight if stats else 0),
                queued=link.metrics.queued,
                latency=stats.latency if stats else None,
                error_rate=stats.error_rate if stats else 0.0,
                slots=slots,
                model_in_flight=in_model,
                cached=matches.get(link.node_id, 0) if matches else 0,
                session=session_node == link.node_id,
                room=rooms.get(link.node_id, True) if rooms else True,
            )
        )
    return SchedulerState(tuple(neurons))
