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


async def test_a_request_failing_because_its_models_process_died_marks_the_model_failed_at_once(nursery):
    # The request's error can come before the model's own status frame; a retry picked
    # the moment it comes must not find the model loaded here still.
    import pytest

    from helexa.protocol import GenerateRequest, InferenceError, ModelState, ModelStatus, Task
    from helexa.roles.cortex.fleet import RemoteError

    cortex_side, neuron = channel_pair()
    link = NeuronLink(cortex_side, NeuronDescriptor("n1", Hardware(cpu_cores=1, ram_total=1)),
                      models=(ModelStatus("m", ModelState.LOADED), ModelStatus("other", ModelState.LOADED)))
    nursery.start_soon(link.serve)
    request = GenerateRequest("r1", "m", Task.CHAT, messages=({"role": "user", "content": "hi"},))
    with pytest.raises(RemoteError) as info:
        async with link.generate(request) as events:
            assert (await neuron.receive()).request_id == "r1"
            await neuron.send(InferenceError("r1", "backend_crashed", "killed by SIGKILL", retryable=True))
            async for _ in events:
                pass
    assert info.value.code == "backend_crashed" and info.value.retryable
    assert link.models["m"].state is ModelState.FAILED and "SIGKILL" in link.models["m"].error
    assert link.models["other"].state is ModelState.LOADED


async def test_an_embedding_left_without_its_answer_tells_the_neuron_to_cancel(nursery):
    """An embedding its caller stops waiting for (the client left, its key was revoked) is
    cancelled on the neuron, as a generation is: it was left to run there for nothing."""
    from helexa.protocol import Cancel, EmbedRequest

    link, neuron = _link()
    nursery.start_soon(link.serve)
    with trio.move_on_after(0.5):
        await link.embed(EmbedRequest("e1", "m", ("a",)), timeout=30)
    with trio.fail_after(1):
        assert (await neuron.receive()).request_id == "e1"
        assert await neuron.receive() == Cancel("e1")


def _generating_link():
    from helexa.protocol import ModelState, ModelStatus

    cortex_side, neuron = channel_pair()
    link = NeuronLink(cortex_side, NeuronDescriptor("n1", Hardware(cpu_cores=1, ram_total=1)),
                      models=(ModelStatus("m", ModelState.LOADED),))
    return link, neuron


def _request(stream: bool = False):
    from helexa.protocol import GenerateRequest, Task

    return GenerateRequest("r1", "m", Task.CHAT, messages=({"role": "user", "content": "hi"},), stream=stream)


async def test_a_stream_past_its_deadline_ends_with_a_timeout_and_the_neuron_is_told_to_stop(nursery):
    # The dispatcher's first-token deadline of a whole answer, kept by the link's watch
    # (the control server's watchdog calls expire) rather than a cancel scope.
    import pytest

    from helexa.protocol import Cancel
    from helexa.roles.cortex.errors import UpstreamTimeout

    link, neuron = _generating_link()
    nursery.start_soon(link.serve)
    with pytest.raises(UpstreamTimeout, match="neuron n1 did not start within 5s"):
        async with link.generate(_request()) as events:
            assert (await neuron.receive()).request_id == "r1"
            now = trio.current_time()
            events.timeout, events.deadline = 5.0, now + 5
            link.expire(now + 4.9)  # not yet: nothing happens
            assert events.error is None

            async def watch() -> None:
                await trio.sleep(0.01)  # the consumer waits first
                link.expire(now + 5)

            nursery.start_soon(watch)
            await events.__anext__()
    with trio.fail_after(1):
        assert await neuron.receive() == Cancel("r1")
    assert link.in_flight == 0


async def test_a_stream_left_early_whose_cancel_cannot_be_sent_ends_cleanly(nursery):
    # The link's channel broke after the request went out, before its reader noticed: the
    # Cancel's ChannelClosed is swallowed (it was a NameError: link_stream.py did not import it).
    from helexa.transport import ChannelClosed

    link, neuron = _generating_link()
    nursery.start_soon(link.serve)

    async def broken(msg, **kw):  # noqa: ANN001, ANN003, ANN202
        raise ChannelClosed("connection broken")

    async with link.generate(_request(stream=True)):
        assert (await neuron.receive()).request_id == "r1"
        link.channel.send = broken
    assert link.in_flight == 0
