"""Stored ``/v1/responses`` answers (``store: true``): what ``GET /v1/responses/{id}`` reads
back and what ``previous_response_id`` continues.

One row per stored response, in its own table of the cortex's SQLite file (the ledger's
file, :mod:`.store`; its own connection, so a slow ledger commit never waits on it nor it
on one). A row belongs to the portal and the key that made it: every read and delete
names both, so one key never sees another's responses (an open portal's are its own,
under the empty key id). Each row expires ``retention`` seconds after it was made
(``[portals.NAME] responses_retention``); expired rows are never returned and are
deleted as new ones are written.

Every method blocks on the disk: the cortex calls them off the trio thread.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    id TEXT PRIMARY KEY,
    portal TEXT NOT NULL,
    key_id TEXT NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    body TEXT NOT NULL,
    history TEXT NOT NULL,
    input_items TEXT NOT NULL DEFAULT '[]'
);
CREATE INDEX IF NOT EXISTS responses_expiry ON responses (expires_at);
"""
_ADDED_COLUMNS = {"input_items": "ALTER TABLE responses ADD COLUMN input_items TEXT NOT NULL DEFAULT '[]'"}
"""Columns added since the table was first written: added to an older file when opened."""


@dataclass(frozen=True, slots=True)
class StoredResponse:
    """A stored answer: ``body`` the Response object as it was sent; ``history`` the
    conversation through its output as chat messages (without its ``instructions``,
    which a continuation does not inherit); ``input_items`` its own input as the items
    ``GET /v1/responses/{id}/input_items`` lists."""

    id: str
    portal: str
    key_id: str
    created_at: float
    expires_at: float
    body: dict[str, Any]
    history: list[dict[str, Any]]
    input_items: list[dict[str, Any]] = field(default_factory=list)


class ResponseStore:
    """Stored responses in SQLite (``:memory:``: a private in-memory database, for tests)."""

    def __init__(self, path: Path | str) -> None:
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # a lost answer is re-asked; a lost bill is not
        self._db.execute("PRAGMA busy_timeout=10000")
        self._db.executescript(_SCHEMA)
        have = {row[1] for row in self._db.execute("PRAGMA table_info(responses)")}
        for column, ddl in _ADDED_COLUMNS.items():
            if column not in have:
                self._db.execute(ddl)
        self._lock = threading.Lock()

    def put(self, response: StoredResponse) -> None:
        """Store ``response`` (replacing one of the same id) and delete every expired row."""
        with self._lock:
            self._db.execute("DELETE FROM responses WHERE expires_at <= ?", (response.created_at,))
            self._db.execute(
                "INSERT OR REPLACE INTO responses VALUES (?,?,?,?,?,?,?,?)",
                (response.id, response.portal, response.key_id, response.created_at, response.expires_at,
                 json.dumps(response.body), json.dumps(response.history), json.dumps(response.input_items)))

    def get(self, response_id: str, portal: str, key_id: str, now: float) -> StoredResponse | None:
        """The response, if ``portal``'s ``key_id`` made it and it has not expired."""
        with self._lock:
            row = self._db.execute(
                "SELECT id, portal, key_id, created_at, expires_at, body, history, input_items FROM responses "
                "WHERE id = ? AND portal = ? AND key_id = ? AND expires_at > ?",
                (response_id, portal, key_id, now)).fetchone()
        if row is None:
            return None
        rid, p, k, created, expires, body, history, items = row
        return StoredResponse(rid, p, k, created, expires, json.loads(body), json.loads(history), json.loads(items))

    def delete(self, response_id: str, portal: str, key_id: str, now: float) -> bool:
        """Delete the response; False when there was none this caller could see."""
        with self._lock:
            cur = self._db.execute("DELETE FROM responses WHERE id = ? AND portal = ? AND key_id = ? AND expires_at > ?",
                                   (response_id, portal, key_id, now))
        return cur.rowcount > 0

    def purge(self, now: float) -> int:
        """Delete every expired row; returns how many."""
        with self._lock:
            return self._db.execute("DELETE FROM responses WHERE expires_at <= ?", (now,)).rowcount

    def close(self) -> None:
        with self._lock:
            self._db.close()
