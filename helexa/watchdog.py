"""Silence a watchdog could not have observed is not the watched side's silence.

A watchdog judges another party (a neuron's heartbeats at the cortex, a worker's pings at
its neuron) by how long it has been silent. When the watchdog's own process stops running
for a while (``SIGSTOP``, a paused VM, a machine starved of CPU or swapping), everything the
other side sent meanwhile sits unread in a socket buffer, and the first check after the
stall would find a silence of the whole stall and kill or drop a party that did nothing
wrong (a frozen neuron killed its healthy worker on resuming; a frozen cortex dropped its
neurons and failed their requests). :func:`excuse_stall` moves the last time heard forward
by however much later than ``max_gap`` the check ran, so only silence the watchdog was
awake to see counts; the readers then get the usual deadline to drain what arrived.
"""

from __future__ import annotations


def excuse_stall(last_heard: float, now: float, last_check: float, max_gap: float) -> float:
    """``last_heard`` moved forward by the time this check ran late, never past ``now``.

    Args:
        last_heard: when the watched party was last heard from.
        now: the time of this check.
        last_check: the time of the watchdog's previous check.
        max_gap: the longest a check waits for the next one when the watchdog runs as it should.
    """
    late = now - last_check - max_gap
    if late <= 0:
        return last_heard
    return min(now, last_heard + late)
