"""The neuron's graceful stop, in one place and in order.

1. Refuse new work (as retryable, so the cortex sends it elsewhere).
2. Announce :class:`Shutdown` to the cortex, so it stops routing here.
3. Let in-flight requests finish, for at most the grace period; stop what is left (each
   watched: one a model in this process cannot end within its ``cancel_grace`` marks the
   model failed, and its unload below does not wait on it any longer).
4. Unload every model, side by side; a model's processes not unloaded after
   :data:`KILL_AFTER` seconds (unloading still, their cancelled requests not ended yet, or
   still loading) are killed (SIGKILL: a hung worker would otherwise hold the stop for its whole
   ``unload_timeout``; an operator's unload of one model keeps it), so every backend ends
   unloaded, killed or failed.
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
KILL_AFTER = 3.0
"""Seconds a model's processes get to unload and exit at the neuron's stop before they are
killed (at most the unloading time above)."""


async def drain(
    connection: Connection, serving: Serving, registry: ModelRegistry, *, grace: float, reason: str
) -> None:
    """Stop the neuron gracefully (the steps in the module docstring). Returns when done;
    at most ``ANNOUNCE_TIMEOUT + grace + max(grace, MIN_UNLOAD_TIME, cancel_grace)`` seconds
    plus the close (``cancel_grace``: the longest of the models run in this process)."""
    with trio.CancelScope(shield=True):
        serving.stop_accepting()
        with trio.move_on_after(ANNOUNCE_TIMEOUT):
            await connection.try_send(Shutdown(reason, grace))
        with trio.move_on_after(grace):
            await serving.wait_idle()
        serving.cancel_all()
        unload_time = max(grace, MIN_UNLOAD_TIME)
        with trio.move_on_after(unload_time):
            await registry.unload_all(kill_after=min(KILL_AFTER, unload_time))
        await connection.close(reason)
