"""The admin API over a real socket: keys created, used, changed, rotated and revoked;
usage reports; the portals' state; the admin token and the admin socket."""

from __future__ import annotations

import json

import httpx
import pytest
import trio

from helexa.admin_client import AdminClient, AdminError
from helexa.roles.cortex.fleet import Fleet
from helexa.roles.cortex.portal.store import SqliteStore
from helexa.roles.cortex.portal.usage import UsageRecord
from neuron_double import NeuronDouble
from portals import T0, acme, bearer, new_key, portals
from serving import ADMIN_TOKEN, admin_headers

CHAT = {"model": "fast", "max_tokens": 10, "messages": [{"role": "user", "content": "x"}]}


async def test_a_key_is_created_used_changed_rotated_and_revoked() -> None:
    fleet = Fleet()
    NeuronDouble("n1", fleet, loaded=("chat",))
    store = SqliteStore(":memory:")
    tables = {"acme": acme(quotas={"rpm": 60, "budget": 5.0, "period": "month"})}
    async with portals(fleet, tables, store=store) as (gateway, urls):
        async with httpx.AsyncClient(base_url=urls["default"], headers=admin_headers()) as admin, \
                httpx.AsyncClient(base_url=urls["acme"]) as api:
            made = await admin.post("/admin/keys", json={"portal": "acme", "name": "ci", "tpm": 5000,
                                                          "expires_at": "2099-01-01"})
            assert made.status_code == 201
            created = made.json()
            key, key_id = created["key"], created["key_id"]
            assert key.startswith("sk-hlx-" + key_id)
            assert created["limits"] == {"rpm": 60, "tpm": 5000, "max_concurrent": None, "budget": 5.0,
                                         "budget_unit": "money", "period": "month"}
            assert created["expires_at"] == 4070908800.0 and created["state"] == "active"

            assert (await api.post("/v1/chat/completions", json=CHAT, headers=bearer(key))).status_code == 200
            listed = (await admin.get("/admin/keys", params={"portal": "acme"})).json()["data"]
            assert [k["key_id"] for k in listed] == [key_id] and "key" not in listed[0]
            shown = (await admin.get(f"/admin/keys/{key_id}")).json()
            assert shown["quota"]["spent"]["money"] == pytest.approx(0.008)
            assert shown["period_usage"][0]["model"] == "fast" and shown["period_usage"][0]["requests"] == 1

            # rpm 2, with the request of this minute counted: one more now, not two
            patched = (await admin.patch(f"/admin/keys/{key_id}", json={"rpm": 2, "name": "ci-2"})).json()
            assert patched["limits"]["rpm"] == 2 and patched["limits"]["tpm"] == 5000 and patched["name"] == "ci-2"
            first = await api.post("/v1/chat/completions", json=CHAT, headers=bearer(key))
            second = await api.post("/v1/chat/completions", json=CHAT, headers=bearer(key))
            assert (first.status_code, second.status_code) == (200, 429)

            rotated = (await admin.post(f"/admin/keys/{key_id}/rotate")).json()
            new = rotated["key"]
            assert new != key and rotated["key_id"] == key_id
            assert (await api.get("/v1/models", headers=bearer(key))).status_code == 401
            mine = (await api.get("/v1/usage", headers=bearer(new))).json()
            assert mine["spent"]["money"] == pytest.approx(0.016)  # the budget went on

            revoked = (await admin.post(f"/admin/keys/{key_id}/revoke")).json()
            assert revoked["state"] == "revoked"
            gone = await api.get("/v1/models", headers=bearer(new))
            assert gone.status_code == 401 and "revoked" in gone.json()["error"]["message"]
            assert (await admin.post(f"/admin/keys/{key_id}/rotate")).status_code == 400
    (stored,) = store.keys()
    assert stored.revoked_at is not None and stored.name == "ci-2"


