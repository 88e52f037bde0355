"""The neuron's graceful stop, in one place and in order.

1. Refuse new work (as retryable, so the cortex sends it elsewhere).
2. Announce :class:`Shutdown` to the cortex, so it stops routing here.
3. Let in-flight requests finish, for at most the grace period; cancel what is left.
4. Unload every model.
5. Close the connection, so the neuron does not redial.

Every step waits on an event (the last request ending, an unload finishing) under its
own deadline, never on a polling loop; the whole drain is shielded from cancellation.
"""

from __future__ import annotations

import trio

from helexa.protocol import Shutdown

from .connection import Connection
from .registry import ModelRegistry
from .serving import Serving

ANNOUNCE_TIMEOUT = 2.0
"""How long the Shutdown announcement may take to send."""
MIN_UNLOAD_TIME = 5.0
"""Unloading gets the grace period, but at least this long."""


async def drain(
    connection: Connection, serving: Serving, registry: ModelRegistry, *, grace: float, reason: str
) -> None:
    """Stop the neuron gracefully (the steps in the module docstring). Returns when done;
    at most ``ANNOUNCE_TIMEOUT + grace + max(grace, MIN_UNLOAD_TIME)`` seconds plus the close."""
    with trio.CancelScope(shield=True):
        serving.stop_accepting()
        with trio.move_on_after(ANNOUNCE_TIMEOUT):
            await connection.try_send(Shutdown(reason, grace))
        with trio.move_on_after(grace):
            await serving.wait_idle()
        serving.cancel_all()
        with trio.move_on_after(max(grace, MIN_UNLOAD_TIME)):
            await registry.unload_all()
        await connection.close(reason)
