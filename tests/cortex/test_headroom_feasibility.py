"""A model bigger than a neuron's ``memory_headroom`` share of its memory can never be
placed there, even alone: it is not feasible on it. A request for it is answered at once
(503, as for a model no usable neuron can hold), not after waiting out ``queue_timeout``
in the queue for a load that never comes; listings do not offer it there."""

from __future__ import annotations

import pytest
import trio

from helexa.protocol import GenerateRequest, SamplingParams, Task
from helexa.roles.cortex.catalogue import Catalogue, CatalogueEntry
from helexa.roles.cortex.errors import NoCapacity
from helexa.roles.cortex.fleet import Fleet
from helexa.roles.cortex.orchestrator import Orchestrator
from neuron_double import NeuronDouble, hardware
from serving import cortex_config

# 2 GB of RAM (2048 MB): 1843 MB at the default headroom of 0.9.
MODELS = Catalogue([CatalogueEntry(id="big", backend="synthetic", memory_mb=1900),
                    CatalogueEntry(id="fits", backend="synthetic", memory_mb=1800),
                    CatalogueEntry(id="gpu", backend="synthetic", memory_mb=46_000, min_devices=2,
                                   min_device_vram_mb=23_000)])


def test_feasibility_counts_the_headroom() -> None:
    cpu = hardware(ram_gb=2)
    assert MODELS.get("big").is_feasible_on(cpu)  # all of its memory free
    assert not MODELS.get("big").is_feasible_on(cpu, headroom=0.9)
    assert MODELS.get("fits").is_feasible_on(cpu, headroom=0.9)
    gpus = hardware(ram_gb=2, gpus=(24, 24))  # 2 x 24576 MB: each holds 23000, both 44237 of 46000 at 0.9
    assert MODELS.get("gpu").is_feasible_on(gpus)
    assert not MODELS.get("gpu").is_feasible_on(gpus, headroom=0.9)


async def test_a_model_over_the_headroom_is_refused_at_once_not_after_the_queue_timeout(autojump_clock) -> None:
    fleet = Fleet()
    neuron = NeuronDouble("n1", fleet, hw=hardware(ram_gb=2))
    orch = Orchestrator(cortex_config(orchestrator={"memory_headroom": 0.9, "queue_timeout": 300.0}), fleet, MODELS)
    async with trio.open_nursery() as nursery:
        await nursery.start(orch.run)
        request = GenerateRequest("r1", "big", Task.CHAT, messages=({"role": "user", "content": "hi"},),
                                  sampling=SamplingParams(max_tokens=1))
        with pytest.raises(NoCapacity) as info:
            async with orch.generate(request):
                pass
        assert trio.current_time() == 0.0  # not queue_timeout (300 s) later
        assert info.value.retry_after is not None
        assert [m["id"] for m in orch.models()] == ["fits"]  # /v1/models offers what can be placed
        nursery.cancel_scope.cancel()
    assert neuron.loads() == []
