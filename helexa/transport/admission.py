"""Who may start a control-plane handshake: a cap on pending handshakes, and a per-address
throttle on failed join proofs. Pure bookkeeping over a time the caller passes in (trio's
clock in the server, any number in tests); no I/O.

- :class:`PendingHandshakes`: a connection counts from its TCP accept until its join
  verdict. Past ``limit`` the listener turns new connections away at once (``503`` on a
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
    """Connections accepted but not yet joined, by ``"addr:port"``.

    Args:
        limit: the most pending at once.
        stale_after: seconds after which an entry nobody released is forgotten: the
            handshake deadline, by which a connection that never upgraded is closed (one
            that did is in its join, which has its own deadline). So a flood holds at most
            ``limit`` connections before their upgrade and ``limit`` in their join.
    """

    def __init__(self, limit: int, stale_after: float) -> None:
        self.limit = limit
        self.stale_after = stale_after
        self._since: OrderedDict[str, float] = OrderedDict()  # oldest first
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
        """``remote`` joined, was refused or went away (idempotent)."""
        self._since.pop(remote, None)


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
