"""The fleet as the console pushes it: one compact JSON document, built at most a few
times a second and only while someone watches, shared by every watcher.

:class:`FleetFeed` wakes on the fleet's changes (a join, a leave, a model's state) and
every ``interval`` seconds (heartbeats carry CPU, memory and load progress without being
"changes"), builds the document once, and hands the same bytes to every subscriber. A
subscriber holds only the latest document: a slow browser skips states, it never makes
the cortex queue them. With no subscriber the feed sleeps and costs nothing.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import orjson
import trio

from ..fleet import OFFLINE, cached_only, health_view, key_view, online

if TYPE_CHECKING:
    from ..fleet import Fleet
    from ..provisioner import Provisioner


def neuron_view(link: Any, now: float, pins: set[tuple[str, str]], cached: list[str] | None = None) -> dict[str, Any]:
    """One neuron as the Fleet page shows it."""
    m = link.metrics
    hw = link.descriptor.hardware
    gpu_names = {g.index: g.name for g in hw.gpus}
    gpus = [{"index": g.index, "name": gpu_names.get(g.index, ""), "used": g.vram_used, "free": g.vram_free,
             "util": g.utilization} for g in m.gpus]
    if not gpus:  # no heartbeat yet: what the neuron reported at join
        gpus = [{"index": g.index, "name": g.name, "used": g.vram_total - g.vram_free, "free": g.vram_free,
                 "util": 0.0} for g in hw.gpus]
    models = []
    for mid, st in sorted(link.models.items()):
        state = st.state.value if online(link) else OFFLINE
        models.append({"id": mid, "state": state, "progress": st.progress, "in_flight": st.in_flight,
                       "memory": st.memory_bytes, "error": st.error, "pinned": (link.node_id, mid) in pins})
    return {"id": link.node_id, "health": health_view(link), "key": key_view(link), "host": link.descriptor.hostname,
            "version": link.descriptor.software.removeprefix("helexa ") or None,
            "heartbeat_age": round(max(0.0, now - link.last_heartbeat), 1), "cpu": round(m.cpu_percent, 1),
            "cores": hw.cpu_cores, "ram_used": m.ram_used, "ram_total": m.ram_total or hw.ram_total,
            "gpus": gpus, "in_flight": m.in_flight, "requests": link.in_flight, "models": models,
            "cached": cached or []}


def finite(value: Any) -> Any:
    """``value`` with every float that is not finite (NaN, infinity) replaced by None, in
    nested dicts and lists too."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


class FleetFeed:
    """Builds and broadcasts the fleet document (see the module docstring).

    Args:
        fleet: the live fleet.
        provisioner: for pins and loads in progress.
        interval: seconds between documents while nothing "changes".
        min_gap: the least time between two documents (a burst of joins is one update).
    """

    def __init__(self, fleet: Fleet, provisioner: Provisioner | None, *, interval: float = 1.0,
                 min_gap: float = 0.25, clock: Callable[[], float] = time.time) -> None:
        self.fleet = fleet
        self.provisioner = provisioner
        self.interval = interval
        self.min_gap = min_gap
        self.clock = clock
        self._subscribers: set[Subscription] = set()
        self.closed = False
        """Set by :meth:`close` (the cortex is stopping): every watcher's :meth:`Subscription.next`
        returns None from then on, so the event streams end instead of holding the stop."""
        self._wanted = trio.Event()
        self._dirty = trio.Event()
        self.latest: bytes = b""
        self.documents = 0
        """Documents built so far (the benchmark reads it)."""

    def document(self) -> bytes:
        """The fleet now, as the JSON the Fleet page renders."""
        now = self.clock()
        pins = ({(node, model) for model, nodes in self.provisioner.operator.pins().items() for node in nodes}
                if self.provisioner is not None else set())
        loading = dict(self.provisioner.load_progress) if self.provisioner is not None else {}
        catalogue = self.provisioner.catalogue if self.provisioner is not None else ()
        neurons = [neuron_view(link, now, pins, cached_only(link, catalogue))
                   for link in sorted(self.fleet, key=lambda l: l.node_id)]
        doc = {"at": now, "neurons": neurons,
               "loading": {k: {"stage": v[0], "progress": v[1]} for k, v in loading.items()}}
        # A neuron's figures arrive as it sends them: one NaN or infinity (a driver's bad
        # reading, a hostile neuron) would be a bare NaN that no browser parses as JSON, and
        # the whole Fleet page would stop. It goes out as null, which the page shows as "?"
        # (orjson writes null for them, and faster than json; json with finite() for what
        # orjson refuses).
        try:
            return orjson.dumps(doc)
        except TypeError:
            return json.dumps(finite(doc), separators=(",", ":"), allow_nan=False).encode()

    def close(self) -> None:
        """End every watch, now and later (the cortex is stopping)."""
        self.closed = True
        for sub in self._subscribers:
            sub._ready.set()

    def subscribe(self) -> Subscription:
        """A new watcher; use it as a context manager (it unsubscribes on exit)."""
        sub = Subscription(self)
        self._subscribers.add(sub)
        self._wanted.set()
        return sub

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Build and broadcast documents while anyone watches, until cancelled."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch_changes)
            task_status.started()
            while True:
                if not self._subscribers:
                    self._wanted = trio.Event()
                    await self._wanted.wait()
                self._dirty = trio.Event()
                self.latest = self.document()
                self.documents += 1
                for sub in self._subscribers:
                    sub.offer(self.latest)
                await trio.sleep(self.min_gap)
                with trio.move_on_after(max(0.0, self.interval - self.min_gap)):
                    await self._dirty.wait()

    async def _watch_changes(self) -> None:
        # Its own task, so a change during the gap between two documents is not missed.
        while True:
            await self.fleet.wait_changed()
            self._dirty.set()


class Subscription:
    """One watcher's slot: the newest document it has not taken yet."""

    def __init__(self, feed: FleetFeed) -> None:
        self.feed = feed
        self._pending: bytes | None = feed.latest or None
        self._ready = trio.Event()
        if self._pending is not None or feed.closed:
            self._ready.set()

    def offer(self, document: bytes) -> None:
        self._pending = document
        self._ready.set()

    async def next(self) -> bytes | None:
        """The newest document since the last call (waits for one); None once the feed is
        closed."""
        await self._ready.wait()
        if self.feed.closed:
            return None
        self._ready = trio.Event()
        doc, self._pending = self._pending, None
        assert doc is not None
        return doc

    def __enter__(self) -> "Subscription":
        return self

    def __exit__(self, *exc: object) -> None:
        self.feed._subscribers.discard(self)
