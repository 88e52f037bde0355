"""The admission queue's shell: requests wait here for a slot, a swap or a cold load.

The order is :class:`~.queue.FairQueue`'s and the choice of neuron is
:func:`~.scheduler.schedule`'s; this module only moves tickets. A request that cannot
start now takes a ticket (:meth:`Admission.wait`) and sleeps on its own event, with its own
deadline, telling its client where it stands on every keep-alive tick. Whenever a slot may
have freed (a request ended, a model finished loading, a neuron joined) the orchestrator
calls :meth:`Admission.pump`, which, with no await in it, hands free slots to waiters in
queue order and reserves each slot for its waiter until the dispatcher counts the request
as running (:meth:`Admission.claim`), so no slot is ever handed out twice.

Errors: :class:`~.errors.NoCapacity` with a ``Retry-After`` from the queue's measured
drain rate when the queue is full (at once, ``queue_full``; or later, for the last in line,
when a request that would be served before it arrives at the full queue) or the deadline passes
(``queue_timeout``); the load's own error when the model a request waits for failed to
load everywhere.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Awaitable, Callable, Container, Iterable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import trio

from helexa.protocol import ModelState, WorkloadClass

from .errors import GatewayError, NoCapacity
from .fleet import Fleet
from .metrics import Metrics, OrchestratorMetrics
from .prefix import PrefixIndex
from .queue import FairQueue, Waiter, rank
from .scheduler import Hints, LiveLoad, RoutingDecision, schedule, slots_for, snapshot

if TYPE_CHECKING:
    from .config import OrchestratorConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Tenant:
    """Who a request is for, as the orchestrator sees it: the portal and key it came
    through (for fairness between tenants), its priority class (``interactive`` before
    ``normal`` before ``bulk``) and its weight in fair sharing. Requests from peers and
    from open portals without keys use the defaults."""

    portal: str = "default"
    key: str = ""
    priority: str = "normal"
    weight: float = 1.0


@dataclass(frozen=True, slots=True)
class WaitStatus:
    """What a request that cannot start yet is waiting for, passed to ``on_wait`` on every
    keep-alive tick (the API surfaces turn it into a keep-alive their clients ignore and
    people can read).

    ``stage`` is ``loading`` (a cold load: ``load_stage`` such as ``download`` or ``load``,
    and ``progress`` 0..1 when the neuron reports it) or ``queued`` (``position`` in the
    model's queue, 1 = next, and ``eta`` seconds when an estimate exists).
    """

    model_id: str
    stage: str
    load_stage: str | None = None
    progress: float | None = None
    position: int | None = None
    eta: float | None = None

    def describe(self) -> str:
        """One line for people: ``loading m: download 42%`` or ``queued for m: 3rd, ~2s``."""
        if self.stage == "loading":
            done = f" {self.progress:.0%}" if self.progress is not None else ""
            return f"loading {self.model_id}: {self.load_stage or 'load'}{done}"
        where = f" position {self.position}" if self.position is not None else ""
        eta = f", ~{self.eta:.0f}s" if self.eta is not None else ""
        return f"queued for {self.model_id}:{where}{eta}"


OnWait = Callable[[WaitStatus], Awaitable[None]]
"""Awaited every ``keepalive_interval`` while a request waits (a cold load, a queue)."""


@dataclass(frozen=True, slots=True)
class Pending:
    """A request as the queue needs it: what it wants, for whom, and its routing hints."""

    model_id: str
    workload: WorkloadClass
    tenant: Tenant
    arrived: float
    deadline: float
    failed: tuple[tuple[str, float], ...] = ()
    """Neurons this request already failed on, each with when (see :func:`excluded`)."""
    blocks: tuple[bytes, ...] = ()
    session: str | None = None


def excluded(failed: Iterable[tuple[str, float]], model_id: str, fleet: Fleet) -> frozenset[str]:
    """The neurons a request that failed on ``failed`` (neuron, when) must not go to now:
    each one, unless ``model_id`` has been loaded there again since the failure. A model
    whose process died under the request (a worker killed, out of memory) is reloaded by
    the provisioner, often on the same neuron; that new instance is not the one that
    failed, and on a one-neuron fleet it is the only place the request can run."""
    out = []
    for node_id, at in failed:
        link = fleet.get(node_id)
        if link is None or link.loaded_since.get(model_id, -math.inf) <= at:
            out.append(node_id)
    return frozenset(out)


@dataclass(eq=False)
class _Ticket:
    pending: Pending
    waiter: Waiter
    done: trio.Event = field(default_factory=trio.Event)
    node_id: str | None = None
    decision: RoutingDecision | None = None
    error: GatewayError | None = None


class Admission:
    """Tickets, their events and the slots reserved for them (see the module docstring).

    Args:
        config: the ``[orchestrator]`` table.
        fleet, live, prefix: the orchestrator's own.
        metrics: where queue lengths, waits and refusals go.
        draining: (neuron, model) pairs no new work may go to.
        slots: requests a neuron runs at once for a model (0: no limit).
        loading: the stage and progress of a model's load under way (None: not loading).
        max_skew: the scheduler's cache-aware bound (None: least busy only).
    """

    def __init__(self, config: OrchestratorConfig, fleet: Fleet, live: LiveLoad, prefix: PrefixIndex,
                 metrics: Metrics, *, draining: Container[tuple[str, str]], slots: Callable[[str], int],
                 loading: Callable[[str], tuple[str | None, float | None] | None],
                 max_skew: int | None) -> None:
        self.config = config
        self.fleet = fleet
        self.live = live
        self.prefix = prefix
        self.metrics = metrics
        self.om = OrchestratorMetrics.of(metrics)
        self.queue = FairQueue(config.max_queue)
        self.reserved: dict[tuple[str, str], int] = {}
        """Slots handed to a waiter that the dispatcher has not counted yet."""
        self._draining = draining
        self._slots = slots
        self._loading = loading
        self._max_skew = max_skew
        self._tickets: dict[int, _Ticket] = {}
        self._numbers = itertools.count(1)

    def in_use(self, node_id: str, model_id: str) -> int:
        """Requests of ``model_id`` running or admitted on ``node_id``."""
        key = (node_id, model_id)
        return self.live.model_in_flight.get(key, 0) + self.reserved.get(key, 0)

    # --- waiting ------------------------------------------------------------------------------

    async def wait(self, pending: Pending, on_wait: OnWait | None,
                   wake: Callable[[], None]) -> tuple[str, RoutingDecision]:
        """Queue ``pending`` and wait until a slot is reserved for it; returns the neuron
        and the decision that chose it. Call :meth:`claim` with them before anything else
        awaits. ``wake`` is told the queue changed (the provisioner plans loads from it).

        Raises :class:`NoCapacity` (queue full; deadline passed), or the load's error."""
        t = pending.tenant
        waiter = Waiter(next(self._numbers), pending.model_id, t.portal, t.key, rank(t.priority), t.weight,
                        pending.arrived, pending.deadline)
        model_id = pending.model_id
        now = trio.current_time()
        if not self.queue.push(waiter):
            victim = self.queue.displace(waiter)
            if victim is None:
                self.om.rejected(model_id, t.portal, "full")
                raise NoCapacity(f"the queue for model {model_id!r} is full ({self.config.max_queue} waiting)",
                                 retry_after=self._retry_after(model_id, now), code="queue_full")
            self._push_out(victim, now)
            self.queue.push(waiter)
        ticket = _Ticket(pending, waiter)
        self._tickets[waiter.ticket] = ticket
        self.om.waiting(model_id, t.portal, 1)
        wake()
        self.pump(model_id)

        def tick() -> WaitStatus:
            loading = self._loading(model_id)
            if loading is not None:
                return WaitStatus(model_id, "loading", loading[0], loading[1])
            position = self.queue.position(waiter.ticket)
            eta = self.queue.eta(model_id, position, trio.current_time()) if position else None
            return WaitStatus(model_id, "queued", position=position, eta=eta)

        try:
            if not ticket.done.is_set():
                with trio.move_on_at(pending.deadline):
                    await _ticking(ticket.done.wait(), on_wait, tick, self.config.keepalive_interval)
        except BaseException:
            self._abandon(ticket)
            raise
        if ticket.error is not None:
            self._tickets.pop(waiter.ticket, None)
            raise ticket.error
        if ticket.node_id is None:
            self._abandon(ticket)
            now = trio.current_time()
            self.om.rejected(model_id, t.portal, "deadline")
            raise NoCapacity(f"no capacity for model {model_id!r} within {pending.deadline - pending.arrived:g}s",
                             retry_after=self._retry_after(model_id, now), code="queue_timeout")
        self._tickets.pop(waiter.ticket, None)
        assert ticket.decision is not None
        return ticket.node_id, ticket.decision

    def claim(self, node_id: str, model_id: str) -> None:
        """The dispatcher is about to count the request on ``node_id``: the reservation
        :meth:`wait` returned ends here (call it with no await before the dispatch)."""
        key = (node_id, model_id)
        left = self.reserved.get(key, 0) - 1
        if left > 0:
            self.reserved[key] = left
        else:
            self.reserved.pop(key, None)

    def _abandon(self, ticket: _Ticket) -> None:
        """``ticket`` will not run (its client left, or its deadline passed): out of the
        queue, or its reserved slot back to the others."""
        self._tickets.pop(ticket.waiter.ticket, None)
        model_id = ticket.pending.model_id
        if self.queue.remove(ticket.waiter.ticket) is not None:
            self.om.waiting(model_id, ticket.waiter.portal, -1)
        elif ticket.node_id is not None:
            self.claim(ticket.node_id, model_id)
            ticket.node_id = None
            self.pump(model_id)

    def _push_out(self, victim: Waiter, now: float) -> None:
        """The queue is full and a request that would be served before ``victim`` (the
        last in line) arrived: ``victim`` leaves with ``queue_full``, as if it had arrived
        at the full queue."""
        self.queue.remove(victim.ticket)
        self.om.waiting(victim.model_id, victim.portal, -1)
        self.om.rejected(victim.model_id, victim.portal, "full")
        ticket = self._tickets.get(victim.ticket)
        if ticket is None:
            return
        ticket.error = NoCapacity(
            f"the queue for model {victim.model_id!r} is full ({self.config.max_queue} waiting): this request, "
            "last in line, gave its place to one served before it (a better priority class or a less served "
            "tenant)", retry_after=self._retry_after(victim.model_id, now), code="queue_full")
        ticket.done.set()

    def _retry_after(self, model_id: str, now: float) -> float:
        return self.queue.retry_after(model_id, now, default=self.config.retry_after,
                                      ceiling=self.config.retry_after_max)

    # --- admitting ----------------------------------------------------------------------------

    def pump(self, model_id: str) -> None:
        """Hand the free slots of ``model_id`` to its waiters, in queue order. No await."""
        if not self.queue.waiting(model_id):
            return
        links = [l for l in self.fleet.usable()
                 if (st := l.models.get(model_id)) is not None and st.state is ModelState.LOADED
                 and (l.node_id, model_id) not in self._draining]
        if not links:
            return
        slots = self._slots(model_id)
        now = trio.current_time()
        for waiter in self.queue.ordered(model_id):
            if slots and all(self.in_use(l.node_id, model_id) >= slots for l in links):
                return
            ticket = self._tickets.get(waiter.ticket)
            if ticket is None:
                continue
            p = ticket.pending
            nodes = [l.node_id for l in links]
            matches = self.prefix.matches(model_id, p.blocks, nodes) if p.blocks else None
            rooms = self.prefix.room(model_id, p.blocks, nodes) if p.blocks else None
            mine = slots_for(slots, waiter.priority, self.config.interactive_slots)  # none held for it if interactive
            state = snapshot(links, self.live, model_id=model_id, slots=mine, reserved=self.reserved,
                             matches=matches, rooms=rooms, session_node=self.prefix.session_node(model_id, p.session))
            exclude = excluded(p.failed, model_id, self.fleet) if p.failed else frozenset()
            decision = schedule(p.workload, Hints(model_id, exclude, blocks=len(p.blocks)), state,
                                max_skew=self._max_skew)
            if not decision.targets:
                continue  # the free neurons are ones this request failed on, or their free slots are held
            node_id = decision.targets[0]
            self.queue.take(waiter.ticket, now)
            key = (node_id, model_id)
            self.reserved[key] = self.reserved.get(key, 0) + 1
            waited = now - waiter.arrived
            ticket.node_id = node_id
            ticket.decision = replace(decision, mode="queue", waited=waited)
            self.om.waiting(model_id, waiter.portal, -1)
            self.om.admitted(model_id, waiter.portal, waited)
            self.metrics.queued(model_id, waited)
            ticket.done.set()

    def pump_all(self) -> None:
        for model_id in self.queue.models():
            self.pump(model_id)

    def fail(self, model_id: str, error: GatewayError, reason: str = "load_failed") -> None:
        """Every request waiting for ``model_id`` fails with ``error`` (its load failed, or
        the cortex is stopping: ``reason``, the rejection's label)."""
        for ticket in [t for t in self._tickets.values() if t.pending.model_id == model_id and not t.done.is_set()]:
            if self.queue.remove(ticket.waiter.ticket) is not None:
                self.om.waiting(model_id, ticket.waiter.portal, -1)
                self.om.rejected(model_id, ticket.waiter.portal, reason)
                ticket.error = error
                ticket.done.set()


async def _ticking(awaitable: Awaitable[None], on_tick: OnWait | None, status: Callable[[], WaitStatus],
                   interval: float) -> None:
    """Await ``awaitable``, calling ``on_tick(status())`` every ``interval`` seconds meanwhile."""
    if on_tick is None:
        await awaitable
        return
    async with trio.open_nursery() as nursery:
        async def ticker() -> None:
            while True:
                await trio.sleep(interval)
                await on_tick(status())

        nursery.start_soon(ticker)
        await awaitable
        nursery.cancel_scope.cancel()
