"""How the cortex shares its open-file limit among the sockets strangers can fill.

Each listening socket of the gateway (every portal's, the admin socket) and the control
plane's pending handshakes (connections not yet joined: anyone who can reach the control
socket can open them) get an even share of the process's open-file soft limit, less what is
kept for the rest: the usage store and its journal, joined neurons, the mesh, log files
(256, or half of a limit under 512). Past its share a socket closes new connections at
accept, so a flood of idle connections on one of them cannot take the files another needs.
Before, the control plane admitted 1024 pending handshakes whatever the limit: under a
limit of 1024 some 700 idle connections to the control socket made ``accept`` fail
(``EMFILE``) on every portal and the admin API until their handshake deadline.
"""

from __future__ import annotations

import resource

RESERVE = 256
"""Open files kept for what is not a client connection."""

FLOOR = 4
"""The fewest connections a socket is given, however low the limit."""


def soft_limit() -> int | None:
    """The process's open-file soft limit, or None when unlimited."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return None if soft == resource.RLIM_INFINITY else soft


def share(limit: int | None, sockets: int) -> int:
    """The connections each of ``sockets`` may hold under an open-file ``limit`` (0: no
    limit). ``sockets`` counts the control plane's pending handshakes as one."""
    if limit is None:
        return 0
    reserve = min(RESERVE, limit // 2)
    return max(FLOOR, (limit - reserve) // max(1, sockets))