async def test_usage_reports_group_filter_and_export() -> None:
    fleet = Fleet()
    NeuronDouble("n1", fleet, loaded=("chat", "embed"))
    async with portals(fleet, {"acme": acme()}) as (_, urls):
        async with httpx.AsyncClient(base_url=urls["default"], headers=admin_headers()) as admin, \
                httpx.AsyncClient(base_url=urls["acme"]) as api:
            k1 = (await admin.post("/admin/keys", json={"portal": "acme", "name": "a"})).json()
            k2 = (await admin.post("/admin/keys", json={"portal": "acme", "name": "b"})).json()
            for key, body, path in ((k1, CHAT, "/v1/chat/completions"), (k1, CHAT, "/v1/chat/completions"),
                                    (k2, {"model": "embed", "input": ["a", "b"]}, "/v1/embeddings")):
                assert (await api.post(path, json=body, headers=bearer(key["key"]))).status_code == 200
            by_key = {r["key"]: r for r in (await admin.get("/admin/usage", params={"by": "key"})).json()["data"]}
            by_model = (await admin.get("/admin/usage", params={"by": "model", "key": k1["key_id"]})).json()["data"]
            by_day = (await admin.get("/admin/usage", params={"by": "day", "since": "2000-01-01"})).json()["data"]
            none = (await admin.get("/admin/usage", params={"until": "2000-01-01"})).json()["data"]
            csv = await admin.get("/admin/usage", params={"by": "portal", "format": "csv"})
            records = (await admin.get("/admin/usage/records", params={"key": k2["key_id"]})).json()["data"]
            bad = await admin.get("/admin/usage", params={"by": "week"})
            bad_time = await admin.get("/admin/usage", params={"since": "yesterday"})
            # Answered as if understood: format=xml in JSON, limit=-1 with one row, 10**6 with 100,000.
            bad_format = await admin.get("/admin/usage", params={"format": "xml"})
            bad_limits = [await admin.get("/admin/usage/records", params={"limit": v})
                          for v in ("-1", "0", "1000001", "x")]
            one = (await admin.get("/admin/usage/records", params={"limit": "1"})).json()["data"]
            # As bounds, NaN matched no row and -inf every one, answered 200 as if they meant something.
            not_finite = [await admin.get(path, params={bound: value})
                          for path in ("/admin/usage", "/admin/usage/records")
                          for bound in ("since", "until") for value in ("nan", "inf", "-inf", "-Infinity")]
    assert by_key[k1["key_id"]]["requests"] == 2 and by_key[k1["key_id"]]["total_tokens"] == 16
    assert by_key[k2["key_id"]]["prompt_tokens"] == 2 and by_key[k2["key_id"]]["completion_tokens"] == 0
    assert [(r["model"], r["requests"]) for r in by_model] == [("fast", 2)]
    assert len(by_day) == 1 and by_day[0]["requests"] == 3 and none == []
    assert csv.headers["content-type"].startswith("text/csv")
    assert csv.text.splitlines()[0].startswith("portal,currency,requests") and "acme,EUR,3" in csv.text
    assert [(r["endpoint"], r["model_served"]) for r in records] == [("embeddings", "embed")]
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "by"
    assert bad_format.status_code == 400 and bad_format.json()["error"]["param"] == "format"
    assert [(r.status_code, r.json()["error"]["param"]) for r in bad_limits] == [(400, "limit")] * 4
    assert len(one) == 1
    assert bad_time.status_code == 400 and bad_time.json()["error"]["param"] == "since"
    assert {(r.status_code, r.json()["error"]["param"]) for r in not_finite} == {(400, "since"), (400, "until")}


async def test_bad_admin_requests_name_what_is_wrong() -> None:
    fleet = Fleet()
    async with portals(fleet, {"acme": acme()}) as (_, urls):
        async with httpx.AsyncClient(base_url=urls["default"], headers=admin_headers()) as admin:
            cases = {
                "unknown portal": await admin.post("/admin/keys", json={"portal": "nope", "name": "x"}),
                "unknown field": await admin.post("/admin/keys", json={"portal": "acme", "name": "x", "rmp": 3}),
                "bad period": await admin.post("/admin/keys", json={"portal": "acme", "name": "x", "period": "week"}),
                "unserved model": await admin.post("/admin/keys", json={"portal": "acme", "name": "x",
                                                                        "models": ["chat2"]}),
                "unknown key": await admin.get("/admin/keys/0123456789abcdef"),
                "unknown action": await admin.post("/admin/keys/0123456789abcdef/explode"),
            }
            open_key = await admin.post("/admin/keys", json={"portal": "default", "name": "x"})
    got = {name: (r.status_code, r.json()["error"]["param"]) for name, r in cases.items()}
    assert got == {"unknown portal": (404, "portal"), "unknown field": (400, "rmp"), "bad period": (400, "period"),
                   "unserved model": (400, "models"), "unknown key": (404, None), "unknown action": (404, None)}
    assert open_key.status_code == 201 and "open" in open_key.json()["warning"]


