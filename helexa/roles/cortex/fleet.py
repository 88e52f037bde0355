"""The cortex's live view of its neurons, and the handle used to send them work.

The control server (:mod:`helexa.roles.cortex.control_server`) owns the connections and
keeps a :class:`Fleet` up to date; everything else (gateway, provisioner, admin API) reads
it and acts through :class:`NeuronLink`.

Exception tree::

    FleetError
    ├── NeuronGone          the neuron disconnected (``started`` says whether any output
    │                       had already been produced for the request)
    ├── RemoteError         the neuron answered with an error (``code``, ``retryable``)
    └── CommandTimeout      no answer within the deadline
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

import trio

from helexa.protocol import (
    EmbedRequest,
    EmbedResult,
    GenerateRequest,
    GenerateResult,
    LoadProgress,
    ModelConfig,
    ModelStatus,
    NeuronDescriptor,
    NeuronMetrics,
    ProvisioningCommand,
    ProvisioningResponse,
    TokenChunk,
    to_wire,
)


class FleetError(Exception):
    code = "fleet_error"


class NeuronGone(FleetError):
    code = "neuron_gone"

    def __init__(self, message: str, *, started: bool = False) -> None:
        super().__init__(message)
        self.started = started


class RemoteError(FleetError):
    def __init__(self, code: str, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.retryable = retryable


class CommandTimeout(FleetError):
    code = "timeout"


class Health(enum.Enum):
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"  # missed heartbeats; no new work
    DRAINING = "draining"  # announced Shutdown; no new work


class NeuronLink(Protocol):
    """One joined neuron, as seen and driven by the cortex."""

    node_id: str
    descriptor: NeuronDescriptor
    health: Health
    metrics: NeuronMetrics
    models: dict[str, ModelStatus]
    configs: dict[str, ModelConfig]
    joined_at: float  # wall-clock seconds
    last_heartbeat: float  # wall-clock seconds
    in_flight: int

    async def provision(
        self,
        command: ProvisioningCommand,
        *,
        timeout: float,
        on_progress: Callable[[LoadProgress], None] | None = None,
    ) -> ProvisioningResponse:
        """Send a provisioning command and wait for its response.

        Raises:
            NeuronGone: the connection dropped first.
            CommandTimeout: no response within ``timeout`` seconds.
        """
        ...

    def generate(
        self, request: GenerateRequest
    ) -> AbstractAsyncContextManager[AsyncIterator[TokenChunk | GenerateResult]]:
        """Start a generation; the iterator yields chunks, then one result.

        Leaving the context before the result sends ``Cancel`` to the neuron. Iteration
        raises :class:`NeuronGone` or :class:`RemoteError`. Chunks are coalesced when the
        consumer falls behind, so a slow reader never blocks the connection.
        """
        ...

    async def embed(self, request: EmbedRequest, *, timeout: float) -> EmbedResult:
        ...


@dataclass
class Fleet:
    """All neurons currently joined (healthy or not). Mutated only by the control server."""

    links: dict[str, NeuronLink] = field(default_factory=dict)
    _changed: trio.Event = field(default_factory=trio.Event)

    def get(self, node_id: str) -> NeuronLink | None:
        return self.links.get(node_id)

    def usable(self) -> list[NeuronLink]:
        """Neurons that may be given new work."""
        return [link for link in self.links.values() if link.health is Health.HEALTHY]

    def notify(self) -> None:
        """Wake everyone waiting in :meth:`wait_changed` (a join, a leave, a state change)."""
        self._changed.set()
        self._changed = trio.Event()

    async def wait_changed(self) -> None:
        await self._changed.wait()

    def snapshot(self) -> dict[str, Any]:
        """The fleet as JSON-ready data, for the admin endpoint and ``helexa status``."""
        neurons = []
        for link in sorted(self.links.values(), key=lambda l: l.node_id):
            neurons.append(
                {
                    "node_id": link.node_id,
                    "health": link.health.value,
                    "descriptor": to_wire(link.descriptor),
                    "metrics": to_wire(link.metrics),
                    "models": {mid: to_wire(st) for mid, st in sorted(link.models.items())},
                    "joined_at": link.joined_at,
                    "last_heartbeat": link.last_heartbeat,
                    "in_flight": link.in_flight,
                }
            )
        return {"neurons": neurons}
