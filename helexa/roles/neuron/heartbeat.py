"""The neuron's heartbeats: what it holds and how busy it is, every interval, while joined."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio

from helexa.protocol import Heartbeat
from helexa.transport import Channel, ChannelClosed

from .hardware import MetricsSampler
from .registry import ModelRegistry


async def send_heartbeats(
    channel: Channel,
    send: Callable[[Heartbeat], Awaitable[None]],
    *,
    interval: float,
    registry: ModelRegistry,
    sampler: MetricsSampler,
) -> None:
    """Send a :class:`Heartbeat` through ``send`` at once and then every ``interval``
    seconds, until cancelled. The first, and each after what the model cache holds changed,
    also says what it holds (``cached``).

    A heartbeat that cannot be sent (``send`` raises ``ChannelClosed`` or
    ``trio.TooSlowError``) means the link is dead or stuck: ``channel`` is closed, which
    ends the connection's reader and so starts a redial. Returns then.
    """
    seq = 0
    reported: int | None = None  # the cache's generation last reported: the first heartbeat says it anyway
    try:
        while True:
            seq += 1
            metrics = sampler.sample(in_flight=registry.in_flight)
            cached = None
            if (generation := registry.cache_generation()) != reported:
                cached, reported = registry.cached_sources(), generation
            await send(Heartbeat(seq, metrics, registry.statuses(), cached))
            await trio.sleep(interval)
    except (ChannelClosed, trio.TooSlowError):
        await channel.aclose(1001, "heartbeat could not be sent")
