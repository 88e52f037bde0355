"""The admission queue: requests that cannot start yet, in the order they will start.

Pure: plain data in, plain data out, the time always passed in, so that every policy is
tested synchronously. The orchestrator's shell wakes the waiting tasks.

Order, per model:

1. **Priority class** strictly: every ``interactive`` waiter before any ``normal`` one,
   every ``normal`` before any ``bulk`` (an unknown class counts as ``normal``).
2. **Fair share between portals** within a class: each portal's service is counted in
   virtual time (one request served costs ``1 / weight``) and the portal least served goes
   next, so one portal's burst cannot starve another's trickle, and a portal of weight 2
   gets twice the turns of a portal of weight 1 while both wait. A portal that was idle
   starts at the class's current virtual time (it banks no credit while away).
3. **Fair share between keys** of one portal, the same way (equal weights).
4. **Arrival order** for one key.

**A full queue** (``max_waiting`` for a model) does not turn away a request that would be
served before the last one waiting: that last one (the worst class, the tenant most
served) is pushed out instead (:meth:`FairQueue.displace`), so one tenant's flood fills
the queue only until another tenant, or a better class, arrives; the flood's own next
request, last in its key's order, is refused.

A waiter leaves by being served (:meth:`FairQueue.pop`, or :meth:`FairQueue.take` when
the orchestrator serves it out of order because the neurons free for the head cannot take
it), by giving up (:meth:`FairQueue.remove`) or at its deadline (:meth:`FairQueue.expire`).
The queue also measures how fast it drains (:meth:`FairQueue.drain_rate`), which gives the
wait estimates shown to clients and the ``Retry-After`` of a refusal.
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass, field

PRIORITIES = ("interactive", "normal", "bulk")
"""Priority classes, first served first."""
DRAIN_WINDOW = 32
"""Services remembered per model for the drain rate."""
DRAIN_HORIZON = 300.0
"""Services older than this (seconds) no longer count toward the drain rate."""


def rank(priority: str) -> int:
    """The class's place in :data:`PRIORITIES` (unknown names count as ``normal``)."""
    try:
        return PRIORITIES.index(priority)
    except ValueError:
        return 1


@dataclass(frozen=True, slots=True)
class Waiter:
    """One request waiting for ``model_id``: who it is for, and until when it may wait."""

    ticket: int
    model_id: str
    portal: str = "default"
    key: str = ""
    priority: int = 1  # rank(...)
    weight: float = 1.0
    arrived: float = 0.0
    deadline: float = float("inf")


@dataclass(frozen=True, slots=True)
class Demand:
    """The queue for one model, summed up for placement decisions."""

    model_id: str
    waiting: int
    oldest: float  # arrival time of the longest waiter
    priority: int  # the best class waiting
    arrived_sum: float | None = None  # their arrival times summed: they have waited waiting * now - this
    rate: float = 0.0  # recent requests per second (the provisioner fills it in)
    load_time: float | None = None  # its last measured load, seconds (likewise)


_KEYS_KEPT = 1024
"""Keys' virtual times kept per class before those no longer needed are forgotten."""