async def test_a_wrong_method_on_an_admin_path_that_exists_is_a_405_naming_the_right_ones() -> None:
    fleet = Fleet()
    NeuronDouble("n1", fleet, loaded=("chat",))
    async with portals(fleet, {"acme": acme()}) as (_, urls):
        async with httpx.AsyncClient(base_url=urls["default"], headers=admin_headers()) as admin:
            key_id = (await admin.post("/admin/keys", json={"portal": "acme", "name": "x"})).json()["key_id"]
            wrong = {
                ("POST", f"/admin/keys/{key_id}"): "GET, PATCH",  # was a 404
                ("PUT", f"/admin/keys/{key_id}"): "GET, PATCH",
                ("DELETE", "/admin/keys/0123456789abcdef"): "GET, PATCH",  # the path's methods, key or not
                ("GET", f"/admin/keys/{key_id}/revoke"): "POST",
                ("PATCH", f"/admin/keys/{key_id}/rotate"): "POST",
                ("PUT", "/admin/keys"): "GET, POST",
                ("DELETE", "/admin/usage"): "GET",
                ("PATCH", "/admin/models/chat"): "GET",
                ("PUT", "/admin/models/chat/load"): "GET, POST",
            }
            got = {(m, p): await admin.request(m, p) for m, p in wrong}
            missing = [await admin.post(f"/admin/keys/{key_id}/explode"), await admin.put("/admin/keys/"),
                       await admin.get(f"/admin/keys/{key_id}/revoke/x")]
            assert (await admin.get(f"/admin/keys/{key_id}")).status_code == 200
    for (method, path), allow in wrong.items():
        r = got[(method, path)]
        seen = (r.status_code, r.headers.get("allow"), r.json()["error"]["code"])
        assert seen == (405, allow, "method_not_allowed"), (method, path, r.text)
    assert [r.status_code for r in missing] == [404, 404, 404]
    assert all("allow" not in r.headers for r in missing)


async def test_the_portals_view_shows_settings_and_limits_state() -> None:
    fleet = Fleet()
    async with portals(fleet, {"acme": acme(limits={"rpm": 100}, theme={"logo": "/logo.svg",
                                                                         "colors": {"primary": "#0b5fff"}})}) as (_, urls):
        async with httpx.AsyncClient(base_url=urls["default"], headers=admin_headers()) as admin:
            data = {p["id"]: p for p in (await admin.get("/admin/portals")).json()["data"]}
    assert set(data) == {"default", "acme"}
    a = data["acme"]
    assert a["name"] == "Acme AI" and a["auth"] == "keys" and a["currency"] == "EUR"
    assert a["aliases"] == {"fast": "chat"} and a["prices"]["fast"] == {"input": 1000.0, "output": 1000.0}
    assert a["theme"] == {"name": "Acme AI", "logo": "/logo.svg", "colors": {"primary": "#0b5fff"}}
    assert a["state"]["limits"]["rpm"] == 100 and a["state"]["remaining_requests"] == 100
    assert data["default"]["auth"] == "none" and data["default"]["state"] is None


