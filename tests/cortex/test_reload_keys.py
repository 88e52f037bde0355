"""Live reload and the keys and limits it finds: a key restricted to an alias the reload
renames, and a limit a reload gives a portal while its requests run (the reload itself:
``test_reload.py``, whose helpers these tests use)."""

from __future__ import annotations

import logging
from pathlib import Path

import httpx
import trio

from neuron_double import NeuronDouble
from portals import bearer
from test_reload import MODELS, _write, reloadable

KEYED = """
gateway_socket = "127.0.0.1:0"
control_socket = "127.0.0.1:0"
usage_store = ":memory:"

[portals.acme]
listen = ["127.0.0.1:0"]
auth = "keys"
aliases = { fast = "chat" }
"""

CHAT = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 4}


async def test_a_key_restricted_to_an_alias_a_reload_renames_is_named_in_the_report_and_not_widened(
        tmp_path: Path, caplog) -> None:
    """A key whose ``models`` named ``fast`` kept that name after a reload renamed the alias
    to ``quick``: silently, the key could use no model. The reload's report (the admin API's
    answer, the log line of a SIGHUP) names the key and the alias; the key is not given the
    new name (a reload never widens a restricted key), and the old name's 404 says why."""
    cortex, _, admin = reloadable(tmp_path, KEYED)
    NeuronDouble("n1", cortex.fleet, loaded=("chat",), tokens=2)
    caplog.set_level(logging.INFO)
    async with trio.open_nursery() as nursery:
        addrs = await nursery.start(cortex.run)
        acme = addrs.portals["acme"][0] + "/v1/chat/completions"
        async with httpx.AsyncClient(timeout=10) as http:
            made = []
            for models in (["fast"], None):
                body = {"portal": "acme", "name": "k"} | ({"models": models} if models else {})
                r = await http.post(addrs.admin_url + "/admin/keys", headers=admin, json=body)
                assert r.status_code == 201, r.text
                made.append(r.json())
            narrow, wide = made
            assert (await http.post(acme, json={**CHAT, "model": "fast"}, headers=bearer(narrow["key"]))
                    ).status_code == 200

            _write(tmp_path, KEYED.replace('fast = "chat"', 'quick = "chat"'), MODELS)
            reloaded = (await http.post(addrs.admin_url + "/admin/reload", headers=admin)).json()
            old = await http.post(acme, json={**CHAT, "model": "fast"}, headers=bearer(narrow["key"]))
            new = await http.post(acme, json={**CHAT, "model": "quick"}, headers=bearer(narrow["key"]))
            unrestricted = await http.post(acme, json={**CHAT, "model": "quick"}, headers=bearer(wide["key"]))
        cortex.stop()
    (warning,) = reloaded["warnings"]
    assert narrow["key_id"] in warning and wide["key_id"] not in warning
    assert "'fast'" in warning and "'quick'" in warning and "portal acme" in warning
    assert warning in reloaded["message"]
    logged = [rec for rec in caplog.records if rec.getMessage().startswith("reload:")]
    assert [rec.levelno for rec in logged] == [logging.WARNING] and warning in logged[0].getMessage()
    assert old.status_code == 404 and old.json()["error"]["code"] == "model_not_found"
    assert "no longer serves it" in old.json()["error"]["message"], old.text
    assert new.status_code == 404 and "no longer" not in new.text  # the new name stays closed to it
    assert unrestricted.status_code == 200


async def test_a_limit_a_reload_gives_a_portal_counts_the_requests_already_running(tmp_path: Path) -> None:
    """A portal with no limits has no quota account; one made by a reload started empty, so
    ``max_concurrent = 2`` added while three streams ran admitted two more beside them (and
    an ``rpm`` a full bucket). The requests running now count against the new limit, as if
    admitted against it, and are settled on it."""
    open_portal = KEYED.replace('auth = "keys"\n', "")
    cortex, _, admin = reloadable(tmp_path, open_portal)
    NeuronDouble("n1", cortex.fleet, loaded=("chat",), tokens=20, token_delay=0.05)
    async with trio.open_nursery() as nursery:
        addrs = await nursery.start(cortex.run)
        acme = addrs.portals["acme"][0] + "/v1/chat/completions"
        async with httpx.AsyncClient(timeout=10) as http:
            streaming = [trio.Event() for _ in range(3)]

            async def stream(started: trio.Event) -> None:
                async with http.stream("POST", acme, json={**CHAT, "model": "fast", "max_tokens": 20,
                                                           "stream": True}) as r:
                    async for line in r.aiter_lines():
                        if line.startswith("data: {"):
                            started.set()

            async with trio.open_nursery() as streams:
                for started in streaming:
                    streams.start_soon(stream, started)
                for started in streaming:
                    await started.wait()
                _write(tmp_path, open_portal + "\n[portals.acme.limits]\nmax_concurrent = 2\nrpm = 4\n", MODELS)
                assert (await http.post(addrs.admin_url + "/admin/reload", headers=admin)).status_code == 200
                during = await http.post(acme, json={**CHAT, "model": "fast"})
                state = cortex.gateway.metering.account_state("portal:acme")
            after = await http.post(acme, json={**CHAT, "model": "fast"})
            settled = cortex.gateway.metering.account_state("portal:acme")
        cortex.stop()
    assert state is not None and state["in_flight"] == 3 and state["remaining_requests"] == 1
    assert during.status_code == 429 and "at most 2 concurrent" in during.json()["error"]["message"], during.text
    assert after.status_code == 200, after.text
    assert settled is not None and settled["in_flight"] == 0 and settled["remaining_requests"] == 0
