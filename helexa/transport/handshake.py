"""Carrying a sans-IO join session (:mod:`helexa.protocol.join`) over a :class:`Channel`."""

from __future__ import annotations

from collections.abc import Iterable

from helexa.protocol.join import CortexJoin, NeuronJoin

from .channel import Channel


async def exchange(channel: Channel, session: CortexJoin | NeuronJoin, opening: Iterable[object] = ()) -> list[object]:
    """Send ``opening``, then feed ``session`` each message from the peer and send what it
    answers, until it has a verdict.

    Returns the frames the session gave with its verdict, not yet sent: the caller acts on
    the verdict first (a cortex registers the neuron before its welcome goes out), then
    sends them. There is no deadline here: the caller holds the handshake's.

    Raises what ``channel`` raises (``ChannelClosed``, ``ProtocolError``).
    """
    for frame in opening:
        await channel.send(frame)
    while True:
        frames = session.receive(await channel.receive())
        if session.verdict is not None:
            return frames
        for frame in frames:
            await channel.send(frame)
