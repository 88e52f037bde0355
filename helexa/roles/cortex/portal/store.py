"""Where API keys and the usage ledger live: the :class:`Store` interface and its embedded
default, :class:`SqliteStore`.

Every method is synchronous and may block on the disk: the cortex calls them off the trio
thread (:mod:`.writer` for ledger rows, ``trio.to_thread`` for the rest). An operator
running several cortexes could later point them at a shared database by implementing
:class:`Store` over it.

SQLite runs in WAL mode with ``synchronous=FULL`` by default: when
:meth:`SqliteStore.append` returns, the rows are in the WAL on disk and survive ``kill -9``
and a power cut (``NORMAL``: in the WAL through the OS, which survives ``kill -9`` of the
process but not an OS crash). Writes
go through one connection, reads through another, so a report never waits for a commit's
fsync. The database holds no usable key: keys are stored as their SHA-256 digest only
(:mod:`.keys`).
"""

from __future__ import annotations

import fcntl
import json
import operator
import os
import sqlite3
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from helexa import secret_files
from helexa.config import ConfigError

from .keys import ApiKey
from .quota import Limits
from .usage import CALL_SQL, FIELDS, GROUPS, UsageRecord

_SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
    key_id TEXT PRIMARY KEY,
    portal TEXT NOT NULL,
    name TEXT NOT NULL,
    digest BLOB NOT NULL,
    limits TEXT NOT NULL,
    models TEXT,
    created_at REAL NOT NULL,
    expires_at REAL,
    revoked_at REAL
);
CREATE TABLE IF NOT EXISTS usage (
    id INTEGER PRIMARY KEY,
    request_id TEXT NOT NULL,
    portal TEXT NOT NULL,
    key_id TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    model_asked TEXT NOT NULL,
    model_served TEXT NOT NULL,
    started_at REAL NOT NULL,
    ended_at REAL NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    cached_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    cost REAL NOT NULL,
    currency TEXT NOT NULL,
    latency REAL NOT NULL,
    ttft REAL,
    node_id TEXT NOT NULL,
    peer_id TEXT NOT NULL,
    receipt_signature TEXT NOT NULL,
    outcome TEXT NOT NULL,
    error_code TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS usage_key ON usage (key_id, ended_at);
CREATE INDEX IF NOT EXISTS usage_portal ON usage (portal, ended_at);
CREATE INDEX IF NOT EXISTS usage_request ON usage (request_id);
"""
_INSERT = f"INSERT INTO usage ({', '.join(FIELDS)}) VALUES ({', '.join('?' * len(FIELDS))})"
_ROW = operator.attrgetter(*FIELDS)
_GROUP_SQL = {"key": "key_id", "model": "model_asked", "day": "date(ended_at, 'unixepoch')", "portal": "portal"}


class Store(Protocol):
    """Keys and the usage ledger (see the module docstring). All methods block."""

    def put_key(self, key: ApiKey) -> None:
        """Insert or replace a key's record (durable on return)."""
        ...

    def keys(self) -> list[ApiKey]:
        ...

    def append(self, records: Sequence[UsageRecord], *, wait: float | None = None) -> None:
        """Add ledger rows in one transaction, durable on return. ``wait``: the longest to
        wait for another writer's lock (an operator's ``sqlite3`` session) before raising."""
        ...

    def spent_since(self, column: str, since: float,
                    currencies: Mapping[str, str] | None = None) -> dict[str, tuple[float, int]]:
        """``{subject: (cost, tokens)}`` of rows that ended at or after ``since``, per
        ``key_id`` or ``portal``; with ``currencies`` (``{subject: currency}``, a budget's
        currency), a subject's cost sums only its rows in that currency (its tokens, all)."""
        ...

    def report(self, *, by: str = "key", portal: str | None = None, key_id: str | None = None,
               since: float | None = None, until: float | None = None) -> list[dict[str, Any]]:
        """Totals grouped ``by`` key, model (as asked), day (UTC) or portal."""
        ...

    def records(self, *, portal: str | None = None, key_id: str | None = None, since: float | None = None,
                until: float | None = None, request_id: str | None = None,
                limit: int | None = None) -> list[UsageRecord]:
        ...

    def close(self) -> None:
        ...


def _where(portal: str | None, key_id: str | None, since: float | None, until: float | None,
           request_id: str | None = None) -> tuple[str, list[Any]]:
    clauses, args = [], []
    for column, op, value in (("portal", "=", portal), ("key_id", "=", key_id), ("ended_at", ">=", since),
                              ("ended_at", "<", until), ("request_id", "=", request_id)):
        if value is not None:
            clauses.append(f"{column} {op} ?")
            args.append(value)
    return (" WHERE " + " AND ".join(clauses) if clauses else ""), args


_BUSY_MS = 10_000
"""How long a statement waits for another connection's lock (milliseconds)."""


class StoreInUse(ConfigError):
    """The usage store is held by another cortex (see :func:`_hold`): the cortex does not
    start (one line, as a config error)."""


def _hold(path: str) -> int:
    """Lock ``path`` for this process (``flock``, beside SQLite's own locks, which it does not
    touch) and return the descriptor holding the lock, or raise :class:`StoreInUse`. Two
    cortexes on one usage store each kept their own keys and budgets in memory: a tenant
    could spend its budget once on each, a key revoked on one kept working on the other, and
    a key made on one was unknown to the other."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StoreInUse(f"the usage store {path} is in use by another cortex (two cortexes on one usage store "
                         f"would each keep their own budgets and keys; give each its own usage_store)") from None
    return fd


class SqliteStore:
    """:class:`Store` in one SQLite file (``:memory:`` shares one connection, for tests);
    ``synchronous`` is SQLite's (``FULL`` or ``NORMAL``, see the module docstring)."""

    def __init__(self, path: Path | str, *, synchronous: str = "FULL", exclusive: bool = False) -> None:
        if synchronous not in ("FULL", "NORMAL"):
            raise ValueError("synchronous is FULL or NORMAL")
        self.synchronous = synchronous
        self.path = str(path)
        memory = self.path == ":memory:"
        self._held: int | None = None
        if not memory:
            secret_files.private_file(self.path)  # others' answers and the keys' digests: 0600
            if exclusive:
                self._held = _hold(self.path)
        self._w = self._connect()
        self._r = self._w if memory else self._connect()
        self._wlock = threading.Lock()
        self._rlock = self._wlock if memory else threading.Lock()

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={self.synchronous}")
        db.execute(f"PRAGMA busy_timeout={_BUSY_MS}")
        db.executescript(_SCHEMA)
        return db

    def close(self) -> None:
        with self._wlock:
            self._w.close()
        if self._r is not self._w:
            with self._rlock:
                self._r.close()
        if self._held is not None:
            os.close(self._held)  # (and its lock with it)
            self._held = None

    # --- keys ------------------------------------------------------------------------------

    def put_key(self, key: ApiKey) -> None:
        with self._wlock:
            self._w.execute(
                "INSERT OR REPLACE INTO api_keys VALUES (?,?,?,?,?,?,?,?,?)",
                (key.key_id, key.portal, key.name, key.digest, json.dumps(key.limits.as_dict()),
                 None if key.models is None else json.dumps(list(key.models)), key.created_at, key.expires_at,
                 key.revoked_at))

    def keys(self) -> list[ApiKey]:
        with self._rlock:
            rows = self._r.execute("SELECT * FROM api_keys ORDER BY created_at, key_id").fetchall()
        return [ApiKey(kid, portal, name, bytes(digest), Limits.from_dict(json.loads(limits)),
                       None if models is None else tuple(json.loads(models)), created, expires, revoked)
                for kid, portal, name, digest, limits, models, created, expires, revoked in rows]

    # --- the ledger ------------------------------------------------------------------------

    def append(self, records: Sequence[UsageRecord], *, wait: float | None = None) -> None:
        with self._wlock:
            if wait is not None:
                self._w.execute(f"PRAGMA busy_timeout={max(0, int(wait * 1000))}")
            try:
                self._append(records)
            finally:
                if wait is not None:
                    self._w.execute(f"PRAGMA busy_timeout={_BUSY_MS}")

    def _append(self, records: Sequence[UsageRecord]) -> None:
        if len(records) == 1:  # one statement, its own transaction (autocommit)
            self._w.execute(_INSERT, _ROW(records[0]))
            return
        rows = [_ROW(r) for r in records]
        self._w.execute("BEGIN IMMEDIATE")
        try:
            self._w.executemany(_INSERT, rows)
        except BaseException:
            self._w.execute("ROLLBACK")
            raise
        self._w.execute("COMMIT")

    def spent_since(self, column: str, since: float,
                    currencies: Mapping[str, str] | None = None) -> dict[str, tuple[float, int]]:
        if column not in ("key_id", "portal"):
            raise ValueError("column is key_id or portal")
        with self._rlock:
            rows = self._r.execute(
                f"SELECT {column}, currency, SUM(cost), SUM(prompt_tokens + completion_tokens) FROM usage "
                f"WHERE ended_at >= ? GROUP BY {column}, currency", (since,)).fetchall()
        out: dict[str, tuple[float, int]] = {}
        for subject, currency, cost, tokens in rows:
            money, used = out.get(subject, (0.0, 0))
            if currencies is None or currencies.get(subject) == currency:
                money += cost or 0.0
            out[subject] = (money, used + (tokens or 0))
        return out

    def report(self, *, by: str = "key", portal: str | None = None, key_id: str | None = None,
               since: float | None = None, until: float | None = None) -> list[dict[str, Any]]:
        if by not in GROUPS:
            raise ValueError(f"by is one of {', '.join(GROUPS)}")
        where, args = _where(portal, key_id, since, until)
        group = _GROUP_SQL[by]
        with self._rlock:
            rows = self._r.execute(
                f"SELECT {group}, currency, SUM({CALL_SQL}), SUM(prompt_tokens), SUM(cached_tokens), "
                f"SUM(completion_tokens), SUM(cost), SUM(outcome != 'ok') FROM usage{where} "
                f"GROUP BY {group}, currency ORDER BY {group}, currency", args).fetchall()
        return [{by: g, "currency": cur, "requests": n, "prompt_tokens": p, "cached_tokens": c,
                 "completion_tokens": o, "total_tokens": p + o, "cost": _money(cost), "incomplete": bad}
                for g, cur, n, p, c, o, cost, bad in rows]

    def records(self, *, portal: str | None = None, key_id: str | None = None, since: float | None = None,
                until: float | None = None, request_id: str | None = None,
                limit: int | None = None) -> list[UsageRecord]:
        where, args = _where(portal, key_id, since, until, request_id)
        sql = f"SELECT {', '.join(FIELDS)} FROM usage{where} ORDER BY ended_at, id"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        with self._rlock:
            rows = self._r.execute(sql, args).fetchall()
        return [UsageRecord(*row) for row in rows]


def _money(total: float | None) -> float | None:
    """A sum of costs without the binary floating-point residue of adding them up
    (0.1 + 0.2 is 0.30000000000000004), which reports and CSV exports printed; 12
    decimals keep any one token's cost exact (a price per million tokens, to 6 decimals)."""
    return None if total is None else round(total, 12)