async def test_an_admin_socket_takes_the_admin_api_off_the_default_portal() -> None:
    fleet = Fleet()
    async with portals(fleet, {}, admin_socket="127.0.0.1:0") as (gateway, urls):
        (admin_url,) = gateway.admin_urls
        async with httpx.AsyncClient(headers=admin_headers()) as http:
            on_portal = await http.get(urls["default"] + "/admin/fleet")
            metrics_on_portal = await http.get(urls["default"] + "/metrics")
            on_admin = await http.get(admin_url + "/admin/fleet")
            metrics = await http.get(admin_url + "/metrics")
            models_on_admin = await http.get(admin_url + "/v1/models")
    assert admin_url != urls["default"]
    assert on_portal.status_code == metrics_on_portal.status_code == 404
    assert on_admin.status_code == 200 and metrics.status_code == 200 and models_on_admin.status_code == 404


async def test_the_cli_pointed_at_a_portal_when_an_admin_socket_serves_the_admin_api_is_told_where_to_go() -> None:
    fleet = Fleet()
    async with portals(fleet, {}, admin_socket="127.0.0.1:0") as (gateway, urls):
        (admin_url,) = gateway.admin_urls

        def ask(url: str) -> str:
            try:
                return str(AdminClient(url, ADMIN_TOKEN).get("/admin/fleet"))
            except AdminError as exc:
                return str(exc)

        wrong = await trio.to_thread.run_sync(ask, urls["default"])
        right = await trio.to_thread.run_sync(ask, admin_url)
    assert wrong.startswith("the cortex answered 404 for GET /admin/fleet: no route /admin/fleet")
    assert f"{urls['default']} serves no admin API" in wrong and "pass --cortex" in wrong
    assert "answered" not in right


async def test_the_cli_asking_a_route_an_earlier_cortex_lacks_is_told_so_not_sent_to_an_admin_socket() -> None:
    """``helexa neurons keys`` of this release against a cortex of 2026-12-01 15:00 (no such
    route): the hint said the address served no admin API and to look for an admin_socket."""
    async with portals(Fleet(), {}) as (_, urls):
        def ask() -> str:
            try:
                return str(AdminClient(urls["default"], ADMIN_TOKEN).get("/admin/neurons/of-a-later-release"))
            except AdminError as exc:
                return str(exc)

        said = await trio.to_thread.run_sync(ask)
    assert said.startswith("the cortex answered 404 for GET /admin/neurons/of-a-later-release: no route")
    assert "serves the admin API, but not this route: the cortex runs an earlier release" in said
    assert "admin_socket" not in said


@pytest.mark.parametrize("admin_socket", [None, "127.0.0.1:0"], ids=["on-the-default-portal", "on-an-admin-socket"])
async def test_metrics_need_the_admin_token_wherever_they_are_served(admin_socket) -> None:
    fields = {"admin_socket": admin_socket} if admin_socket else {}
    async with portals(Fleet(), {}, **fields) as (gateway, _):
        (url,) = gateway.admin_urls
        async with httpx.AsyncClient() as http:
            anonymous = await http.get(url + "/metrics")
            wrong = await http.get(url + "/metrics", headers=bearer("hlx-admin-wrong"))
            right = await http.get(url + "/metrics", headers=admin_headers())
    assert anonymous.status_code == wrong.status_code == 401
    assert "admin token" in anonymous.json()["error"]["message"] and "helexa_" not in anonymous.text
    assert right.status_code == 200 and "helexa_" in right.text


async def test_metrics_public_serves_them_without_the_token_and_nothing_else() -> None:
    async with portals(Fleet(), {}, gateway={"metrics_public": True}) as (gateway, _):
        (url,) = gateway.admin_urls
        async with httpx.AsyncClient() as http:
            metrics = await http.get(url + "/metrics")
            fleet = await http.get(url + "/admin/fleet")
    assert metrics.status_code == 200 and fleet.status_code == 401


async def test_metrics_from_an_address_outside_admin_clients_are_forbidden_even_with_the_token() -> None:
    async with portals(Fleet(), {}, gateway={"admin_clients": ["10.9.9.9"]}) as (gateway, _):
        (url,) = gateway.admin_urls
        async with httpx.AsyncClient() as http:
            metrics = await http.get(url + "/metrics", headers=admin_headers())
    assert metrics.status_code == 403


