"""The usage ledger's storage (SQLite) and its durable writer."""

from __future__ import annotations

import dataclasses
import sqlite3
import time

import pytest
import trio

from helexa.roles.cortex.portal import keys
from helexa.roles.cortex.portal.quota import Limits
from helexa.roles.cortex.portal.store import SqliteStore
from helexa.roles.cortex.portal.usage import UsageRecord
from helexa.roles.cortex.portal.writer import LedgerError, LedgerWriter

DAY = 86400.0


def record(rid: str, *, key: str = "k1", portal: str = "acme", model: str = "fast", at: float = 10 * DAY,
           prompt: int = 10, completion: int = 5, cost: float = 0.5, outcome: str = "ok") -> UsageRecord:
    return UsageRecord(rid, portal, key, "chat", model, "smollm", at - 1, at, prompt, 0, completion, cost, "EUR",
                       1.0, 0.1, "n1", outcome=outcome)


def test_the_database_is_wal_and_fully_synchronous(tmp_path) -> None:
    store = SqliteStore(tmp_path / "usage.sqlite")
    try:
        for conn in (store._w, store._r):
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    finally:
        store.close()


def test_reports_group_by_key_model_day_and_portal(tmp_path) -> None:
    store = SqliteStore(tmp_path / "usage.sqlite")
    store.append([record("a"), record("b", key="k2", model="smart", cost=1.0),
                  record("c", at=11 * DAY + 5, outcome="client_gone"), record("d", portal="beta", key="k3")])
    by_key = {r["key"]: r for r in store.report(by="key", portal="acme")}
    assert by_key["k1"]["requests"] == 2 and by_key["k1"]["total_tokens"] == 30
    assert by_key["k1"]["cost"] == 1.0 and by_key["k1"]["incomplete"] == 1 and "k3" not in by_key
    assert [r["model"] for r in store.report(by="model")] == ["fast", "smart"]
    assert [(r["day"], r["requests"]) for r in store.report(by="day")] == [("1970-01-11", 3), ("1970-01-12", 1)]
    assert [r["portal"] for r in store.report(by="portal")] == ["acme", "beta"]
    assert [r["requests"] for r in store.report(by="key", key_id="k1", since=11 * DAY)] == [1]
    assert store.spent_since("key_id", 11 * DAY) == {"k1": (0.5, 15)}
    assert store.spent_since("portal", 0) == {"acme": (2.0, 45), "beta": (0.5, 15)}
    # A budget's currency: money in it alone (every token counts).
    store.append([dataclasses.replace(record("e", at=12 * DAY, cost=7.0), currency="USD")])
    assert store.spent_since("portal", 0, {"acme": "EUR", "beta": "USD"}) == {"acme": (2.0, 60), "beta": (0.0, 15)}
    assert store.spent_since("portal", 0, {"acme": "USD"})["acme"] == (7.0, 60)
    assert [r.request_id for r in store.records(portal="acme", until=11 * DAY)] == ["a", "b"]
    assert store.records(request_id="c")[0].outcome == "client_gone"
    store.close()


def test_a_reports_cost_is_the_sum_of_the_costs_without_floating_point_residue(tmp_path) -> None:
    """helexa usage --csv printed 0.0014759999999999999 for costs that add up to 0.001476."""
    store = SqliteStore(tmp_path / "usage.sqlite")
    store.append([record("a", cost=0.1), record("b", cost=0.2), record("c", model="smart", cost=0.000356),
                  record("d", model="smart", cost=0.00112)])
    assert [(r["model"], r["cost"]) for r in store.report(by="model")] == [("fast", 0.3), ("smart", 0.001476)]
    assert store.report(by="key")[0]["cost"] == 0.301476
    store.close()


def test_keys_are_stored_as_digests_and_read_back(tmp_path) -> None:
    path = tmp_path / "usage.sqlite"
    store = SqliteStore(path)
    secret, key = keys.create("acme", "ci", limits=Limits(rpm=3, budget=2.5, period="day"), models=("fast",), now=5.0)
    store.put_key(key)
    store.close()
    again = SqliteStore(path)
    assert again.keys() == [key]
    again.close()
    assert secret.encode() not in path.read_bytes()


async def test_a_write_returns_once_the_record_is_committed(tmp_path) -> None:
    path = tmp_path / "usage.sqlite"
    store = SqliteStore(path)
    writer = LedgerWriter(store)
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        await writer.write(record("a"))
        # Another connection (another process would do the same) sees it at once.
        with sqlite3.connect(path) as other:
            assert other.execute("SELECT request_id FROM usage").fetchall() == [("a",)]

        async def one(i: int) -> None:
            await writer.write(record(f"r{i}"))

        async with trio.open_nursery() as batch:
            for i in range(50):
                batch.start_soon(one, i)
        nursery.cancel_scope.cancel()
    assert len(store.records()) == 51 and writer.stats.records == 51
    assert writer.stats.commits < 51  # concurrent records shared commits
    store.close()


async def test_a_failed_write_raises_a_ledger_error(tmp_path) -> None:
    class Broken(SqliteStore):
        def append(self, records, *, wait=None) -> None:  # noqa: ANN001
            raise sqlite3.OperationalError("disk I/O error")

    writer = LedgerWriter(Broken(tmp_path / "u.sqlite"))
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        with pytest.raises(LedgerError, match="disk I/O error"):
            await writer.write(record("a"))
        nursery.cancel_scope.cancel()


async def test_records_queued_when_the_writer_stops_are_still_written(tmp_path) -> None:
    store = SqliteStore(tmp_path / "usage.sqlite")
    writer = LedgerWriter(store)
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        nursery.start_soon(writer.write, record("last"))
        await trio.sleep(0)
        nursery.cancel_scope.cancel()
    assert [r.request_id for r in store.records()] == ["last"]
    store.close()


async def test_a_record_whose_request_gave_up_on_a_locked_ledger_is_never_written(tmp_path) -> None:
    """An operator's ``sqlite3`` session holds the ledger's write lock through a burst. The
    requests whose records cannot be committed within ``ledger_timeout`` are refused as not
    served (or charged), so none of their records may land once the lock is released: the
    commit waited 10 s (SQLite's busy timeout) for the lock whatever the request's deadline,
    and a record committed after its request gave up billed a refused request."""
    path = tmp_path / "usage.sqlite"
    store = SqliteStore(path)
    writer = LedgerWriter(store, timeout=1.0)
    operator = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    released = trio.Event()

    def hold_the_lock() -> None:
        operator.execute("BEGIN IMMEDIATE")
        operator.execute("CREATE TABLE notes (x)")
        time.sleep(2.5)
        operator.execute("ROLLBACK")

    refused: list[str] = []

    async def one(rid: str, delay: float) -> None:
        await trio.sleep(delay)
        try:
            await writer.write(record(rid))
        except LedgerError:
            refused.append(rid)

    async def operator_session() -> None:
        await trio.to_thread.run_sync(hold_the_lock)
        released.set()

    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        nursery.start_soon(operator_session)
        await trio.sleep(0.1)
        started = trio.current_time()
        async with trio.open_nursery() as burst:
            burst.start_soon(one, "a", 0.0)
            burst.start_soon(one, "b", 0.5)
        assert trio.current_time() - started < 2.4  # each request gave up at its own deadline
        await released.wait()
        await trio.sleep(0.5)
        await writer.write(record("after"))  # the lock is gone: served and recorded
        nursery.cancel_scope.cancel()
    assert sorted(refused) == ["a", "b"]
    assert [r.request_id for r in store.records()] == ["after"]
    operator.close()
    store.close()
