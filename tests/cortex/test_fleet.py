"""The fleet: membership only through add/remove, health-filtered views, change wake-ups."""

from __future__ import annotations

import trio

from helexa.roles.cortex.fleet import Fleet, Health
from neuron_double import NeuronDouble


async def test_add_replaces_by_node_id_and_remove_only_forgets_the_registered_link() -> None:
    fleet = Fleet()
    first = NeuronDouble("n1", Fleet())
    second = NeuronDouble("n1", Fleet())
    assert fleet.add(first) is None and fleet.get("n1") is first
    assert fleet.add(second) is first and fleet.get("n1") is second and len(fleet) == 1
    assert not fleet.remove(first)  # a stale link cannot remove its successor
    assert fleet.remove(second) and "n1" not in fleet and len(fleet) == 0


async def test_only_healthy_neurons_are_usable() -> None:
    fleet = Fleet()
    a, b, c = (NeuronDouble(x, fleet) for x in "abc")
    b.health = Health.UNHEALTHY
    c.health = Health.DRAINING
    assert [link.node_id for link in fleet.usable()] == ["a"]
    assert sorted(link.node_id for link in fleet) == ["a", "b", "c"]


async def test_every_change_wakes_the_waiters(autojump_clock) -> None:
    fleet = Fleet()
    woken: list[float] = []

    async def waiter() -> None:
        for _ in range(3):
            await fleet.wait_changed()
            woken.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.sleep(1)
        link = NeuronDouble("n1", fleet)  # add
        await trio.sleep(1)
        fleet.notify()  # a link's state changed
        await trio.sleep(1)
        fleet.remove(link)
    assert woken == [1, 2, 3]


def test_the_snapshot_is_json_ready_and_sorted() -> None:
    import json

    fleet = Fleet()
    NeuronDouble("z", fleet, loaded=("m",))
    NeuronDouble("a", fleet)
    snap = fleet.snapshot()
    assert [n["node_id"] for n in snap["neurons"]] == ["a", "z"]
    assert snap["neurons"][1]["models"]["m"]["state"] == "loaded" and snap["neurons"][0]["health"] == "healthy"
    json.dumps(snap)
