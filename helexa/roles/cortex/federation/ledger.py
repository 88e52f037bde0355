"""The durable ledger of federated usage: what this cortex served to peers and what it
consumed from them, one SQLite row per receipt.

Durability: a receipt is in the write-ahead log (``synchronous=NORMAL``) when
:meth:`Ledger.arecord` returns, so it survives ``kill -9`` of the cortex (not an OS crash,
as before). That append is made on the calling (trio) thread through a connection of its
own: it costs ~0.1 ms, where a worker-thread hop cost ~0.7 ms of every federated answer on
a busy machine (``docs/benchmarks.md``), and it never waits for a reader. What can take
milliseconds, the checkpoint that fsyncs the log into the database, is taken off the loop:
:meth:`Ledger.acheckpoint` runs it on a worker thread (the federation calls it every
announce interval), and SQLite's own automatic checkpoint is pushed back to a backstop of
:data:`_AUTOCHECKPOINT_PAGES` for a ledger nobody checkpoints. Reads run on worker threads
(``trio.to_thread``) through the other connection.
A receipt that failed verification is stored with ``flagged`` set and the reasons: it
is never silently accepted, and never silently dropped either.
"""

from __future__ import annotations

import logging
import math
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

import trio

from helexa import secret_files
from helexa.protocol import decode, encode
from helexa.protocol.federation import Receipt

log = logging.getLogger(__name__)

