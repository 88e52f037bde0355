"""A store that refuses writes (its disk full, its lock held by an operator's ``sqlite3``
session past the busy timeout, gone read-only): the admin API's key changes and the stored
``/v1/responses`` answers get ``503 store_unavailable`` with ``Retry-After`` in their own
error shapes, and work again once it takes writes. Before, each was a 500 ``internal_error``
and a traceback in the log. Real sockets, a real SQLite file made to refuse writes."""

from __future__ import annotations

import json

import httpx

from helexa.roles.cortex.fleet import Fleet
from helexa.roles.cortex.portal.store import SqliteStore
from neuron_double import NeuronDouble
from portals import acme, portals
from serving import admin_headers

RESPONSE = {"model": "chat", "input": "hi", "max_output_tokens": 4}


def refuse_writes(gateway, on: bool) -> None:  # noqa: ANN001
    """SQLite's own refusal (``attempt to write a readonly database``), on every connection."""
    for db in (gateway.store._w, gateway.responses.store._db):
        db.execute(f"PRAGMA query_only={int(on)}")


async def test_a_store_that_refuses_writes_is_a_503_not_a_500_and_recovers(tmp_path, caplog) -> None:
    fleet = Fleet()
    NeuronDouble("n1", fleet, loaded=("chat",), tokens=2)
    store = SqliteStore(tmp_path / "usage.sqlite")
    async with portals(fleet, {"acme": acme()}, store=store) as (gateway, urls):
        async with httpx.AsyncClient(base_url=urls["default"], timeout=10) as http:
            refuse_writes(gateway, True)
            made = await http.post("/admin/keys", json={"portal": "acme", "name": "ci"}, headers=admin_headers())
            assert made.status_code == 503, made.text
            assert made.headers["retry-after"] == "5"
            assert made.json()["error"]["code"] == "store_unavailable"

            answer = await http.post("/v1/responses", json=RESPONSE)
            assert answer.status_code == 503, answer.text
            error = answer.json()["error"]
            assert error["code"] == "store_unavailable" and "readonly" not in error["message"]

            async with http.stream("POST", "/v1/responses", json=RESPONSE | {"stream": True}) as streamed:
                events = [json.loads(line[6:]) async for line in streamed.aiter_lines() if line.startswith("data: ")]
            assert events[-1]["type"] == "response.failed"
            assert events[-1]["response"]["error"]["code"] == "store_unavailable"

            refuse_writes(gateway, False)
            assert (await http.post("/admin/keys", json={"portal": "acme", "name": "ci"},
                                    headers=admin_headers())).status_code == 201
            assert (await http.post("/v1/responses", json=RESPONSE)).status_code == 200
    assert "Traceback" not in caplog.text and "unexpected error" not in caplog.text
    assert "readonly database" in caplog.text  # the operator's log says why
    store.close()
