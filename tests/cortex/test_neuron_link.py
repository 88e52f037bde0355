"""The cortex's Link, driven over an in-memory channel pair (frames still go through the codec)."""

from __future__ import annotations

import trio

from helexa.protocol import Hardware, Heartbeat, NeuronDescriptor, NeuronMetrics, Ping, Pong
from helexa.roles.cortex.neuron_link import _MAX_PENDING_REPLIES, NeuronLink
from helexa.transport.memory import channel_pair


def _link():
    cortex_side, neuron_side = channel_pair()
    return NeuronLink(cortex_side, NeuronDescriptor("n1", Hardware(cpu_cores=1, ram_total=1))), neuron_side


async def test_a_neurons_ping_is_answered_with_a_pong_of_the_same_nonce(nursery):
    link, neuron = _link()
    nursery.start_soon(link.serve)
    for nonce in (1, 2, 3):
        await neuron.send(Ping(nonce))
    assert [await neuron.receive() for _ in range(3)] == [Pong(1), Pong(2), Pong(3)]


async def test_a_ping_flood_costs_pongs_not_the_reader(nursery):
    link, neuron = _link()
    nursery.start_soon(link.serve)
    # More pings than the reply buffer holds, all at once, then a heartbeat.
    for nonce in range(_MAX_PENDING_REPLIES * 2):
        await neuron.send(Ping(nonce))
    await neuron.send(Heartbeat(1, NeuronMetrics()))
    with trio.fail_after(1):
        while link.heartbeats == 0:
            await trio.sleep(0.001)
    assert link.connected
