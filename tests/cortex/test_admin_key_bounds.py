"""The admin API refuses key fields it could not store or show (400 naming the field), and
``helexa keys`` still lists, shows and revokes a key stored before it did."""

from __future__ import annotations

import math
import time

import httpx
import trio
from click.testing import CliRunner

from helexa.cli_portal import keys as keys_cli
from helexa.cli_portal import usage as usage_cli
from helexa.roles.cortex.fleet import Fleet
from helexa.roles.cortex.portal import keys
from helexa.roles.cortex.portal.quota import Limits
from helexa.roles.cortex.portal.store import SqliteStore
from helexa.roles.cortex.portal.usage import UsageRecord
from portals import T0, acme, portals
from serving import ADMIN_TOKEN, admin_headers

BIG = 99999999999999999999999


async def test_out_of_range_key_fields_are_refused_naming_the_field() -> None:
    fleet = Fleet()
    async with portals(fleet, {"acme": acme()}) as (_, urls):
        async with httpx.AsyncClient(base_url=urls["default"], headers=admin_headers()) as admin:
            ok = (await admin.post("/admin/keys", json={"portal": "acme", "name": "ok", "expires_at": "9999-12-31",
                                                        "rpm": 2**63 - 1, "budget": 1e15})).json()
            created = {
                "expires far": ("expires_at", {"expires_at": 1e30}),
                "expires unix ms": ("expires_at", {"expires_at": "99999999999999"}),
                "expires year 10000": ("expires_at", {"expires_at": "10000-01-01"}),
                "expires huge int": ("expires_at", {"expires_at": 10**400}),
                "expires negative": ("expires_at", {"expires_at": -1}),
                "expires past": ("expires_at", {"expires_at": "2000-01-01"}),
                "expires now": ("expires_at", {"expires_at": time.time() - 1}),
                "expires bool": ("expires_at", {"expires_at": True}),
                "rpm": ("rpm", {"rpm": BIG}),
                "tpm": ("tpm", {"tpm": 2**63}),
                "max_concurrent": ("max_concurrent", {"max_concurrent": BIG}),
                "budget": ("budget", {"budget": 1e300}),
                # loose types, as the client APIs refuse them: `true` was a limit of 1, "5" a budget
                "rpm bool": ("rpm", {"rpm": True}),
                "max_concurrent bool": ("max_concurrent", {"max_concurrent": True}),
                "tpm decimal": ("tpm", {"tpm": 1000.0}),
                "budget string": ("budget", {"budget": "5"}),
                "models string": ("models", {"models": "fast"}),
                "nul in name": ("name", {"name": "x\u0000y"}),
                "newline in name": ("name", {"name": "x\n<script>"}),
            }
            refused = {case: await admin.post("/admin/keys", json={"portal": "acme", "name": "x", **fields})
                       for case, (_, fields) in created.items()}
            nan = await admin.post("/admin/keys", content=b'{"portal": "acme", "name": "x", "budget": NaN}')
            updated = {
                "expires far": ("expires_at", {"expires_at": 1e30}),
                "rpm": ("rpm", {"rpm": BIG}),
                "budget": ("budget", {"budget": 1e16}),
                "tab in name": ("name", {"name": "a\tb"}),
                "rpm string": ("rpm", {"rpm": "60"}),
            }
            patched = {case: await admin.patch(f"/admin/keys/{ok['key_id']}", json=fields)
                       for case, (_, fields) in updated.items()}
            # an existing key may be set to expire in the past (it is then expired, until changed)
            expired = await admin.patch(f"/admin/keys/{ok['key_id']}", json={"expires_at": "2000-01-01"})
            listed = (await admin.get("/admin/keys")).json()["data"]
    assert {case: (r.status_code, r.json()["error"]["param"]) for case, r in refused.items()} == {
        case: (400, param) for case, (param, _) in created.items()}
    assert "9999-12-31" in refused["expires far"].json()["error"]["message"]
    assert (nan.status_code, nan.json()["error"]["param"]) == (400, "budget")
    assert {case: (r.status_code, r.json()["error"]["param"]) for case, r in patched.items()} == {
        case: (400, param) for case, (param, _) in updated.items()}
    assert expired.status_code == 200 and expired.json()["state"] == "expired"
    assert [k["name"] for k in listed] == ["ok"] and listed[0]["limits"]["rpm"] == 2**63 - 1


