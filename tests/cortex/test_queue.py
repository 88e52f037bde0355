"""The admission queue's order, deadlines and drain rate: pure and synchronous."""

from __future__ import annotations

import itertools

import pytest

from helexa.roles.cortex.queue import FairQueue, Waiter, rank

_tickets = itertools.count(1)


def w(model: str = "m", portal: str = "p", key: str = "", priority: str = "normal", weight: float = 1.0,
      arrived: float = 0.0, deadline: float = float("inf")) -> Waiter:
    return Waiter(next(_tickets), model, portal, key, rank(priority), weight, arrived, deadline)


def drain(q: FairQueue, model: str = "m", now: float = 0.0) -> list[Waiter]:
    out = []
    while (x := q.pop(model, now)) is not None:
        out.append(x)
    return out


def test_interactive_before_normal_before_bulk_whatever_the_arrival_order() -> None:
    q = FairQueue()
    bulk, normal, interactive = w(priority="bulk"), w(priority="normal"), w(priority="interactive")
    for x in (bulk, normal, interactive):
        q.push(x)
    assert [x.ticket for x in q.ordered("m")] == [interactive.ticket, normal.ticket, bulk.ticket]
    assert drain(q) == [interactive, normal, bulk]


def test_an_unknown_class_counts_as_normal() -> None:
    assert rank("urgent!") == rank("normal")


def test_one_portals_burst_does_not_starve_anothers_trickle() -> None:
    q = FairQueue()
    burst = [w(portal="big", arrived=0.0) for _ in range(100)]
    for x in burst:
        q.push(x)
    trickle = [w(portal="small", arrived=1.0) for _ in range(3)]
    for x in trickle:
        q.push(x)
    order = [x.portal for x in drain(q)]
    # The small portal's three arrive behind a hundred, and still go every other turn.
    assert order[:6] == ["big", "small", "big", "small", "big", "small"]
    assert order[6:] == ["big"] * 97


def test_weights_share_turns_in_proportion_while_both_wait() -> None:
    q = FairQueue()
    for _ in range(30):
        q.push(w(portal="gold", weight=2.0))
        q.push(w(portal="basic", weight=1.0))
    first = [x.portal for x in drain(q)][:30]
    assert first.count("gold") == 20 and first.count("basic") == 10


def test_a_portal_that_was_away_banks_no_credit() -> None:
    q = FairQueue()
    for _ in range(10):
        q.push(w(portal="a"))
        q.push(w(portal="c"))
    for _ in range(10):
        q.pop("m", 0.0)  # a and c were served five times each while b was away
    for _ in range(6):
        q.push(w(portal="b"))
    order = [x.portal for x in q.ordered("m")]
    # b starts level with the others, instead of taking five turns in a row for its absence.
    assert order[:6] == ["b", "a", "c", "b", "a", "c"]


def test_keys_of_one_portal_share_its_turns_fairly() -> None:
    q = FairQueue()
    for _ in range(6):
        q.push(w(portal="p", key="k1"))
    q.push(w(portal="p", key="k2"))
    q.push(w(portal="p", key="k2"))
    assert [x.key for x in drain(q)][:4] == ["k1", "k2", "k1", "k2"]


def test_a_priority_class_is_not_bypassed_by_fairness() -> None:
    q = FairQueue()
    for _ in range(5):
        q.push(w(portal="a", priority="interactive"))
    q.push(w(portal="b", priority="bulk"))
    assert [x.portal for x in drain(q)] == ["a"] * 5 + ["b"]


def test_positions_follow_the_service_order_and_update_as_it_drains() -> None:
    q = FairQueue()
    a1, a2, b1 = w(portal="a"), w(portal="a"), w(portal="b")
    for x in (a1, a2, b1):
        q.push(x)
    assert [q.position(x.ticket) for x in (a1, b1, a2)] == [1, 2, 3]
    q.pop("m", 0.0)
    assert q.position(b1.ticket) == 1 and q.position(a2.ticket) == 2 and q.position(a1.ticket) is None


def test_deadlines_expire_exactly_at_their_time_and_only_then() -> None:
    q = FairQueue()
    early, late = w(deadline=10.0), w(deadline=20.0)
    q.push(early)
    q.push(late)
    assert q.next_deadline() == 10.0
    assert q.expire(9.999) == []
    assert q.expire(10.0) == [early]
    assert q.next_deadline() == 20.0 and q.waiting("m") == 1
    q.remove(late.ticket)
    assert q.next_deadline() is None and q.expire(100.0) == []


def test_a_full_queue_refuses_and_queues_nothing() -> None:
    q = FairQueue(max_waiting=2)
    assert q.push(w()) and q.push(w())
    assert not q.push(w())
    assert q.waiting("m") == 2
    assert q.push(w(model="other"))  # the limit is per model