async def test_a_portal_removed_from_the_config_keeps_its_usage_and_keys_in_the_reports(tmp_path) -> None:
    """A portal taken out of cortex.toml (a restart later) leaves its ledger rows and keys:
    `helexa usage --portal` and `keys list --portal` still show them (the operator bills
    them); a portal that never was is still 404."""
    store = SqliteStore(tmp_path / "usage.sqlite")
    secret_key = new_key(store, "beta")
    key_id = secret_key.removeprefix("sk-hlx-").split("_")[0]
    store.append([UsageRecord(request_id="r1", portal="beta", key_id=key_id, endpoint="chat", model_asked="chat",
                              model_served="chat", started_at=T0, ended_at=T0 + 1, prompt_tokens=3,
                              completion_tokens=4, cost=0.5, currency="USD")])
    async with portals(Fleet(), {"acme": acme()}, store=store) as (_, urls):
        async with httpx.AsyncClient(base_url=urls["default"], headers=admin_headers()) as admin:
            usage = await admin.get("/admin/usage?by=portal&portal=beta")
            records = await admin.get("/admin/usage/records?portal=beta")
            listed = await admin.get("/admin/keys?portal=beta")
            typos = [await admin.get(path + "?portal=betta")
                     for path in ("/admin/usage", "/admin/usage/records", "/admin/keys")]
    store.close()
    assert usage.status_code == 200, usage.text
    assert [(r["portal"], r["requests"], r["cost"]) for r in usage.json()["data"]] == [("beta", 1, 0.5)]
    assert [r["request_id"] for r in records.json()["data"]] == ["r1"]
    assert [k["key_id"] for k in listed.json()["data"]] == [key_id]
    assert [(r.status_code, r.json()["error"]["param"]) for r in typos] == [(404, "portal")] * 3


async def test_a_revoked_key_stops_its_streams_in_flight_and_a_rotated_one_does_not() -> None:
    """`keys revoke` "stops at once" (docs/portals.md): a stream the key has running ends at
    its next token with the 401 error event, the neuron is told to cancel, and the tokens
    it produced are billed; a rotation (same key, new secret) lets its streams finish."""
    fleet = Fleet()
    neuron = NeuronDouble("n1", fleet, loaded=("chat",), tokens=60, token_delay=0.05)
    store = SqliteStore(":memory:")
    async with portals(fleet, {"acme": acme()}, store=store) as (_, urls):
        async with httpx.AsyncClient(base_url=urls["default"], headers=admin_headers()) as admin, \
                httpx.AsyncClient(base_url=urls["acme"]) as api:
            ends = {}
            for action in ("rotate", "revoke"):
                made = (await admin.post("/admin/keys", json={"portal": "acme", "name": action})).json()
                chunks: list[str] = []
                body = {"model": "fast", "max_tokens": 60, "stream": True,
                        "messages": [{"role": "user", "content": "x"}]}
                async with api.stream("POST", "/v1/chat/completions", json=body, headers=bearer(made["key"])) as r:
                    assert r.status_code == 200
                    async for line in r.aiter_lines():
                        if line.startswith("data: "):
                            chunks.append(line)
                            if len(chunks) == 5:
                                acted = await admin.post(f"/admin/keys/{made['key_id']}/{action}")
                                assert acted.status_code == 200
                ends[action] = (len(chunks), chunks[-1], made["key_id"])
            records = {r["key_id"]: r for r in (await admin.get("/admin/usage/records")).json()["data"]}
    n, last, _ = ends["rotate"]
    assert n > 60 and last == "data: [DONE]"  # all 60 tokens, then the end
    n, last, key_id = ends["revoke"]
    assert n < 15 and json.loads(last.removeprefix("data: "))["error"]["code"] == "invalid_api_key"
    assert f"key {key_id} was revoked" in last
    assert len(neuron.cancelled) == 1
    billed = records[key_id]
    assert (billed["outcome"], billed["error_code"]) == ("error", "invalid_api_key")
    assert 4 <= billed["completion_tokens"] < 15 and billed["cost"] > 0


