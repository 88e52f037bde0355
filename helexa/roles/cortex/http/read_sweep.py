"""The deadlines of reads between requests, kept by one sweeper task rather than a cancel
scope per read.

A keep-alive connection whose client has not sent its next request yet (at one
connection, every request) and a request head that has not arrived whole wait in a read
with a deadline: the keep-alive idle deadline, or the head's ``read_timeout``. A
``move_on_at`` around each such wait was a measured share of a request's Python calls
(``docs/benchmarks.md``, issue 17 item 2, branch fab6), for a deadline that nearly never
fires. So such a read registers here while it waits, and one sweeper, which sleeps until
the earliest registered deadline, closes the connections past theirs (:meth:`Reader.expire`:
the connection is told, and its task's scope is cancelled). When a burst of deadlines
falls close together the sweeps are at least ``quantum`` apart, so a deadline is kept at
most ``quantum`` late; a lone one, exactly.

A read within a request (the parts of a body the app waits for) keeps its own scope:
cancelling a connection's scope there would cancel the app too.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol

import trio


class Reader(Protocol):
    """A connection that waits in a read the sweep keeps the deadline of."""

    due: float
    """When its wait's deadline passes (``math.inf`` while it does not wait)."""

    def expire(self, now: float) -> None:
        """Its deadline passed: end the wait (and the connection)."""


class ReadSweep:
    """Ends the registered reads whose deadline passed (see the module docstring).

    Usage: ``reader.due = deadline; sweep.add(reader)``, wait, then ``sweep.discard(reader)``
    in a ``finally``. :meth:`run` must be running (in the server's nursery).

    Args:
        quantum: the least time between two sweeps, so the most a deadline is kept late.
    """

    def __init__(self, quantum: float) -> None:
        self.quantum = quantum
        self.waiting: set[Reader] = set()
        self._wait: trio.CancelScope | None = None
        """The sweeper's wait for its next sweep (None while it sweeps, or before :meth:`run`)."""
        self._due = math.inf
        """That wait's deadline (kept here: reading a scope's deadline back costs a call)."""
        self._swept = -math.inf
        self._now: Callable[[], float] = trio.current_time

    def add(self, reader: Reader) -> None:
        """``reader`` waits until ``reader.due``; the sweep's next wake comes no later (by
        up to ``quantum`` after the last sweep)."""
        self.waiting.add(reader)
        if reader.due < self._due and self._wait is not None:
            self._wait.deadline = self._due = max(reader.due, self._swept + self.quantum)

    def discard(self, reader: Reader) -> None:
        """``reader`` no longer waits."""
        self.waiting.discard(reader)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Sweep until cancelled."""
        self._now = now = trio.lowlevel.current_clock().current_time
        task_status.started()
        while True:
            earliest = min((r.due for r in self.waiting), default=math.inf)
            self._due = max(earliest, self._swept + self.quantum) if earliest < math.inf else math.inf
            with trio.CancelScope(deadline=self._due) as self._wait:
                await trio.sleep_forever()
            self._wait = None
            self._swept = swept = now()
            for reader in [r for r in self.waiting if r.due <= swept]:
                self.waiting.discard(reader)
                reader.expire(swept)
