"""A compromised or buggy neuron for the cortex's tests: it holds the join token, so it is
admitted, and then sends frames no honest neuron sends. It is the project's own join
session and websocket client; the control server it joins is a real one on 127.0.0.1:0."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import openai
import trio

from helexa.protocol import (
    EmbedRequest,
    GenerateRequest,
    Hardware,
    Heartbeat,
    ModelState,
    ModelStatus,
    NeuronDescriptor,
    NeuronMetrics,
)
from helexa.protocol.join import NeuronJoin, Verdict, Welcomed
from helexa.roles.cortex.config import CortexConfig
from helexa.roles.cortex.control_server import ControlServer
from helexa.roles.cortex.fleet import Fleet
from helexa.transport import Channel, ChannelClosed
from helexa.transport import websocket as ws
from helexa.transport.handshake import exchange

TOKEN = "hlx1.hostile-test-token"
BIG = 10**12

Answer = Callable[[Channel, GenerateRequest | EmbedRequest], Awaitable[None]]


async def control(nursery: trio.Nursery, fleet: Fleet) -> str:
    server = ControlServer(CortexConfig(control_socket="127.0.0.1:0", heartbeat_interval=0.5), fleet, lambda: TOKEN)
    port = await nursery.start(server.run)
    return f"ws://127.0.0.1:{port}"


@asynccontextmanager
async def joined(url: str, node_id: str = "evil", *, hardware: Hardware | None = None,
                 statuses: tuple[ModelStatus, ...] = ()) -> AsyncIterator[tuple[Channel, Verdict | None]]:
    """A websocket to ``url`` on which ``node_id`` went through the join with the real
    token (reporting ``statuses``), and the join's verdict."""
    descriptor = NeuronDescriptor(node_id, hardware or Hardware(cpu_cores=4, ram_total=8 << 30))
    async with ws.connect(url) as channel:
        session = NeuronJoin(TOKEN, descriptor, timeout=10, models=statuses)
        await exchange(channel, session, session.start())
        yield channel, session.verdict


async def hostile(url: str, answer: Answer | None = None, *, node_id: str = "evil",
                  metrics: NeuronMetrics = NeuronMetrics(), hardware: Hardware | None = None,
                  models: tuple[str, ...] = ("chat", "embed"), statuses: tuple[ModelStatus, ...] | None = None,
                  commands: Callable[[Channel, object], Awaitable[None]] | None = None,
                  task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Join ``url`` with the real token, heartbeat ``metrics`` with ``models`` loaded (or
    ``statuses``), ``answer`` every request it is sent and hand ``commands`` every other
    frame; returns when the cortex closes the connection. ``task_status.started`` gets the
    join's verdict."""
    statuses = statuses or tuple(ModelStatus(m, ModelState.LOADED) for m in models)
    async with joined(url, node_id, hardware=hardware, statuses=statuses) as (channel, verdict):
        task_status.started(verdict)
        if not isinstance(verdict, Welcomed):
            return
        async with trio.open_nursery() as nursery:
            async def beat() -> None:
                seq = 0
                while True:
                    seq += 1
                    await channel.send(Heartbeat(seq, metrics, statuses))
                    await trio.sleep(0.2)

            nursery.start_soon(beat)
            try:
                while True:
                    msg = await channel.receive()
                    if isinstance(msg, (GenerateRequest, EmbedRequest)) and answer is not None:
                        nursery.start_soon(answer, channel, msg)
                    elif commands is not None:
                        nursery.start_soon(commands, channel, msg)
            except ChannelClosed:
                nursery.cancel_scope.cancel()


def client(url: str, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=10)


async def until(predicate: Callable[[], bool]) -> None:
    with trio.fail_after(10):
        while not predicate():
            await trio.sleep(0.01)
