"""A child process's output, line by line, into a logger (a supervised server's, a worker's)."""

from __future__ import annotations

from collections.abc import Callable

import trio

MAX_LINE = 65536
"""A line longer than this without its end is logged as it stands."""


async def relay_lines(stream: trio.abc.ReceiveStream | None, emit: Callable[[str], None]) -> None:
    """Call ``emit`` with each non-empty line ``stream`` carries, until it ends."""
    if stream is None:
        return
    pending = b""
    async for data in stream:
        *lines, pending = (pending + data).split(b"\n")
        if len(pending) > MAX_LINE:
            lines.append(pending)
            pending = b""
        for line in lines:
            if line.strip():
                emit(line.decode(errors="replace").rstrip())
    if pending.strip():
        emit(pending.decode(errors="replace").rstrip())