async def test_a_revoke_stops_a_whole_answer_still_generating_at_once() -> None:
    """A non-streamed answer has no event before its end (a real neuron collects it), so a
    revoke that waited for "its next token" let it generate to the end for nothing: here 5.5 s
    of a neuron's time after the revoke, billed 0. It is stopped at once: the 401, the
    neuron told to cancel, the ledger's record of the key's error."""
    fleet = Fleet()
    neuron = NeuronDouble("n1", fleet, loaded=("chat",), tokens=60, token_delay=0.1)
    neuron.collect = True
    store = SqliteStore(":memory:")
    async with portals(fleet, {"acme": acme()}, store=store) as (_, urls):
        async with httpx.AsyncClient(base_url=urls["default"], headers=admin_headers()) as admin, \
                httpx.AsyncClient(base_url=urls["acme"], timeout=30) as api:
            made = (await admin.post("/admin/keys", json={"portal": "acme", "name": "whole"})).json()
            answers = []

            async def ask(path: str, body: dict) -> None:
                answers.append(await api.post(path, json=body, headers=bearer(made["key"])))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(ask, "/v1/chat/completions", {**CHAT, "max_tokens": 60})
                nursery.start_soon(ask, "/v1/messages", {**CHAT, "max_tokens": 60})
                await trio.sleep(0.5)
                assert (await admin.post(f"/admin/keys/{made['key_id']}/revoke")).status_code == 200
                revoked = trio.current_time()
            took = trio.current_time() - revoked
            records = (await admin.get(f"/admin/usage/records?key={made['key_id']}")).json()["data"]
    assert took < 2.0, (took, [a.text for a in answers])  # not the 5.5 s the answers had left
    assert sorted(a.status_code for a in answers) == [401, 401], [a.text for a in answers]
    assert all(f"key {made['key_id']} was revoked" in a.text for a in answers)
    assert len(neuron.cancelled) == 2 and not neuron.finished
    assert sorted((r["outcome"], r["error_code"]) for r in records) == [("error", "invalid_api_key")] * 2


async def test_a_revoke_stops_embeddings_in_flight_at_once() -> None:
    """Embeddings follow the revoke rule of generations: one still running when its key is
    revoked gets the 401 at once (OpenAI's and Ollama's shapes), its neuron work cancelled,
    the ledger's record of the key's error; not the answer 5 s later."""
    fleet = Fleet()
    neuron = NeuronDouble("n1", fleet, loaded=("embed",))
    neuron.embed_delay = 5.0
    store = SqliteStore(":memory:")
    async with portals(fleet, {"acme": acme()}, store=store) as (_, urls):
        async with httpx.AsyncClient(base_url=urls["default"], headers=admin_headers()) as admin, \
                httpx.AsyncClient(base_url=urls["acme"], timeout=30) as api:
            made = (await admin.post("/admin/keys", json={"portal": "acme", "name": "vectors"})).json()
            answers = {}

            async def ask(path: str) -> None:
                field = "prompt" if path == "/api/embeddings" else "input"  # Ollama's legacy form
                answers[path] = await api.post(path, json={"model": "embed", field: "x"}, headers=bearer(made["key"]))

            async with trio.open_nursery() as nursery:
                for path in ("/v1/embeddings", "/api/embed", "/api/embeddings"):
                    nursery.start_soon(ask, path)
                await trio.sleep(0.5)
                assert (await admin.post(f"/admin/keys/{made['key_id']}/revoke")).status_code == 200
                revoked = trio.current_time()
            took = trio.current_time() - revoked
            records = (await admin.get(f"/admin/usage/records?key={made['key_id']}")).json()["data"]
    assert took < 2.0, (took, {p: a.text for p, a in answers.items()})
    assert {p: a.status_code for p, a in answers.items()} == dict.fromkeys(answers, 401)
    assert answers["/v1/embeddings"].json()["error"]["code"] == "invalid_api_key"
    assert all(f"key {made['key_id']} was revoked" in a.text for a in answers.values())
    assert set(answers["/api/embed"].json()) == {"error"}
    assert len(neuron.cancelled) == 3 and not neuron.finished
    assert sorted((r["outcome"], r["error_code"], r["prompt_tokens"]) for r in records) == [
        ("error", "invalid_api_key", 0)] * 3