def test_a_full_queue_pushes_out_its_last_waiter_for_one_served_before_it() -> None:
    # One key of a bulk portal fills the queue; whoever would be served before its last
    # waiter takes that place (that waiter is refused instead), the flood's own next is refused.
    q = FairQueue(max_waiting=4)
    flood = [w(portal="bulk", key="k1", priority="bulk") for _ in range(4)]
    for x in flood:
        assert q.push(x)
    more = w(portal="bulk", key="k1", priority="bulk")
    assert not q.push(more) and q.displace(more) is None  # last of its own key: refused
    assert q.displace(w(portal="x", priority="bulk")) is flood[-1]  # another portal's first request
    assert q.displace(w(portal="bulk", key="k2", priority="bulk")) is flood[-1]  # another key of it
    assert q.displace(w(portal="y", priority="interactive")) is flood[-1]  # a better class
    q.remove(flood[-1].ticket)
    small = w(portal="x", priority="bulk")
    assert q.push(small)
    assert [x.ticket for x in drain(q)][:2] == [flood[0].ticket, small.ticket]


def test_a_full_queue_refuses_a_worse_class_and_a_tenant_already_last() -> None:
    q = FairQueue(max_waiting=3)
    a1, b1, a2 = w(portal="a"), w(portal="b"), w(portal="a")
    for x in (a1, b1, a2):
        assert q.push(x)
    assert q.displace(w(portal="c", priority="bulk")) is None  # behind every normal waiter
    assert q.displace(w(portal="b")) is None  # b's second turn comes after a's second
    assert q.displace(w(portal="c")) is a2  # c's first turn comes before a's second
    assert q.waiting("m") == 3  # displace only reads


def test_models_are_queued_apart() -> None:
    q = FairQueue()
    a, b = w(model="a"), w(model="b")
    q.push(a)
    q.push(b)
    assert q.pop("a", 0.0) == a and q.pop("a", 0.0) is None and q.peek("b") == b
    assert q.models() == ["b"]


def test_taking_one_out_of_order_charges_its_portal() -> None:
    q = FairQueue()
    a1, a2, b1 = w(portal="a"), w(portal="a"), w(portal="b")
    for x in (a1, a2, b1):
        q.push(x)
    assert q.take(a2.ticket, 0.0) == a2  # say only a2 fitted where a slot was free
    assert [x.portal for x in q.ordered("m")] == ["b", "a"]


def test_demand_sums_up_each_models_queue() -> None:
    q = FairQueue()
    q.push(w(model="a", arrived=3.0, priority="bulk"))
    q.push(w(model="a", arrived=1.0, priority="normal"))
    d = q.demand()["a"]
    assert (d.waiting, d.oldest, d.priority) == (2, 1.0, rank("normal"))
    assert 2 * 10.0 - d.arrived_sum == 9.0 + 7.0  # at 10 they have waited 16 s together


def test_the_drain_rate_is_measured_from_services_and_sets_eta_and_retry_after() -> None:
    q = FairQueue()
    for _ in range(10):
        q.push(w())
    assert q.drain_rate("m", 0.0) is None
    assert q.retry_after("m", 0.0, default=5.0, ceiling=60.0) == 5.0
    for t in (0.0, 1.0, 2.0, 3.0, 4.0):
        q.pop("m", t)
    assert q.drain_rate("m", 4.0) == pytest.approx(1.0)
    assert q.eta("m", 3, 4.0) == pytest.approx(3.0)
    assert q.retry_after("m", 4.0, default=5.0, ceiling=60.0) == pytest.approx(6.0)  # 5 waiting, +1
    assert q.drain_rate("m", 5.0) == pytest.approx(1.0)  # the next one is not overdue yet
    assert q.drain_rate("m", 8.0) == pytest.approx(4 / 7)  # 3 s overdue: it slows
    assert q.retry_after("m", 4.0, default=5.0, ceiling=3.0) == 3.0


def test_keys_that_stopped_waiting_leave_no_fairness_state_behind() -> None:
    """Each key that ever waited kept its virtual time in the queue of every model and
    class it waited in, for good (keys minted per job, a long-running cortex). A key whose
    virtual time the clock has passed is as a new one: it is forgotten; the fairness
    between the keys still waiting holds."""
    q = FairQueue()
    q.push(w(key="batch", priority="bulk"))  # the model's queue is never empty under load
    for i in range(5000):
        q.push(w(key="steady"))
        q.push(w(key=f"job-{i}"))
        assert {q.pop("m", 0.0).key, q.pop("m", 0.0).key} == {"steady", f"job-{i}"}
    assert sum(len(c.key_vt) for c in q._models["m"].classes) <= 2100
    a, b = [w(key="a") for _ in range(3)], [w(key="b") for _ in range(3)]
    for x in (*a, *b):
        q.push(x)
    assert [x.key for x in drain(q)] == ["a", "b", "a", "b", "a", "b", "batch"]
