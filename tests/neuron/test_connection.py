"""The neuron's connection (helexa/roles/neuron/connection.py): joining, what is fatal,
what is retried, on the virtual clock against a cortex driven by hand."""

from __future__ import annotations

import random

import pytest
import trio

from hand_cortex import HandCortex, neuron_for

from helexa.protocol import Challenge, Hello, Join, Refused, Welcome
from helexa.roles.neuron.agent import CortexImpostor, JoinRefused
from helexa.roles.neuron.connection import backoff_delays
from helexa.transport import ChannelClosed


async def run_expecting(neuron, error_type):
    with pytest.raises(error_type) as caught:
        await neuron.run()
    return caught.value


async def test_a_refused_join_is_fatal_and_never_redialed(nursery, autojump_clock):
    cortex = HandCortex(token="hlx1.the-real-one")
    neuron = neuron_for(cortex)  # holds another token

    async def cortex_side():
        session = await cortex.handshake(await cortex.accept())
        assert session.verdict.code == "unauthorized"

    nursery.start_soon(cortex_side)
    refused = await run_expecting(neuron, JoinRefused)
    assert refused.code == "unauthorized" and "join proof does not match" in str(refused)
    await trio.sleep(60)
    assert cortex.dials == [0.0]


async def test_a_cortex_that_cannot_prove_the_token_is_an_impostor_and_fatal(nursery, autojump_clock):
    cortex = HandCortex()
    neuron = neuron_for(cortex)

    async def impostor():
        channel = await cortex.accept()
        hello = await channel.receive()
        await channel.send(Challenge(b"c" * 32, 1))
        join = await channel.receive()
        assert isinstance(hello, Hello) and isinstance(join, Join)
        await channel.send(Welcome(join.proof, "s", 1.0))  # replaying the neuron's own proof

    nursery.start_soon(impostor)
    await run_expecting(neuron, CortexImpostor)
    await trio.sleep(60)
    assert cortex.dials == [0.0]


async def test_a_cortex_that_reflects_the_neurons_nonce_is_an_impostor(nursery, autojump_clock):
    cortex = HandCortex()
    neuron = neuron_for(cortex)

    async def mirror():
        channel = await cortex.accept()
        hello = await channel.receive()
        await channel.send(Challenge(hello.nonce, 1))

    nursery.start_soon(mirror)
    error = await run_expecting(neuron, CortexImpostor)
    assert "reflects" in str(error)


async def test_a_cortex_choosing_a_version_the_neuron_does_not_speak_is_fatal(nursery, autojump_clock):
    cortex = HandCortex()
    neuron = neuron_for(cortex)

    async def future_cortex():
        channel = await cortex.accept()
        await channel.receive()
        await channel.send(Challenge(b"c" * 32, 4))  # this build speaks 1..3 (2: the identity key, 3: the cache)

    nursery.start_soon(future_cortex)
    refused = await run_expecting(neuron, JoinRefused)
    assert refused.code == "version_mismatch"


async def test_a_refusal_from_the_cortex_names_its_reason(nursery, autojump_clock):
    cortex = HandCortex()
    neuron = neuron_for(cortex)

    async def full_cortex():
        channel = await cortex.accept()
        await channel.receive()
        await channel.send(Refused("unavailable", "the cortex cannot read its join token"))

    nursery.start_soon(full_cortex)
    refused = await run_expecting(neuron, JoinRefused)
    assert refused.code == "unavailable" and "cannot read its join token" in str(refused)


async def test_a_silent_cortex_fails_the_handshake_at_its_deadline_then_is_redialed(nursery, autojump_clock):
    cortex = HandCortex()
    neuron = neuron_for(cortex, rng=random.Random(7), handshake_timeout=10.0, reconnect_initial=1.0)
    nursery.start_soon(neuron.run)
    silent = await cortex.accept()
    assert isinstance(await silent.receive(), Hello)
    with pytest.raises(ChannelClosed):
        await silent.receive()  # nothing answered: the neuron hangs up...
    assert trio.current_time() == pytest.approx(10.0)  # ...exactly at the deadline
    await cortex.join()  # and dials again after the first backoff delay
    delay = backoff_delays(1.0, 30.0, random.Random(7))()
    assert cortex.dials == [0.0, pytest.approx(10.0 + delay)]
    await neuron.joined.wait()


async def test_an_unexpected_frame_during_the_join_is_answered_with_a_fault_and_redialed(nursery, autojump_clock):
    cortex = HandCortex()
    neuron = neuron_for(cortex, reconnect_initial=1.0)
    nursery.start_soon(neuron.run)
    confused = await cortex.accept()
    await confused.receive()
    await confused.send(Welcome(b"p", "s", 1.0))  # before any challenge
    fault = await confused.receive()
    assert fault.code == "unexpected" and "expected challenge, got Welcome" in fault.message
    await cortex.join()
    await neuron.joined.wait()
    assert len(cortex.dials) == 2


@pytest.mark.parametrize("node_id", ["a\nb", "n" * 300, "\u202eevil"])
def test_a_node_id_the_cortex_would_refuse_is_a_config_error_at_start(node_id, tmp_path):
    from helexa.config import ConfigError
    from helexa.roles.neuron.config import resolve_node_id

    with pytest.raises(ConfigError, match="node_id"):
        resolve_node_id(node_id)
    machine_id = tmp_path / "machine-id"
    machine_id.write_text("0123456789abcdef0123456789abcdef\n")
    assert resolve_node_id(None, machine_id) == "0123456789abcdef0123456789abcdef"
