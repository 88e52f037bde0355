"""A revoked key leaves no state behind in the cortex but its row in the ledger.

Operators who mint a key per customer, job or session and revoke it after (the admin API
makes it one call each way) kept, for every key ever revoked, its quota account, its
fairness tenant and its cache scope in memory for good (and rebuilt every revoked key's
account from the ledger at each start). Here many keys are created, used and revoked
over real sockets: the cortex's per-key state stays at the live keys'."""

from __future__ import annotations

import httpx
import pytest
import trio

from helexa.roles.cortex.fleet import Fleet
from helexa.roles.cortex.portal.store import SqliteStore
from neuron_double import NeuronDouble
from portals import acme, bearer, portals
from serving import admin_headers

CHAT = {"model": "fast", "max_tokens": 4, "messages": [{"role": "user", "content": "x"}]}


async def test_revoked_keys_leave_no_account_tenant_or_scope_behind() -> None:
    fleet = Fleet()
    NeuronDouble("n1", fleet, loaded=("chat",))
    store = SqliteStore(":memory:")
    tables = {"acme": acme(quotas={"rpm": 600, "budget": 5.0, "period": "month"})}
    async with portals(fleet, tables, store=store) as (gateway, urls):
        portal = gateway.portals["acme"]
        with trio.fail_after(60):
            async with httpx.AsyncClient(base_url=urls["default"], headers=admin_headers()) as admin, \
                    httpx.AsyncClient(base_url=urls["acme"]) as api:
                kept = (await admin.post("/admin/keys", json={"portal": "acme", "name": "kept"})).json()
                for i in range(40):
                    made = (await admin.post("/admin/keys", json={"portal": "acme", "name": f"job-{i}"})).json()
                    r = await api.post("/v1/chat/completions", json=CHAT, headers=bearer(made["key"]))
                    assert r.status_code == 200, r.text
                    gone = (await admin.post(f"/admin/keys/{made['key_id']}/revoke")).json()
                    assert gone["state"] == "revoked"
                    assert (await api.post("/v1/chat/completions", json=CHAT,
                                           headers=bearer(made["key"]))).status_code == 401
                r = await api.post("/v1/chat/completions", json=CHAT, headers=bearer(kept["key"]))
                assert r.status_code == 200
                shown = (await admin.get(f"/admin/keys/{kept['key_id']}")).json()
    assert shown["quota"]["spent"]["money"] == pytest.approx(0.008)  # the live key is still metered
    key_accounts = [s for s in gateway.metering._accounts if s.startswith("key:")]
    assert key_accounts == ["key:" + kept["key_id"]]
    assert len(gateway.metering._portal_of) <= 2  # the kept key's and the portal's
    assert len(portal._tenants) <= 1 and len(portal._scopes) <= 2