SERVED = "served"
CONSUMED = "consumed"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS receipts (
    direction TEXT NOT NULL,
    request_id TEXT NOT NULL,
    peer_id TEXT NOT NULL,
    model_id TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    cost REAL NOT NULL,
    started_at REAL NOT NULL,
    ended_at REAL NOT NULL,
    outcome TEXT NOT NULL,
    flagged INTEGER NOT NULL DEFAULT 0,
    flag_reason TEXT NOT NULL DEFAULT '',
    signature BLOB NOT NULL,
    raw BLOB NOT NULL,
    PRIMARY KEY (direction, request_id)
);
CREATE INDEX IF NOT EXISTS receipts_peer ON receipts (direction, peer_id);
"""


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    direction: str
    receipt: Receipt
    flagged: bool
    flag_reason: str

    @property
    def peer_id(self) -> str:
        r = self.receipt
        return r.client_peer_id if self.direction == SERVED else r.server_peer_id


@dataclass(frozen=True, slots=True)
class PeerSummary:
    direction: str
    peer_id: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cost: float
    flagged: int


_AUTOCHECKPOINT_PAGES = 10_000
"""SQLite checkpoints the log itself (on the writing thread) only past this many pages
(~40 MiB): normally :meth:`Ledger.acheckpoint` keeps it far smaller."""

CHECKPOINT_AFTER = 64
"""Records written before :meth:`Ledger.acheckpoint` bothers a worker thread."""


class Ledger:
    """A ledger file (``:memory:`` for tests). Use as a context manager or call
    :meth:`close`."""

    def __init__(self, path: Path | str) -> None:
        self.path = str(path)
        if self.path != ":memory:":
            secret_files.private_file(self.path)  # peers' usage and receipts: 0600, as the usage store
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()
        # Writes go through their own connection (a ``:memory:`` database is private to
        # its connection, so there it is the same one, under the same lock).
        if self.path == ":memory:":
            self._wdb, self._wlock = self._db, self._lock
        else:
            self._wdb = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._wdb.execute("PRAGMA synchronous=NORMAL")
            self._wdb.execute("PRAGMA busy_timeout=5000")
            self._wlock = threading.Lock()
        self._wdb.execute(f"PRAGMA wal_autocheckpoint={_AUTOCHECKPOINT_PAGES}")
        self._unchecked = 0
        self.recorded: dict[tuple[str, str], list[int]] = {}
        """Since this process started, per (direction, outcome): [requests, tokens] (for
        ``/metrics``; the ledger file holds the whole history)."""

    def __enter__(self) -> "Ledger":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with self._wlock:
            if self._wdb is not self._db:
                self._wdb.close()
        with self._lock:
            self._db.close()

    def checkpoint(self) -> None:
        """Move the write-ahead log into the database file (fsync; may take milliseconds)."""
        with self._lock:
            self._db.execute("PRAGMA wal_checkpoint(PASSIVE)")

    async def acheckpoint(self) -> None:
        """:meth:`checkpoint` on a worker thread, once :data:`CHECKPOINT_AFTER` records
        were written since the last one."""
        if self._unchecked < CHECKPOINT_AFTER:
            await trio.lowlevel.checkpoint()
            return
        self._unchecked = 0
        await trio.to_thread.run_sync(self.checkpoint)

    def record(self, direction: str, receipt: Receipt, *, flagged: bool = False, flag_reason: str = "") -> bool:
        """Store a receipt; False if one for this request and direction is already there."""
        if direction not in (SERVED, CONSUMED):
            raise ValueError(f"direction must be {SERVED!r} or {CONSUMED!r}")
        peer = receipt.client_peer_id if direction == SERVED else receipt.server_peer_id
        with self._wlock:
            cur = self._wdb.execute(
                "INSERT OR IGNORE INTO receipts VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (direction, receipt.request_id, peer, receipt.model_id, receipt.prompt_tokens,
                 receipt.completion_tokens, _finite(receipt.cost), _finite(receipt.started_at),
                 _finite(receipt.ended_at),
                 receipt.outcome, int(flagged), flag_reason, receipt.signature, encode(receipt)),
            )
            if cur.rowcount == 1:
                self._unchecked += 1
                counts = self.recorded.setdefault((direction, receipt.outcome), [0, 0])
                counts[0] += 1
                counts[1] += receipt.prompt_tokens + receipt.completion_tokens
            return cur.rowcount == 1

    def keep(self, direction: str, receipt: Receipt, *, flagged: bool = False, flag_reason: str = "") -> bool:
        """:meth:`record`, for the federated request paths: a receipt the database refuses
        (its disk full, its lock held by another process past the busy timeout) is logged
        at ERROR with what it says (request, peer, tokens, cost, signature), and False is
        returned. The request it ends was served already: its answer is not turned into a
        500 or cut short (the usage ledger, which bills it, decides whether it is served).
        Before, the ``OperationalError`` ended the request with a 500 (a stream cut without
        an error event) after its usage row was written as billed."""
        try:
            return self.record(direction, receipt, flagged=flagged, flag_reason=flag_reason)
        except sqlite3.Error as exc:
            log.error("federation ledger %s: the %s receipt of %s (peer %s, %d+%d tokens, cost %s, signature %s) "
                      "was not recorded: %s", self.path, direction, receipt.request_id,
                      receipt.client_peer_id if direction == SERVED else receipt.server_peer_id,
                      receipt.prompt_tokens, receipt.completion_tokens, receipt.cost, receipt.signature.hex(), exc)
            return False

    async def arecord(self, direction: str, receipt: Receipt, *, flagged: bool = False, flag_reason: str = "") -> bool:
        """:meth:`keep`, made on this thread (a log append, see the module docstring);
        durable against ``kill -9`` once it returns (False: a duplicate, or refused and
        logged). It never yields to the scheduler, so
        a cancellation can never skip it (it used to take a shielded checkpoint first: a
        scheduler round trip on both sides of every federated request, for nothing)."""
        return self.keep(direction, receipt, flagged=flagged, flag_reason=flag_reason)

    def entries(self, direction: str | None = None, peer_id: str | None = None) -> list[LedgerEntry]:
        sql = "SELECT direction, raw, flagged, flag_reason FROM receipts WHERE 1=1"
        args: list[str] = []
        if direction is not None:
            sql += " AND direction = ?"
            args.append(direction)
        if peer_id is not None:
            sql += " AND peer_id = ?"
            args.append(peer_id)
        with self._lock:
            rows = self._db.execute(sql + " ORDER BY started_at, request_id", args).fetchall()
        return [LedgerEntry(d, decode(raw), bool(f), reason) for d, raw, f, reason in rows]

    def get(self, direction: str, request_id: str) -> LedgerEntry | None:
        with self._lock:
            row = self._db.execute(
                "SELECT direction, raw, flagged, flag_reason FROM receipts WHERE direction=? AND request_id=?",
                (direction, request_id)).fetchone()
        return None if row is None else LedgerEntry(row[0], decode(row[1]), bool(row[2]), row[3])

    def summary(self) -> list[PeerSummary]:
        """Totals per direction and peer."""
        with self._lock:
            rows = self._db.execute(
                "SELECT direction, peer_id, COUNT(*), SUM(prompt_tokens), SUM(completion_tokens), SUM(cost), "
                "SUM(flagged) FROM receipts GROUP BY direction, peer_id ORDER BY direction, peer_id").fetchall()
        return [PeerSummary(*row) for row in rows]

    async def asummary(self) -> list[PeerSummary]:
        return await trio.to_thread.run_sync(self.summary)


def _finite(value: float) -> float:
    """``value`` for a REAL NOT NULL column: SQLite stores NaN as NULL, so a peer's receipt
    with a NaN cost or time failed the constraint and ``INSERT OR IGNORE`` dropped it
    without a word (a flagged receipt must be kept). Its ``raw`` column keeps what it said."""
    return value if math.isfinite(value) else 0.0


def format_report(summary: list[PeerSummary]) -> str:
    """A plain-text table of :meth:`Ledger.summary` (what ``helexa`` prints)."""
    if not summary:
        return "no federated usage recorded"
    lines = [f"{'direction':<9} {'peer':<54} {'requests':>8} {'prompt':>9} {'completion':>10} {'cost':>12} {'flagged':>7}"]
    for s in summary:
        lines.append(f"{s.direction:<9} {s.peer_id:<54} {s.requests:>8} {s.prompt_tokens:>9} "
                     f"{s.completion_tokens:>10} {s.cost:>12.6f} {s.flagged:>7}")
    return "\n".join(lines)


def report(path: Path | str) -> str:
    """Open the ledger at ``path`` and format its summary."""
    with Ledger(path) as ledger:
        return format_report(ledger.summary())
