"""A cortex driven by hand, for tests of the neuron: the real :class:`CortexJoin` over
in-memory channels (every frame through the codec); after the join the test reads and
sends frames itself."""

from __future__ import annotations

import math
import random
from contextlib import asynccontextmanager

import trio

from helexa.protocol import (
    Heartbeat,
    LoadModel,
    LoadProgress,
    ModelConfig,
    ModelState,
    ModelStatus,
    ModelStatusChanged,
    ProvisioningResponse,
    UpsertModelConfig,
)
from helexa.protocol.join import Admitted, CortexJoin, RecentNonces
from helexa.roles.neuron.agent import Neuron
from helexa.roles.neuron.config import NeuronConfig
from helexa.transport import Channel
from helexa.transport.handshake import exchange
from helexa.transport.memory import channel_pair

TOKEN = "hlx1.neuron-test"


class HandCortex:
    """Hands out in-memory connections to neurons (:meth:`connect`) and the cortex's side
    of each to the test (:meth:`accept`, :meth:`join`)."""

    def __init__(self, *, token: str = TOKEN, heartbeat_interval: float = 1.0) -> None:
        self.token = token
        self.heartbeat_interval = heartbeat_interval
        self.dials: list[float] = []
        self._recent = RecentNonces()
        self._send, self._receive = trio.open_memory_channel[Channel](math.inf)

    @asynccontextmanager
    async def connect(self, url: str):
        self.dials.append(trio.current_time())
        cortex_side, neuron_side = channel_pair()
        self._send.send_nowait(cortex_side)
        try:
            yield neuron_side
        finally:
            await neuron_side.aclose()

    async def accept(self) -> Channel:
        """The cortex's side of the next connection, before any handshake."""
        return await self._receive.receive()

    async def handshake(self, channel: Channel) -> CortexJoin:
        """Run the real cortex join session on ``channel``; returns it, with its verdict."""
        session = CortexJoin(
            lambda: self.token, recent=self._recent, heartbeat_interval=self.heartbeat_interval, timeout=10
        )
        for frame in await exchange(channel, session):
            await channel.send(frame)
        return session

    async def join(self) -> Channel:
        """Accept the next connection and admit the neuron."""
        channel = await self.accept()
        session = await self.handshake(channel)
        assert isinstance(session.verdict, Admitted), session.verdict
        return channel


def neuron_for(cortex: HandCortex, *, rng: random.Random | None = None, **overrides) -> Neuron:
    """A neuron dialing ``cortex``; ``overrides`` are :class:`NeuronConfig` fields."""
    config = NeuronConfig(cortex="ws://hand", **{"node_id": "n1", "join_token": TOKEN, **overrides})
    return Neuron(config, connector=cortex.connect, rng=rng)


CHATTER = (Heartbeat, LoadProgress, ModelStatusChanged)
"""Frames a neuron sends in the background, in no fixed order with the rest."""


async def next_frame(channel: Channel) -> object:
    """The neuron's next frame that is not background chatter."""
    while isinstance(msg := await channel.receive(), CHATTER):
        pass
    return msg


async def load_synthetic(channel: Channel, model_id: str = "s", **metadata) -> None:
    """Configure and load a synthetic model on the joined neuron at ``channel``."""
    await channel.send(UpsertModelConfig("c-up", ModelConfig(model_id, "synthetic", metadata=metadata)))
    await channel.send(LoadModel("c-load", model_id))
    # The answer and the status change travel separately: wait for both.
    answered = announced = False
    while not (answered and announced):
        match await channel.receive():
            case ProvisioningResponse(command_id="c-load", ok=ok) as msg:
                assert ok, msg
                answered = True
            case ModelStatusChanged(status=ModelStatus(state=ModelState.LOADED)):
                announced = True