@dataclass
class _Class:
    """One priority class of one model's queue."""

    waiting: dict[str, dict[str, deque[Waiter]]] = field(default_factory=dict)  # portal -> key -> FIFO
    portal_vt: dict[str, float] = field(default_factory=dict)
    key_vt: dict[tuple[str, str], float] = field(default_factory=dict)
    weight: dict[str, float] = field(default_factory=dict)
    clock: float = 0.0  # the virtual time of the last portal served
    key_clock: dict[str, float] = field(default_factory=dict)
    prune_at: int = _KEYS_KEPT

    def push(self, w: Waiter) -> None:
        keys = self.waiting.get(w.portal)
        if keys is None:
            keys = self.waiting[w.portal] = {}
            self.portal_vt[w.portal] = max(self.portal_vt.get(w.portal, 0.0), self.clock)
        fifo = keys.get(w.key)
        if fifo is None:
            if len(self.key_vt) >= self.prune_at:
                self._prune()
            fifo = keys[w.key] = deque()
            k = (w.portal, w.key)
            self.key_vt[k] = max(self.key_vt.get(k, 0.0), self.key_clock.get(w.portal, 0.0))
        self.weight[w.portal] = w.weight if w.weight > 0 else 1.0
        fifo.append(w)

    def _prune(self) -> None:
        """Forget the virtual times of keys not waiting that their portal's clock passed
        (such a key comes back at the clock, as a new one would): each key that ever
        waited was kept, for good."""
        for (portal, key), vt in list(self.key_vt.items()):
            if key not in self.waiting.get(portal, ()) and vt <= self.key_clock.get(portal, 0.0):
                del self.key_vt[(portal, key)]
        self.prune_at = max(_KEYS_KEPT, 2 * len(self.key_vt))  # amortised: not a scan per request

    def head(self) -> tuple[str, str] | None:
        """The (portal, key) served next, without serving it."""
        best = None
        for portal, keys in self.waiting.items():
            first = min(fifo[0].ticket for fifo in keys.values())
            cand = (self.portal_vt[portal], first, portal)
            if best is None or cand < best:
                best = cand
        if best is None:
            return None
        portal = best[2]
        keys = self.waiting[portal]
        key = min(keys, key=lambda k: (self.key_vt[(portal, k)], keys[k][0].ticket))
        return portal, key

    def serve(self, portal: str, key: str, waiter: Waiter) -> None:
        """Charge ``portal`` and ``key`` for serving ``waiter`` and take it out."""
        self.clock = max(self.clock, self.portal_vt[portal])
        self.key_clock[portal] = max(self.key_clock.get(portal, 0.0), self.key_vt[(portal, key)])
        self.portal_vt[portal] += 1.0 / self.weight.get(portal, 1.0)
        self.key_vt[(portal, key)] += 1.0
        self.discard(waiter)

    def discard(self, w: Waiter) -> None:
        keys = self.waiting[w.portal]
        fifo = keys[w.key]
        fifo.remove(w)
        if not fifo:
            del keys[w.key]
        if not keys:
            del self.waiting[w.portal]

    def copy(self) -> "_Class":
        return _Class({p: {k: deque(f) for k, f in keys.items()} for p, keys in self.waiting.items()},
                      dict(self.portal_vt), dict(self.key_vt), dict(self.weight), self.clock, dict(self.key_clock))


def _class_of(w: Waiter) -> int:
    return min(max(w.priority, 0), len(PRIORITIES) - 1)


class _ModelQueue:
    def __init__(self) -> None:
        self.classes = [_Class() for _ in PRIORITIES]
        self.count = 0
        self.version = 0
        self.order: tuple[int, list[Waiter]] | None = None  # (version, order) cache

    def next(self) -> Waiter | None:
        for c in self.classes:
            pk = c.head()
            if pk is not None:
                return c.waiting[pk[0]][pk[1]][0]
        return None

    def ordered(self) -> list[Waiter]:
        if self.order is not None and self.order[0] == self.version:
            return self.order[1]
        out: list[Waiter] = []
        for c in self.classes:
            sim = c.copy()
            while (pk := sim.head()) is not None:
                w = sim.waiting[pk[0]][pk[1]][0]
                sim.serve(pk[0], pk[1], w)
                out.append(w)
        self.order = (self.version, out)
        return out


