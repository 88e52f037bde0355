"""Cancelling a request whose client went away, without a task per short request.

ASGI says a client left only through ``receive()`` returning ``http.disconnect``, so
noticing it needs a task blocked in ``receive()`` beside the handler. Opening a nursery and
starting that task for every request was a measured share of a short request's cost
(``docs/benchmarks.md``, "How the fabric got here"), and a request answered in a
millisecond has nothing worth cancelling. So a request
registers here under its own cancel scope; one sweeper task starts a watcher only for
requests still running after ``grace`` seconds, and that watcher cancels the scope if the
client disconnects. A client that leaves in the first ``grace`` seconds is noticed when
the watcher starts (its ``http.disconnect`` is already waiting), so the neuron is told to
stop at most ``grace`` later than with a watcher per request.

A request registering never wakes the sweeper: it only sets the deadline of the sweeper's
wait, when none is set, to its own start plus ``grace``. Waking the sweeper at once put a
pass of its loop on every request's path to the neuron (the websocket's write yields to
tasks that are ready to run, so that they can join it; the sweeper was one), and the
sweep itself is due only ``grace`` later.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any

import trio

log = logging.getLogger(__name__)

Receive = Callable[[], Awaitable[dict[str, Any]]]


class Watched:
    """One registered request (returned by :meth:`DisconnectWatch.add`)."""

    __slots__ = ("receive", "scope", "since", "done")

    def __init__(self, receive: Receive, scope: trio.CancelScope, since: float) -> None:
        self.receive = receive
        self.scope = scope
        self.since = since
        self.done = False


class DisconnectWatch:
    """Watches requests that run longer than ``grace`` seconds for client disconnects.

    Usage: ``with trio.CancelScope() as scope: w = watch.add(receive, scope); try: ...
    finally: watch.discard(w)``. :meth:`run` must be running (in the gateway's nursery).
    """

    def __init__(self, grace: float = 0.05) -> None:
        self.grace = grace
        self._pending: set[Watched] = set()
        self._wait: trio.CancelScope | None = None
        """The sweeper's wait for its next sweep (None while it sweeps, or before :meth:`run`)."""
        self._due = math.inf
        """That wait's deadline (kept here: reading a scope's deadline back costs a call)."""
        self._now: Callable[[], float] = trio.current_time
        """The clock; once :meth:`run` runs, the run's own (two Python calls per request
        instead of four)."""

    def add(self, receive: Receive, scope: trio.CancelScope) -> Watched:
        watched = Watched(receive, scope, self._now())
        self._pending.add(watched)
        if self._due == math.inf and self._wait is not None:  # the sweeper waits with no sweep due
            self._wait.deadline = self._due = watched.since + self.grace
        return watched

    def discard(self, watched: Watched) -> None:
        watched.done = True
        self._pending.discard(watched)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Sweep until cancelled: each request still registered ``grace`` seconds after it
        started gets its watcher then."""
        self._now = now = trio.lowlevel.current_clock().current_time
        async with trio.open_nursery() as nursery:
            task_status.started()
            swept = -math.inf
            while True:
                # The next sweep is due when the oldest request left reaches its grace, and
                # no sooner than a grace after the last (under load, one sweep per grace
                # watches every request within two graces of its start). With none left it
                # waits with no deadline, which the next request to register sets: add().
                oldest = min((w.since for w in self._pending), default=math.inf)
                self._due = max(oldest, swept) + self.grace if oldest < math.inf else math.inf
                with trio.CancelScope(deadline=self._due) as self._wait:
                    await trio.sleep_forever()
                self._wait = None
                swept = now()
                due = swept - self.grace
                for watched in [w for w in self._pending if w.since <= due]:
                    self._pending.discard(watched)
                    nursery.start_soon(self._watch, watched)

    @staticmethod
    async def _watch(watched: Watched) -> None:
        try:
            while (await watched.receive())["type"] != "http.disconnect":
                pass
        except Exception as exc:  # a server that fails receive() after the response: nothing to watch
            log.debug("disconnect watch ended: %r", exc)
            return
        if not watched.done:
            log.debug("client went away: cancelling its request")
            watched.scope.cancel()
