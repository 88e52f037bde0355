"""Who may start a control-plane handshake: a cap on pending handshakes, and a per-address
throttle on failed join proofs. Pure bookkeeping over a time the caller passes in (trio's
clock in the server, any number in tests); no I/O.

- :class:`PendingHandshakes`: a connection counts from its TCP accept until its join
  verdict. Past its limit the listener turns new connections away at once (``503`` on a
  plain socket, then closed; the neuron redials on its backoff), so a flood of
  half-open connections costs the cortex at most ``limit`` sockets and tasks; each still
  ends at its handshake deadline. The limit halves while handshakes finish late.
- :class:`FailedJoins`: every refused join proof from an address adds one to that
  address's level, which drains at ``per_minute``; at ``burst`` the address is refused
  at once (its connections are closed before a hello is read) until the level drains
  below it. A wrong token cannot be guessed at line rate, and one noisy address does not
  slow anyone else.
- :class:`ReadBudget`: the bytes read from connections not yet joined, all of them
  together. Each may send frames of at most the pre-join frame limit (1 MiB), but a
  thousand pending ones at that limit would hold a gigabyte; past the budget a pending
  connection is closed "try again later" instead of read further.
"""

from __future__ import annotations

from collections import OrderedDict


class PendingHandshakes:
    """Connections accepted but not yet joined, by ``"addr:port"``, under a limit that
    shrinks while handshakes finish late.

    A handshake's time (accept to verdict) is reported through :meth:`finished`. One that
    took more than half of ``stale_after`` (the neuron's deadline runs from its connect,
    before the accept) halves the number admitted at once, at most once per quarter of
    ``stale_after`` and never below ``floor``; each one on time raises it by one, up to
    ``limit``. So a cortex that cannot finish what it admitted in time admits fewer, and
    those it turns away redial on their backoff, instead of all missing their deadline
    while their redials refill the queue.

    Args:
        limit: the most pending at once.
        stale_after: the handshake deadline, in seconds; an entry nobody released is
            forgotten after it (by then its connection was closed, if it never upgraded;
            one that did is in its join, which has its own deadline). So a flood holds at
            most ``limit`` connections before their upgrade and ``limit`` in their join.
        floor: the fewest the shrinking limit still admits at once.
    """

    def __init__(self, limit: int, stale_after: float, *, floor: int = 32) -> None:
        self.limit = limit
        self.stale_after = stale_after
        self.floor = min(floor, limit)
        self.allowed = limit
        self._since: OrderedDict[str, float] = OrderedDict()  # oldest first
        self._last_cut = float("-inf")
        self.refused = 0
        self.late = 0

    def __len__(self) -> int:
        return len(self._since)

    def admit(self, remote: str, now: float) -> bool:
        """Count ``remote`` as pending; False (and counted in ``refused``) when full."""
        while self._since:
            oldest, since = next(iter(self._since.items()))
            if now - since < self.stale_after:
                break
            del self._since[oldest]
        if len(self._since) >= self.allowed:
            self.refused += 1
            return False
        self._since[remote] = now
        self._since.move_to_end(remote)
        return True

    def finished(self, remote: str, now: float) -> None:
        """``remote``'s handshake ended (a verdict, or the connection went away) at ``now``:
        release it and adjust the limit by how long it took (idempotent)."""
        since = self._since.pop(remote, None)
        if since is None:
            return
        if now - since > self.stale_after / 2:
            self.late += 1
            if now - self._last_cut >= self.stale_after / 4:
                self.allowed = max(self.floor, self.allowed // 2)
                self._last_cut = now
        elif self.allowed < self.limit:
            self.allowed += 1

    def release(self, remote: str) -> None:
        """``remote`` went away or was turned away unheard (idempotent; no timing)."""
        self._since.pop(remote, None)


BLOCKED_NOW = 0.001
"""The wait :meth:`FailedJoins.retry_after` says for a level at the burst exactly: blocked
now, heard again as soon as any of it drains."""


class FailedJoins:
    """A leaky bucket of refused join proofs per address.

    Args:
        burst: failures in a row an address may have before it is blocked.
        per_minute: how fast its level drains (failures forgiven per minute).
        capacity: the most addresses remembered (the least recently failed go first).
    """

    def __init__(self, burst: int, per_minute: float, capacity: int = 65536) -> None:
        self.burst = burst
        self.rate = per_minute / 60.0
        self.capacity = capacity
        self._level: OrderedDict[str, tuple[float, float]] = OrderedDict()  # addr -> (level, at)

    def _now_level(self, addr: str, now: float) -> float:
        entry = self._level.get(addr)
        if entry is None:
            return 0.0
        level, at = entry
        return max(0.0, level - (now - at) * self.rate)

    def retry_after(self, addr: str, now: float) -> float:
        """0 when ``addr`` may try to join; else the seconds until it may: until its level
        drains under the burst (at least :data:`BLOCKED_NOW`, when it is at the burst exactly)."""
        level = self._now_level(addr, now)
        if level < self.burst:
            return 0.0
        return max((level - self.burst) / self.rate, BLOCKED_NOW)

    def failed(self, addr: str, now: float) -> None:
        """Record one refused join proof from ``addr``."""
        self._level[addr] = (self._now_level(addr, now) + 1.0, now)
        self._level.move_to_end(addr)
        if len(self._level) > self.capacity:
            self._level.popitem(last=False)

    def __len__(self) -> int:
        return len(self._level)


def host_of(remote: str) -> str:
    """The address part of ``"addr:port"`` (``"[::1]:5"`` and ``"::1:5"`` give ``"::1"``)."""
    host, sep, port = remote.rpartition(":")
    if not sep or not port.isdigit():
        return remote
    return host.strip("[]")


class ReadBudget:
    """Bytes read so far by connections whose join is not admitted yet, all together, under
    ``limit``. A connection takes what it reads (:meth:`room` first, then :meth:`take`) and
    gives it all back when it is admitted or ends (:meth:`give`); what a pending handshake
    holds is at most what it read, so the cortex holds at most ``limit`` bytes for strangers.
    """

    __slots__ = ("limit", "used", "refused")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.refused = 0
        """Reads refused because the budget was spent."""

    def room(self) -> int:
        return self.limit - self.used

    def take(self, n: int) -> None:
        self.used += n

    def give(self, n: int) -> None:
        self.used -= n