class FairQueue:
    """Waiting requests of every model (see the module docstring).

    Args:
        max_waiting: waiters per model; :meth:`push` refuses more.
    """

    def __init__(self, max_waiting: int = 1000) -> None:
        self.max_waiting = max_waiting
        self._models: dict[str, _ModelQueue] = {}
        self._waiters: dict[int, Waiter] = {}
        self._deadlines: list[tuple[float, int]] = []
        self._served: dict[str, deque[float]] = {}

    # --- arriving and leaving ---------------------------------------------------------------

    def push(self, w: Waiter) -> bool:
        """Queue ``w``; False (and nothing queued) when its model's queue is full."""
        q = self._models.get(w.model_id)
        if q is None:
            q = self._models[w.model_id] = _ModelQueue()
        if q.count >= self.max_waiting:
            return False
        q.classes[_class_of(w)].push(w)
        q.count += 1
        q.version += 1
        self._waiters[w.ticket] = w
        heapq.heappush(self._deadlines, (w.deadline, w.ticket))
        return True

    def displace(self, w: Waiter) -> Waiter | None:
        """For ``w`` arriving at a full queue: the waiter it pushes out, the one that would
        then be served last, or None when that is ``w`` itself (refuse ``w``). Only reads:
        the caller removes the waiter returned and pushes ``w``."""
        q = self._models.get(w.model_id)
        if q is None or not q.count:
            return None
        last = q.ordered()[-1]
        cls = _class_of(w)
        if cls != _class_of(last):
            return last if cls < _class_of(last) else None
        if (w.portal, w.key) == (last.portal, last.key):
            return None  # after every waiter of its own key: last
        sim = q.classes[cls].copy()
        sim.push(w)
        out = None
        while (pk := sim.head()) is not None:
            out = sim.waiting[pk[0]][pk[1]][0]
            sim.serve(pk[0], pk[1], out)
        return None if out is None or out.ticket == w.ticket else out

    def pop(self, model_id: str, now: float) -> Waiter | None:
        """Serve the next waiter for ``model_id`` (None when nobody waits)."""
        w = self.peek(model_id)
        if w is not None:
            self.take(w.ticket, now)
        return w

    def take(self, ticket: int, now: float) -> Waiter | None:
        """Serve ``ticket`` now, whatever its place (its portal and key are charged as if it
        had been next), and count it toward the drain rate."""
        w = self._waiters.pop(ticket, None)
        if w is None:
            return None
        q = self._models[w.model_id]
        c = q.classes[_class_of(w)]
        c.serve(w.portal, w.key, w)
        self._left(q, w.model_id)
        served = self._served.setdefault(w.model_id, deque(maxlen=DRAIN_WINDOW))
        served.append(now)
        return w

    def remove(self, ticket: int) -> Waiter | None:
        """Take ``ticket`` out unserved (it gave up, or was refused)."""
        w = self._waiters.pop(ticket, None)
        if w is None:
            return None
        q = self._models[w.model_id]
        q.classes[_class_of(w)].discard(w)
        self._left(q, w.model_id)
        return w

    def _left(self, q: _ModelQueue, model_id: str) -> None:
        q.count -= 1
        q.version += 1
        if q.count == 0:
            del self._models[model_id]

    def expire(self, now: float) -> list[Waiter]:
        """Take out (unserved) and return every waiter whose deadline is ``now`` or before."""
        out = []
        while self._deadlines and self._deadlines[0][0] <= now:
            _, ticket = heapq.heappop(self._deadlines)
            w = self.remove(ticket)
            if w is not None:
                out.append(w)
        return out

    def next_deadline(self) -> float | None:
        """The earliest deadline of anyone still waiting."""
        while self._deadlines and self._deadlines[0][1] not in self._waiters:
            heapq.heappop(self._deadlines)
        return self._deadlines[0][0] if self._deadlines else None

    # --- reading ----------------------------------------------------------------------------

    def peek(self, model_id: str) -> Waiter | None:
        q = self._models.get(model_id)
        return q.next() if q is not None else None

    def ordered(self, model_id: str) -> list[Waiter]:
        """``model_id``'s waiters in the order they would be served if nothing changed."""
        q = self._models.get(model_id)
        return list(q.ordered()) if q is not None else []

    def position(self, ticket: int) -> int | None:
        """1 = served next; None when ``ticket`` is not waiting."""
        w = self._waiters.get(ticket)
        if w is None:
            return None
        for i, other in enumerate(self._models[w.model_id].ordered(), 1):
            if other.ticket == ticket:
                return i
        return None

    def waiting(self, model_id: str | None = None) -> int:
        if model_id is None:
            return len(self._waiters)
        q = self._models.get(model_id)
        return q.count if q is not None else 0

    def __contains__(self, ticket: object) -> bool:
        return ticket in self._waiters

    def models(self) -> list[str]:
        """Models someone waits for."""
        return list(self._models)

    def demand(self) -> dict[str, Demand]:
        """Per model: how many wait, since when, and the best class waiting."""
        out = {}
        for model_id, q in self._models.items():
            ws = [w for c in q.classes for keys in c.waiting.values() for fifo in keys.values() for w in fifo]
            out[model_id] = Demand(model_id, q.count, min(w.arrived for w in ws), min(w.priority for w in ws),
                                   sum(w.arrived for w in ws))
        return out

    def drain_rate(self, model_id: str, now: float) -> float | None:
        """Requests served from ``model_id``'s queue per second, over its last services
        (None until two were seen within :data:`DRAIN_HORIZON`). Once the next service is
        overdue by more than the mean interval, the rate falls with the time waited, so a
        queue that stopped draining shows it."""
        served = self._served.get(model_id)
        if not served:
            return None
        recent = [t for t in served if now - t <= DRAIN_HORIZON]
        if len(recent) < 2:
            return None
        n = len(recent) - 1
        span = recent[-1] - recent[0]
        if span <= 0:
            return None
        return n / max(span, (now - recent[0]) - span / n)

    def eta(self, model_id: str, position: int, now: float) -> float | None:
        """Seconds until the waiter at ``position`` is served, at the measured drain rate."""
        rate = self.drain_rate(model_id, now)
        return position / rate if rate else None

    def retry_after(self, model_id: str, now: float, *, default: float, ceiling: float) -> float:
        """What a refusal's ``Retry-After`` says: the time for the queue ahead (and one
        more) to drain at the measured rate, within [1, ``ceiling``]; ``default`` before any
        rate is known."""
        rate = self.drain_rate(model_id, now)
        if not rate:
            return default
        return min(ceiling, max(1.0, (self.waiting(model_id) + 1) / rate))
