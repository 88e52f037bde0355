"""Heartbeats (helexa/roles/neuron/heartbeat.py) at the interval the cortex's welcome names."""

from __future__ import annotations

import pytest
import trio

from hand_cortex import HandCortex, load_synthetic, neuron_for

from helexa.protocol import Heartbeat, ModelState


async def test_heartbeats_go_out_at_once_then_every_interval_the_welcome_names(nursery, autojump_clock):
    cortex = HandCortex(heartbeat_interval=2.5)
    nursery.start_soon(neuron_for(cortex).run)
    channel = await cortex.join()
    joined_at = trio.current_time()
    beats = []
    while len(beats) < 4:
        if isinstance(msg := await channel.receive(), Heartbeat):
            beats.append((trio.current_time() - joined_at, msg.seq))
    assert beats == [(0.0, 1), (pytest.approx(2.5), 2), (pytest.approx(5.0), 3), (pytest.approx(7.5), 4)]


async def test_a_heartbeat_reports_the_models_held_and_the_work_in_flight(nursery, autojump_clock):
    cortex = HandCortex()
    nursery.start_soon(neuron_for(cortex).run)
    channel = await cortex.join()
    await load_synthetic(channel)
    while not isinstance(msg := await channel.receive(), Heartbeat):
        pass
    assert [(m.model_id, m.state) for m in msg.models] == [("s", ModelState.LOADED)]
    assert msg.metrics.in_flight == 0 and msg.metrics.ram_total > 0


async def test_heartbeats_stop_with_the_connection_and_resume_after_the_redial(nursery, autojump_clock):
    cortex = HandCortex()
    neuron = neuron_for(cortex, reconnect_initial=1.0)
    nursery.start_soon(neuron.run)
    first = await cortex.join()
    await first.aclose()
    second = await cortex.join()
    while not isinstance(msg := await second.receive(), Heartbeat):
        pass
    assert msg.seq == 1  # a fresh sequence on the new connection
    assert neuron.joins == 2


async def test_the_first_heartbeat_says_what_the_model_cache_holds_and_later_ones_only_a_change(
        nursery, autojump_clock, tmp_path):
    """A restarted neuron's cache is reported at once (the join, then the first heartbeat),
    and again only when it changes (a pull, an eviction): not every interval."""
    from helexa.roles.neuron.agent import Neuron
    from helexa.roles.neuron.config import SourcesConfig
    from helexa.roles.neuron.registry import ModelRegistry
    from helexa.roles.neuron.sources import ModelSources

    cortex = HandCortex(heartbeat_interval=1.0)
    registry = ModelRegistry(sources=ModelSources(SourcesConfig(cache_dir=tmp_path)))
    cache = registry.sources.cache
    (tmp_path / "blobs").mkdir()
    cache.blob("ab" * 32).write_bytes(b"x")
    cache.commit("a" * 32, "https://example.test/a.gguf", {"a.gguf": "ab" * 32}, file="a.gguf")
    base = neuron_for(cortex)
    nursery.start_soon(Neuron(base.config, connector=cortex.connect, registry=registry).run)
    channel = await cortex.join()
    beats = []
    while len(beats) < 4:
        if isinstance(msg := await channel.receive(), Heartbeat):
            beats.append(msg.cached)
            if len(beats) == 2:
                cache.commit("b" * 32, "https://example.test/b.gguf", {"b.gguf": "ab" * 32}, file="b.gguf")
    assert beats[0] == ("a" * 32,) and beats[1] is None
    assert set(beats[2]) == {"a" * 32, "b" * 32} and beats[3] is None
