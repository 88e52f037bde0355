"""The cortex's graceful stop, written once (the seed's ``shutdown``).

The order, on SIGINT/SIGTERM or :meth:`~.node.Cortex.stop`:

1. **stop accepting**: the gateway's servers close their listeners and their idle
   keep-alive connections at once;
2. **let in-flight work finish**: HTTP requests being served get ``shutdown_grace``
   seconds, and the stop goes on as soon as none is left (:class:`InFlight` wakes it, no
   polling); the model requests still waiting or running after it are ended with a 503
   ``shutting_down`` (a stream already under way: its surface's error event, and a whole
   response), and get :data:`CUT_WAIT` more seconds to write it before the servers close
   the connections;
3. **tell the neurons**: each connected neuron gets ``Shutdown`` and its connection is
   closed, so it reconnects to whatever cortex comes back instead of waiting for a
   heartbeat timeout;
4. **close**: the caller cancels everything else (orchestrator housekeeping, the control
   server, the mesh) and closes its stores.

Each step is bounded, so a stop never hangs on a slow client or a silent neuron.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    from .control_server import ControlServer
    from .federation.service import Federation
    from .gateway import Gateway

log = logging.getLogger(__name__)

CUT_WAIT = 2.0
"""Seconds the requests ended at the grace's end get to write their error (the servers
keep their connections open this much longer than ``shutdown_grace``)."""


class InFlight:
    """A count of work in progress that can be waited on until it reaches zero.

    ``enter()`` / ``exit()`` around each piece of work; ``await wait_idle()`` returns when
    none is left (at once if none is running).
    """

    __slots__ = ("count", "_idle")

    def __init__(self) -> None:
        self.count = 0
        self._idle = trio.Event()
        self._idle.set()

    def enter(self) -> None:
        if self.count == 0:
            self._idle = trio.Event()
        self.count += 1

    def exit(self) -> None:
        self.count -= 1
        if self.count == 0:
            self._idle.set()

    async def wait_idle(self) -> None:
        await self._idle.wait()

    def __bool__(self) -> bool:
        return self.count > 0


async def drain(gateway: Gateway, control: ControlServer, *, grace: float, reason: str = "cortex stopping",
                federation: Federation | None = None) -> None:
    """Steps 1-3 of the stop (see the module docstring); shielded from cancellation so a
    second signal cannot cut it short, and bounded by ``grace`` plus a few seconds.

    Peers' requests being served (``federation``) are in-flight work like the gateway's:
    they get the same grace (new ones are refused ``busy``, so the asker tries another
    peer), and the cut ends their local generation as it ends the gateway's, so the asker
    gets the error and its signed receipt, not a stream reset (nor its neuron told to stop
    under it)."""
    with trio.CancelScope(shield=True):
        gateway.stop()
        peers = None
        if federation is not None:
            federation.stop_serving()
            peers = federation.inbound.in_flight

        async def all_idle() -> None:
            await gateway.in_flight.wait_idle()
            if peers is not None:
                await peers.wait_idle()

        with trio.move_on_after(grace) as waited:
            await all_idle()
        if waited.cancelled_caught:
            log.warning("%d request(s) still running after the %.0fs grace: ended with 503 shutting_down",
                        gateway.in_flight.count + (peers.count if peers is not None else 0), grace)
            gateway.cut()
            with trio.move_on_after(CUT_WAIT):
                await all_idle()
        await control.shutdown_neurons(reason, grace)
