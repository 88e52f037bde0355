"""The neuron's side of the control plane: :class:`Neuron` composes the pieces.

- :mod:`.connection`: dial the cortex, join, redial after a drop (and the errors);
- :mod:`.heartbeat`: heartbeats while joined;
- :mod:`.commands`: provisioning commands (configs, loads with progress, unloads);
- :mod:`.serving`: requests (generations, embeddings) and their cancellation;
- :mod:`.shutdown`: the graceful stop.

This module reads the cortex's frames and hands each to the piece that owns it.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from functools import partial
from typing import Any

import trio

from helexa import build
from helexa.protocol import (
    Cancel,
    EmbedRequest,
    Fault,
    GenerateRequest,
    LoadModel,
    PullModel,
    ModelStatus,
    ModelStatusChanged,
    NeuronDescriptor,
    Ping,
    Pong,
    ProtocolError,
    Shutdown,
    UnloadModel,
    UpsertModelConfig,
)
from helexa.transport import Channel

from . import hardware, shutdown
from .commands import Commands
from .config import NeuronConfig, Resolved
from .connection import CortexImpostor, Connection, JoinRefused, NeuronError, backoff_delays
from .heartbeat import send_heartbeats
from .registry import ModelRegistry
from .serving import Serving

__all__ = ["CortexImpostor", "JoinRefused", "Neuron", "NeuronError", "backoff_delays"]

log = logging.getLogger(__name__)


def _first(group: BaseExceptionGroup) -> BaseException:
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


class Neuron:
    """A neuron process's control-plane service.

    Args:
        config: the neuron's configuration; its node id, join token and TLS context are
            resolved once, here (raises :class:`~helexa.config.ConfigError` naming the key
            when one cannot be).
        registry: the models held (a fresh one by default). The neuron becomes its listener.
        connector: opens a channel to the cortex URL (the websocket transport by default;
            tests pass an in-memory connector that still goes through the codec).
        rng: the reconnect backoff's jitter.
    """

    def __init__(
        self,
        config: NeuronConfig,
        *,
        registry: ModelRegistry | None = None,
        connector: Callable[[str], Any] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.resolved = Resolved.from_config(config)
        self.registry = registry or ModelRegistry()
        self.registry.set_listener(self._status_changed)
        self._sampler = hardware.MetricsSampler()
        self.descriptor = NeuronDescriptor(
            node_id=self.resolved.node_id,
            hardware=hardware.discover(),
            hostname=hardware.hostname(),
            software=f"helexa {build.version()}",
            labels=dict(config.labels),
        )
        self.connection = Connection(
            config, self.resolved, self.descriptor, self.registry, connector=connector, rng=rng
        )
        self.serving = Serving(self.registry, self.connection)
        self.registry.cut = self.serving.cut
        self.commands = Commands(self.registry, self.connection)

    @property
    def joined(self) -> trio.Event:
        """Set while joined to the cortex (a fresh event after each drop)."""
        return self.connection.joined

    @property
    def joins(self) -> int:
        return self.connection.joins

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Stay joined to the cortex until cancelled or drained.

        Raises:
            JoinRefused: the join was refused for a reason a retry cannot fix.
            CortexImpostor: the peer does not hold our join token.
        """
        try:
            async with trio.open_nursery() as services:
                # Backends with background work (supervised processes) live here, so they
                # survive reconnects to the cortex.
                self.registry.service_nursery = services
                # Requests and their wedge watches too: a dropped link (redialed at once) or
                # a drain never waits on an engine that does not return.
                self.serving.nursery = services
                task_status.started()
                try:
                    await self.connection.run(self._serve)
                finally:
                    self.serving.nursery = None  # closing: what comes later runs in its connection's
                services.cancel_scope.cancel()  # drained: every model is unloaded
        except BaseExceptionGroup as group:
            # A refusal is the one way out of the loop: raise it plainly for callers.
            refused, rest = group.split(NeuronError)
            if refused is not None and rest is None:
                raise _first(refused) from None
            raise

    async def drain(self, reason: str = "neuron stopping") -> None:
        """Graceful stop (see :mod:`.shutdown`): announce Shutdown, refuse new work, let
        in-flight work finish within ``shutdown_grace``, unload every model, close."""
        await shutdown.drain(
            self.connection, self.serving, self.registry, grace=self.config.shutdown_grace, reason=reason
        )

    # --- one joined connection ------------------------------------------------------------

    async def _serve(self, channel: Channel, nursery: trio.Nursery) -> None:
        nursery.start_soon(
            partial(
                send_heartbeats,
                channel,
                self.connection.send,
                interval=self.connection.heartbeat_interval,
                registry=self.registry,
                sampler=self._sampler,
            )
        )
        try:
            while True:
                self._dispatch(await channel.receive(), nursery)
        finally:
            # Whoever asked for what still runs can no longer hear it: stop it, and watch
            # that each request ends (an engine that does not marks its model failed).
            self.serving.cancel_all(nursery, how="the connection to the cortex dropping")

    def _dispatch(self, msg: object, nursery: trio.Nursery) -> None:
        match msg:
            case GenerateRequest() | EmbedRequest():
                self.serving.start(msg, nursery)
            case Cancel(request_id=rid):
                self.serving.cancel(rid, nursery)
            case UpsertModelConfig() | LoadModel() | UnloadModel() | PullModel():
                self.commands.handle(msg, nursery)
            case Ping(nonce=n):
                self.connection.post(Pong(n))
            case Shutdown(reason=why):
                log.info("the cortex is going away: %s", why)
            case Fault(code=code, message=text):
                log.warning("the cortex reported a protocol error (%s): %s", code, text)
            case _:
                raise ProtocolError(f"unexpected {type(msg).__name__} from the cortex", code="unexpected")

    def _status_changed(self, status: ModelStatus) -> None:
        self.connection.post(ModelStatusChanged(status))
