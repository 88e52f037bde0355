"""Who may start a control-plane handshake: a cap on pending handshakes, and a per-address
throttle on failed join proofs. Pure bookkeeping over a time the caller passes in (trio's
clock in the server, any number in tests); no I/O.

- :class:`PendingHandshakes`: a connection counts from its TCP accept until its join
  verdict. Past the limit (``max_pending_handshakes``, lowered while joins finish late)
  the listener turns new connections away at once (``503`` on a
  plain socket, then closed; the neuron redials on its backoff), so a flood of
  half-open connections costs the cortex at most ``limit`` sockets and tasks; each still
  ends at its handshake deadline.
- :class:`FailedJoins`: every refused join proof from an address adds one to that
  address's level, which drains at ``per_minute``; at ``burst`` the address is refused
  at once (its connections are closed before a hello is read) until the level drains
  below it. A wrong token cannot be guessed at line rate, and one noisy address does not
  slow anyone else.
"""

from __future__ import annotations

from collections import OrderedDict


class PendingHandshakes:
    """Connections accepted but not yet joined, by ``"addr:port"``, under a limit that adapts
    to how fast joins finish.

    The limit starts at ``limit``. A join that took longer than ``target`` (from accept to
    welcome) halves it, at most once per ``target`` seconds, down to ``floor``; each join
    faster than that raises it by one, back up to ``limit``. So when the cortex is short of
    CPU (a restarted cortex under its whole fleet, whose heartbeats come back with every
    join), it takes only as many handshakes as it finishes in time and turns the rest away
    at once, cheaply, to redial on their backoff; accepting them all made every handshake
    late, the neurons gave up at their deadline, and the work done for them was wasted (in
    a 5,000-neuron storm, 24,000 handshakes timed out against 2,300 joins). Only joins
    move the limit: a connection that never proves the token cannot slow anyone down.

    Args:
        limit: the most pending at once (also the adaptive limit's ceiling).
        stale_after: seconds after which an entry nobody released is forgotten: the
            handshake deadline, by which a connection that never upgraded is closed (one
            that did is in its join, which has its own deadline). So a flood holds at most
            ``limit`` connections before their upgrade and ``limit`` in their join.
        target: a join slower than this lowers the limit (default: a quarter of
            ``stale_after``, well inside the neuron's own handshake deadline).
        floor: the lowest the limit goes.
    """

    def __init__(self, limit: int, stale_after: float, *, target: float | None = None, floor: int = 16) -> None:
        self.ceiling = limit
        self.limit = limit
        self.stale_after = stale_after
        self.target = target if target is not None else stale_after / 4
        self.floor = min(floor, limit)
        self._since: OrderedDict[str, float] = OrderedDict()  # oldest first
        self._last_cut = float("-inf")
        self.refused = 0

    def __len__(self) -> int:
        return len(self._since)

    def admit(self, remote: str, now: float) -> bool:
        """Count ``remote`` as pending; False (and counted in ``refused``) when full."""
        while self._since:
            oldest, since = next(iter(self._since.items()))
            if now - since < self.stale_after:
                break
            del self._since[oldest]
        if len(self._since) >= self.limit:
            self.refused += 1
            return False
        self._since[remote] = now
        self._since.move_to_end(remote)
        return True

    def release(self, remote: str) -> None:
        """``remote`` was refused, failed or went away (idempotent)."""
        self._since.pop(remote, None)

    def joined(self, remote: str, now: float) -> None:
        """``remote`` joined: released, and its handshake's duration adapts the limit."""
        since = self._since.pop(remote, None)
        if since is None:
            return
        if now - since <= self.target:
            self.limit = min(self.ceiling, self.limit + 1)
        elif now - self._last_cut >= self.target:
            self.limit = max(self.floor, self.limit // 2)
            self._last_cut = now


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
        """0 when ``addr`` may try to join; else the seconds until it may."""
        level = self._now_level(addr, now)
        if level < self.burst:
            return 0.0
        return (level - self.burst + 1) / self.rate

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
