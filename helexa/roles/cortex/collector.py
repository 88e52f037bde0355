"""The cortex process's garbage-collector settings.

A cortex holds thousands of long-lived objects per thousand neurons (links, tasks,
sockets) and, every second, each neuron's heartbeat replaces a handful of small ones. With
CPython's default thresholds (a young collection every 700 net allocations) a join storm
or a large fleet spent about a fifth of the cortex's CPU in the collector, walking the
same long-lived objects again and again (``docs/reliability.md``, "Join storms").
Reference counting frees almost everything here; the cyclic collector only needs to find
the occasional cycle (an exception's traceback, a cancelled task's frame), so it runs
less often.
"""

from __future__ import annotations

import gc

YOUNG_THRESHOLD = 50_000
"""Net allocations between young collections (CPython's default: 700)."""

MIDDLE_EVERY = 20
"""Young collections per middle-generation collection (default: 10)."""

OLD_EVERY = 10
"""Middle collections per full collection, which CPython also skips until the objects
promoted since the last one are a quarter of the old generation (default: 10)."""


def tune() -> None:
    """Set the thresholds, and move everything alive now (modules, classes, the
    configuration: what the process imported and built to start) out of the collector's
    sight for good, so a full collection walks only what came after."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG_THRESHOLD, MIDDLE_EVERY, OLD_EVERY)
