"""``accept`` failing for want of resources (the open-file limit, kernel memory): the
listener retries every 0.1 s, and says so once a minute, not ten times a second.

trio's ``serve_listeners`` logged each failed retry at ERROR with its traceback: with the
open-file limit reached, a cortex wrote some 15 lines per listener every 0.1 s (9,000 lines
in 25 s), a flood that buries what the operator needs to read and fills the disk the ledger
is on. Connections meanwhile wait in the kernel's accept queue; none is lost to the retry.
"""

from __future__ import annotations

import errno
import logging
import math
import resource
from collections.abc import Awaitable, Callable
from typing import Any

import trio

log = logging.getLogger(__name__)

RETRY = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
"""The errors after which ``accept`` is retried (0.1 s later) rather than raised."""

RETRY_AFTER = 0.1
"""Seconds between retries."""

WARN_EVERY = 60.0
"""Seconds between two warnings about one listener."""


class AcceptFailures:
    """Counts one listener's failed accepts and warns at most once per :data:`WARN_EVERY`."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.count = 0
        self._warned_at = -math.inf

    def note(self, exc: OSError, now: float) -> None:
        """Count ``exc`` (one of :data:`RETRY`), at ``now`` (seconds, any monotonic clock)."""
        self.count += 1
        if now - self._warned_at < WARN_EVERY:
            return
        self._warned_at = now
        name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
        hint = ""
        if exc.errno == errno.EMFILE:
            soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
            hint = f": the process's open-file limit ({soft}) is reached; raise it (LimitNOFILE, ulimit -n)"
        log.warning("%s: accept failed (%s%s); new connections wait in the kernel's queue, retried every %g s "
                    "(%d failures so far, this said at most once a minute)", self.where, name, hint, RETRY_AFTER,
                    self.count)


async def serve_listener(handler: Callable[[Any], Awaitable[None]], listener: trio.abc.Listener[Any], where: str,
                         handler_nursery: trio.Nursery) -> None:
    """trio's ``serve_listeners`` for one listener, but a failed accept is counted and said
    once a minute (:class:`AcceptFailures`) instead of logged with a traceback each retry."""
    failures = AcceptFailures(where)
    while True:
        try:
            stream = await listener.accept()
        except OSError as exc:
            if exc.errno not in RETRY:
                raise
            failures.note(exc, trio.current_time())
            await trio.sleep(RETRY_AFTER)
            continue
        handler_nursery.start_soon(handler, stream)