async def test_the_cli_lists_shows_and_revokes_a_key_stored_with_an_unshowable_expiry() -> None:
    store = SqliteStore(":memory:")
    _, key = keys.create("acme", "farfuture", limits=Limits(rpm=BIG), now=time.time(), expires_at=99999999999999.0)
    store.put_key(key)
    async with portals(Fleet(), {"acme": acme()}, store=store) as (_, urls):
        def cli(*args: str) -> tuple[int, str]:
            done = CliRunner().invoke(keys_cli, [*args, "--cortex", urls["default"]],
                                      env={"HELEXA_ADMIN_TOKEN": ADMIN_TOKEN})
            return done.exit_code, done.output + repr(done.exception or "")

        listed = await trio.to_thread.run_sync(cli, "list")
        shown = await trio.to_thread.run_sync(cli, "show", key.key_id)
        revoked = await trio.to_thread.run_sync(cli, "revoke", key.key_id)
    assert listed[0] == 0 and "farfuture" in listed[1] and "99999999999999" in listed[1], listed
    assert shown[0] == 0 and "99999999999999" in shown[1], shown
    assert revoked == (0, f"key {key.key_id} is revoked\n''"), revoked


def test_the_cli_refuses_out_of_range_limits_before_asking() -> None:
    done = CliRunner().invoke(keys_cli, ["create", "--portal", "acme", "--name", "x", "--rpm", str(BIG)],
                              env={"HELEXA_ADMIN_TOKEN": ADMIN_TOKEN})
    assert done.exit_code == 2 and "--rpm" in done.output


async def test_the_usage_table_shows_a_cost_the_ledger_cannot_sum_instead_of_failing(tmp_path) -> None:
    """A ledger written while a portal's price was infinite (the config refuses it now) has
    rows whose cost the reports cannot give: `helexa usage` shows "-" for it, the other
    rows as ever, and exits 0 (it failed with a TypeError traceback)."""
    store = SqliteStore(tmp_path / "usage.sqlite")
    rows = [UsageRecord(request_id=f"r{i}", portal="acme", key_id=key_id, endpoint="chat", model_asked="fast",
                        model_served="chat", started_at=T0, ended_at=T0 + 1, prompt_tokens=3, completion_tokens=4,
                        cost=cost, currency="EUR") for i, (key_id, cost) in enumerate([("k1", math.inf), ("k2", 0.25)])]
    store.append(rows)
    async with portals(Fleet(), {"acme": acme()}, store=store) as (_, urls):
        def cli(*args: str) -> tuple[int, str]:
            done = CliRunner().invoke(usage_cli, [*args, "--cortex", urls["default"]],
                                      env={"HELEXA_ADMIN_TOKEN": ADMIN_TOKEN})
            return done.exit_code, done.output + repr(done.exception or "")

        table = await trio.to_thread.run_sync(cli, "--by", "key")
    store.close()
    assert table[0] == 0, table
    lines = table[1].splitlines()
    assert lines[1].split()[0] == "k1" and "- EUR" in lines[1]
    assert lines[2].split()[0] == "k2" and "0.250000 EUR" in lines[2]


async def test_the_usage_table_by_key_names_an_open_portals_rows(tmp_path) -> None:
    """docs/portals.md: ``record_usage = true`` records an open portal's requests, which
    carry no key: ``helexa usage --by key`` printed their row with an empty KEY cell (the
    columns after it then read as shifted)."""
    store = SqliteStore(tmp_path / "usage.sqlite")
    store.append([UsageRecord(request_id=f"r{i}", portal="acme", key_id=key_id, endpoint="chat", model_asked="fast",
                              model_served="chat", started_at=T0, ended_at=T0 + 1, prompt_tokens=3,
                              completion_tokens=4, cost=0.25, currency="EUR")
                  for i, key_id in enumerate(["", "k2", ""])])
    async with portals(Fleet(), {"acme": acme()}, store=store) as (_, urls):
        def cli(*args: str) -> tuple[int, str]:
            done = CliRunner().invoke(usage_cli, [*args, "--cortex", urls["default"]],
                                      env={"HELEXA_ADMIN_TOKEN": ADMIN_TOKEN})
            return done.exit_code, done.output + repr(done.exception or "")

        table = await trio.to_thread.run_sync(cli, "--by", "key")
        as_json = await trio.to_thread.run_sync(cli, "--by", "key", "--json")
    store.close()
    assert table[0] == 0, table
    rows = {line.split()[0]: line.split()[1] for line in table[1].splitlines()[1:] if line.strip() != "''"}
    assert rows == {"(open)": "2", "k2": "1"}, table
    assert '"key": ""' in as_json[1]  # the data itself keeps the ledger's empty key id
