"""A load that always fails is not tried again for every request: a backoff per (model,
neuron), pure (:class:`LoadBackoff`) and through the orchestrator over neuron doubles under
trio's autojump clock, asserting exact virtual times."""

from __future__ import annotations

import pytest
import trio

from helexa.protocol import GenerateRequest, Task
from helexa.roles.cortex.catalogue import Catalogue, CatalogueEntry
from helexa.roles.cortex.errors import ColdLoadFailed
from helexa.roles.cortex.fleet import Fleet
from helexa.roles.cortex.load_backoff import LoadBackoff
from helexa.roles.cortex.orchestrator import Orchestrator
from neuron_double import NeuronDouble
from serving import cortex_config


def test_a_backoff_doubles_per_failure_in_a_row_up_to_its_ceiling() -> None:
    b = LoadBackoff()
    assert [b.failed("m", "n1", t, "bad path", base=5, ceiling=30).until - t for t in (0, 10, 30, 70, 200)] \
        == [5, 10, 20, 30, 30]
    assert b.barred("m", 229.9) == {"n1"} and b.barred("m", 230) == frozenset() and b.barred("other", 0) == set()
    assert b.view("m", 220) == {"n1": {"failures": 5, "error": "bad path", "retry_in": 10}}


def test_a_backoff_is_per_neuron_and_forgotten_on_success_or_by_the_operator() -> None:
    b = LoadBackoff()
    b.failed("m", "n1", 0, "x", base=5, ceiling=300)
    b.failed("m", "n2", 0, "x", base=5, ceiling=300)
    b.forget("m", "n1")  # it loaded there
    assert b.barred("m", 1) == {"n2"}
    b.failed("m", "n1", 1, "x", base=5, ceiling=300)
    assert b.view("m", 1)["n1"]["failures"] == 1  # counted afresh
    b.forget("m")  # the operator's load anywhere, or a new config
    assert b.barred("m", 1) == frozenset()


def chat(rid: str) -> GenerateRequest:
    return GenerateRequest(rid, "m", Task.CHAT, messages=({"role": "user", "content": "hi"},))


async def test_requests_for_a_model_that_fails_to_load_get_503_at_once_until_the_backoff_ends(autojump_clock) -> None:
    fleet = Fleet()
    neuron = NeuronDouble("n1", fleet, load_delay=0.5)
    neuron.refuse_load = True
    neuron.load_error = "no such file: /models/typo.gguf"
    catalogue = Catalogue([CatalogueEntry(id="m", backend="synthetic", memory_mb=500)])
    orch = Orchestrator(cortex_config(orchestrator={"load_backoff": 5.0, "load_backoff_max": 60.0}), fleet, catalogue)
    answers: list[tuple[float, float]] = []  # (when, Retry-After)
    async with trio.open_nursery() as nursery:
        await nursery.start(orch.run)

        async def ask(rid: str) -> None:
            with pytest.raises(ColdLoadFailed) as info:
                async with orch.generate(chat(rid)):
                    pass
            answers.append((trio.current_time(), info.value.retry_after))

        for i in range(10):  # ten requests in 3 s: one load
            await ask(f"r{i}")
            await trio.sleep(0.3)
        assert neuron.loads() == ["m"]
        assert answers[0] == (0.5, 5.0)  # the load's own failure, after its 0.5 s
        assert [when for when, _ in answers[1:]] == pytest.approx([0.5 + 0.3 * i for i in range(1, 10)])
        assert [after for _, after in answers[1:]] == pytest.approx([5.0 - 0.3 * i for i in range(1, 10)])
        await trio.sleep(5.5 - trio.current_time())  # the backoff ends: tried again, and failed again
        await ask("again")
        assert neuron.loads() == ["m", "m"] and answers[-1] == (6.0, 5.0)
        error = "LoadModel refused by n1: no such file: /models/typo.gguf"
        assert orch.provisioner.backoff.view("m", 6.0) == {"n1": {"failures": 2, "error": error, "retry_in": 10.0}}
        neuron.refuse_load = False  # the operator fixed the path and asks for a load: tried at once
        assert await orch.provisioner.operator.load_on("m") == "n1"
        assert neuron.loads() == ["m", "m", "m"] and orch.provisioner.backoff.view("m", 7.0) == {}
        nursery.cancel_scope.cancel()


async def test_a_config_change_of_the_model_forgets_its_failed_loads(autojump_clock) -> None:
    fleet = Fleet()
    neuron = NeuronDouble("n1", fleet)
    neuron.refuse_load = True
    catalogue = Catalogue([CatalogueEntry(id="m", backend="synthetic", memory_mb=500)])
    orch = Orchestrator(cortex_config(), fleet, catalogue)
    async with trio.open_nursery() as nursery:
        await nursery.start(orch.run)
        with pytest.raises(ColdLoadFailed):
            async with orch.generate(chat("r1")):
                pass
        neuron.refuse_load = False
        orch.provisioner.catalogue_changed(["m"])  # what a reload that changed its entry calls
        async with orch.generate(chat("r2")) as gen:
            assert [e async for e in gen]
        assert neuron.loads() == ["m", "m"]
        nursery.cancel_scope.cancel()
