"""The stored responses' SQLite file: input items kept, and a file from before they were."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from helexa.roles.cortex.portal.response_store import ResponseStore, StoredResponse

ITEMS = [{"id": "msg_1", "type": "message", "role": "user", "status": "completed",
          "content": [{"type": "input_text", "text": "hi"}]}]


def test_a_response_keeps_its_input_items(tmp_path: Path) -> None:
    store = ResponseStore(tmp_path / "r.db")
    store.put(StoredResponse("resp_1", "acme", "k", 10.0, 100.0, {"id": "resp_1"}, [], ITEMS))
    assert store.get("resp_1", "acme", "k", 11.0).input_items == ITEMS
    store.close()


def test_a_file_written_before_input_items_opens_and_lists_none_for_its_rows(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.executescript("""CREATE TABLE responses (id TEXT PRIMARY KEY, portal TEXT NOT NULL, key_id TEXT NOT NULL,
        created_at REAL NOT NULL, expires_at REAL NOT NULL, body TEXT NOT NULL, history TEXT NOT NULL);
        INSERT INTO responses VALUES ('resp_old', 'acme', 'k', 1.0, 100.0, '{"id": "resp_old"}', '[]');""")
    db.commit()
    db.close()
    store = ResponseStore(path)
    assert store.get("resp_old", "acme", "k", 2.0).input_items == []
    store.put(StoredResponse("resp_new", "acme", "k", 3.0, 100.0, {"id": "resp_new"}, [], ITEMS))
    assert store.get("resp_new", "acme", "k", 4.0).input_items == ITEMS
    store.close()
