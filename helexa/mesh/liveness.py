"""Liveness of a libp2p host's connected peers (py-libp2p 0.8.1).

A frozen process keeps its TCP connection open, so nothing but a probe notices it: every
connected peer is pinged each ``liveness_interval``, and one silent for
``liveness_timeout`` has its connection closed (and its direct-channel streams aborted),
which fails its streams at once; the mesh's supervisor then redials it. Pings go on one
kept libp2p stream per peer: a stream per ping cost its opening, negotiation and closing on
both sides every interval, and the ping protocol answers any number of pings on a stream.
"""

from __future__ import annotations

import logging
from typing import Any

import trio
from libp2p.host.ping import ID as PING_PROTOCOL
from libp2p.host.ping import perform_ping_roundtrip
from libp2p.peer.id import ID

from .direct_channel import DirectChannel
from .settings import MeshSettings

log = logging.getLogger(__name__)


class Liveness:
    """One prober per connected peer of ``host`` (see the module docstring).

    ``pings`` counts the pings answered, ``ping_streams`` the streams they were sent on,
    ``silent_peers_closed`` the connections closed for silence.
    """

    def __init__(self, own_id: ID, settings: MeshSettings, direct: DirectChannel | None) -> None:
        self._id = own_id
        self._settings = settings
        self._direct = direct
        self._probing: set[ID] = set()
        self.silent_peers_closed = 0
        self.pings = 0
        self.ping_streams = 0

    async def watch(self, host: Any, nursery: trio.Nursery) -> None:
        """Start a prober in ``nursery`` for every newly connected peer, checking each
        ``liveness_interval``; runs until cancelled."""
        while True:
            for pid in host.get_connected_peers():
                if pid not in self._probing and pid != self._id:
                    self._probing.add(pid)
                    nursery.start_soon(self._probe, host, pid)
            await trio.sleep(self._settings.liveness_interval)

    async def _probe(self, host: Any, pid: ID) -> None:
        s = self._settings
        stream = None
        try:
            while pid in host.get_connected_peers():
                started = trio.current_time()
                answered = False
                with trio.move_on_after(s.liveness_timeout):
                    try:
                        stream = await self._ping(host, pid, stream)
                        answered = True
                    except Exception as exc:  # a broken connection: the supervisor redials
                        log.debug("mesh: ping of %s failed: %s", pid, exc)
                        return
                if not answered:
                    self.silent_peers_closed += 1
                    log.warning("mesh: peer %s did not answer a ping within %.1fs: closing its connection",
                                pid.to_base58(), s.liveness_timeout)
                    with trio.move_on_after(2) as scope:
                        scope.shield = True
                        try:
                            if self._direct is not None:
                                await self._direct.abort_peer(pid.to_base58())
                            await host.disconnect(pid)
                        except Exception:
                            log.debug("mesh: closing %s failed", pid, exc_info=True)
                    return
                await trio.sleep(max(0.0, s.liveness_interval - (trio.current_time() - started)))
        finally:
            self._probing.discard(pid)
            if stream is not None:
                await reset_quietly(stream)

    async def _ping(self, host: Any, pid: ID, stream: Any) -> Any:
        """One ping on ``stream`` (the last probe's), else on a new one; returns it for the next."""
        if stream is not None:
            try:
                await perform_ping_roundtrip(stream)
                self.pings += 1
                return stream
            except Exception:  # the peer dropped it (its handler's idle limit): a new one decides
                await reset_quietly(stream)
        stream = await host.new_stream(pid, [PING_PROTOCOL])
        self.ping_streams += 1
        try:
            await perform_ping_roundtrip(stream)
        except BaseException:
            await reset_quietly(stream)
            raise
        self.pings += 1
        return stream


async def reset_quietly(stream: Any) -> None:
    """Reset a libp2p stream within a second, shielded; never raises."""
    with trio.move_on_after(1) as scope:
        scope.shield = True
        try:
            await stream.reset()
        except Exception:
            pass
