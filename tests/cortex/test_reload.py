"""Live reload: the pure plan, and a whole in-process :class:`Cortex` reloading its
config and catalogue while a stream is running (the process test, with SIGHUP, is in
``tests/e2e/test_reload_e2e.py``)."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import trio

from helexa.config import ConfigError, load_config
from helexa.roles.cortex.catalogue import Priority
from helexa.roles.cortex.config import CortexConfig
from helexa.roles.cortex.node import Cortex
from helexa.roles.cortex.placement import NodeView, Resident, Unload
from helexa.roles.cortex.reload import plan_reload
from helexa.roles.cortex.retirement import retired_unloads
from neuron_double import NeuronDouble

MODELS = """
[models.chat]
backend = "synthetic"
memory_mb = 100
"""

CONFIG = """
gateway_socket = "127.0.0.1:0"
control_socket = "127.0.0.1:0"
usage_store = ":memory:"

[orchestrator]
retry_after = 5.0

[portals.acme]
listen = ["127.0.0.1:0"]
aliases = { fast = "chat" }
prices = { fast = { input = 1.0, output = 1.0 } }
"""


def config(**fields) -> CortexConfig:  # noqa: ANN003
    return CortexConfig.model_validate({"gateway_socket": "127.0.0.1:0", **fields})


def test_plan_sorts_live_keys_from_those_that_need_a_restart() -> None:
    old = config(portals={"acme": {"listen": ["127.0.0.1:0"], "aliases": {"fast": "chat"}}})
    new = config(gateway_socket="127.0.0.1:9", orchestrator={"retry_after": 1.0}, log_level="debug",
                 gateway={"admin_clients": ["*"], "max_body_bytes": 2048},
                 federation={"rate_per_second": 1.0, "spare_slots_per_neuron": 1},
                 portals={"acme": {"listen": ["127.0.0.1:1"], "aliases": {"quick": "chat"}},
                          "beta": {"listen": ["127.0.0.1:2"]}})
    plan = plan_reload(old, new)
    assert plan.live == ("federation.rate_per_second", "gateway.admin_clients", "log_level", "orchestrator",
                         "portals.acme.aliases")
    assert plan.restart == ("federation.spare_slots_per_neuron", "gateway.max_body_bytes", "gateway_socket",
                            "portals.acme.listen", "portals.beta (added)", "portals.default.listen")
    assert plan.portals == ("acme",)


def test_plan_of_an_unchanged_config_is_empty() -> None:
    assert plan_reload(config(), config()) == plan_reload(config(log_level="info"), config())


def test_only_the_cortexs_own_copies_of_a_model_the_catalogue_dropped_are_retired() -> None:
    from helexa.protocol import Hardware

    def r(model_id: str) -> Resident:
        return Resident(model_id, 100, False, Priority.NORMAL, 0.0)

    hw = Hardware(4, 1 << 34)
    nodes = [NodeView("a", hw, (r("old"), r("kept"), r("hand"), r("loading"))), NodeView("b", hw, ())]
    provisioned = {("a", "old"), ("a", "kept"), ("b", "old"), ("a", "loading"), ("c", "old")}
    # b's and c's copies of "old" are gone (unloaded, draining, or their neuron left).
    assert retired_unloads({"kept"}, provisioned, nodes, loading=lambda m: m == "loading") == [Unload("a", "old")]
    assert retired_unloads({"kept", "old", "loading"}, provisioned, nodes) == []


def _write(tmp_path: Path, config_text: str, models_text: str) -> Path:
    (tmp_path / "models.toml").write_text(models_text)
    path = tmp_path / "cortex.toml"
    path.write_text(f'models_file = "{tmp_path / "models.toml"}"\n' + config_text)
    return path


def reloadable(tmp_path: Path, config_text: str, models_text: str = MODELS,
               **overrides: str) -> tuple[Cortex, Callable[[], CortexConfig], dict[str, str]]:
    """A cortex of ``config_text`` and ``models_text``, written in ``tmp_path`` (rewrite
    them with :func:`_write` before a reload), its loader, and the admin API's headers."""
    path = _write(tmp_path, config_text, models_text)
    overrides = {"data_dir": str(tmp_path / "data"), **overrides}

    def loader() -> CortexConfig:
        return load_config(CortexConfig, file=path, overrides=overrides)

    cortex = Cortex(loader(), loader=loader)
    token = (tmp_path / "data" / "admin-token").read_text().strip()
    return cortex, loader, {"authorization": f"Bearer {token}"}


async def reload_mid_stream(http: httpx.AsyncClient, url: str, body: dict, admin_url: str, admin: dict[str, str],
                            rewrite: Callable[[], object]) -> httpx.Response:
    """Stream ``body`` from ``url``; once its first chunk is in, ``rewrite`` the files and
    reload; read the stream to its end. Returns the reload's answer."""
    async with http.stream("POST", url, json={**body, "stream": True}) as r:
        assert r.status_code == 200
        lines = r.aiter_lines()
        async for line in lines:
            if line.startswith("data: {"):
                break
        rewrite()
        reloaded = await http.post(admin_url + "/admin/reload", headers=admin)
        async for line in lines:
            pass
    return reloaded


async def test_reload_applies_portal_and_catalogue_changes_while_a_stream_runs(tmp_path: Path, caplog) -> None:
    cortex, _, admin = reloadable(tmp_path, CONFIG)
    neuron = NeuronDouble("n1", cortex.fleet, loaded=("chat",), tokens=20, token_delay=0.05)
    async with trio.open_nursery() as nursery:
        addrs = await nursery.start(cortex.run)
        acme = addrs.portals["acme"][0]
        async with httpx.AsyncClient(timeout=10) as http:
            chunks: list[str] = []
            streaming, finished = trio.Event(), trio.Event()

            async def stream() -> None:
                body = {"model": "fast", "stream": True, "messages": [{"role": "user", "content": "x"}]}
                async with http.stream("POST", acme + "/v1/chat/completions", json=body) as r:
                    assert r.status_code == 200
                    async for line in r.aiter_lines():
                        if line.startswith("data: {"):
                            chunks.append(line)
                            streaming.set()
                finished.set()

            nursery.start_soon(stream)
            await streaming.wait()
            assert (await http.post(acme + "/v1/chat/completions", json={
                "model": "quick", "messages": [{"role": "user", "content": "x"}]})).status_code == 404

            # A new alias and price on the running portal, a new model, an orchestrator knob,
            # and a new socket (which only a restart can open).
            _write(tmp_path, CONFIG.replace('fast = "chat" }', 'fast = "chat", quick = "chat2" }')
                   .replace("retry_after = 5.0", "retry_after = 2.0")
                   .replace('gateway_socket = "127.0.0.1:0"', 'gateway_socket = "127.0.0.1:0"\n'
                            'admin_socket = "127.0.0.1:0"'),
                   MODELS + '\n[models.chat2]\nbackend = "synthetic"\nmemory_mb = 100\n')
            with caplog.at_level(logging.INFO, logger="helexa.roles.cortex.node"):
                r = await http.post(addrs.admin_url + "/admin/reload", headers=admin)
            assert r.status_code == 200, r.text
            report = r.json()
            assert report["catalogue"] == {"added": ["chat2"], "removed": [], "changed": []}
            assert report["applied"] == ["orchestrator", "portals.acme.aliases"]
            assert report["needs_restart"] == ["admin_socket"]
            line = [rec.getMessage() for rec in caplog.records if rec.getMessage().startswith("reload:")]
            assert line == ["reload: applied catalogue +chat2, orchestrator, portals.acme.aliases; "
                            "needs a restart to apply: admin_socket"]
            assert cortex.config.orchestrator.retry_after == 2.0
            assert cortex.orchestrator.provisioner.settings.retry_after == 2.0
            assert cortex.config.admin_socket is None  # still the running one

            r = await http.post(acme + "/v1/chat/completions", json={
                "model": "quick", "messages": [{"role": "user", "content": "x"}]})
            assert r.status_code == 200, r.text  # chat2 cold-loaded on the neuron
            assert "chat2" in neuron.loads()

            # A broken file is refused with the key named, and nothing changes.
            _write(tmp_path, CONFIG.replace("retry_after = 5.0", "retry_after = -1"), MODELS)
            r = await http.post(addrs.admin_url + "/admin/reload", headers=admin)
            assert r.status_code == 400
            assert "orchestrator.retry_after" in r.json()["error"]["message"]
            with pytest.raises(ConfigError, match="orchestrator.retry_after"):
                cortex.reload()
            assert cortex.config.orchestrator.retry_after == 2.0
            assert "chat2" in cortex.catalogue
            await finished.wait()
        # The stream that ran across both reloads finished whole.
        assert len(chunks) >= 20
        assert json.loads(chunks[-1].removeprefix("data: "))["choices"][0]["finish_reason"] == "stop"
        cortex.stop()


async def test_a_request_admitted_before_a_price_change_is_billed_at_the_prices_it_was_admitted_at(
        tmp_path: Path) -> None:
    """"Requests already admitted finish as they were admitted" (docs/operations.md): a stream
    running across a reload that raises the price is billed at the old price (its worst
    case was reserved at it, so billing it at the new one could overrun a budget), and the
    next request at the new one."""
    priced = CONFIG.replace("[portals.acme]", "[portals.acme]\nrecord_usage = true\ncurrency = \"EUR\"")
    cortex, _, admin = reloadable(tmp_path, priced)
    NeuronDouble("n1", cortex.fleet, loaded=("chat",), tokens=20, token_delay=0.05)
    body = {"model": "fast", "max_tokens": 20, "messages": [{"role": "user", "content": "x"}]}
    async with trio.open_nursery() as nursery:
        addrs = await nursery.start(cortex.run)
        acme = addrs.portals["acme"][0]
        async with httpx.AsyncClient(timeout=10) as http:
            reloaded = await reload_mid_stream(
                http, acme + "/v1/chat/completions", {**body, "stream_options": {"include_usage": True}},
                addrs.admin_url, admin, lambda: _write(
                    tmp_path, priced.replace("input = 1.0, output = 1.0", "input = 1000.0, output = 3000.0"), MODELS))
            assert reloaded.json()["applied"] == ["portals.acme.prices"]
            after = await http.post(acme + "/v1/chat/completions", json=body)
            assert after.status_code == 200
            records = (await http.get(addrs.admin_url + "/admin/usage/records?portal=acme", headers=admin)).json()
        by_start = sorted(records["data"], key=lambda rec: rec["started_at"])
        assert len(by_start) == 2
        for rec, (p_in, p_out) in zip(by_start, [(1.0, 1.0), (1000.0, 3000.0)]):
            assert rec["completion_tokens"] == 20 and rec["currency"] == "EUR"
            assert rec["cost"] == pytest.approx((rec["prompt_tokens"] * p_in + rec["completion_tokens"] * p_out) / 1e6)
        cortex.stop()


async def test_a_budget_a_reload_gives_a_portal_counts_what_the_portal_spent_in_its_period(tmp_path: Path) -> None:
    """Budgets are rebuilt from the ledger at start; a budget a reload adds to a portal (or
    whose period it changes) must be too: its account started from zero, so a portal that
    had spent its new budget already was served on as if it had spent nothing."""
    priced = CONFIG.replace("[portals.acme]", "[portals.acme]\nrecord_usage = true").replace(
        "input = 1.0, output = 1.0", "input = 1000.0, output = 1000.0")
    cortex, _, admin = reloadable(tmp_path, priced, usage_store=str(tmp_path / "usage.sqlite"))
    NeuronDouble("n1", cortex.fleet, loaded=("chat",), tokens=20)
    body = {"model": "fast", "max_tokens": 20, "messages": [{"role": "user", "content": "x"}]}
    async with trio.open_nursery() as nursery:
        addrs = await nursery.start(cortex.run)
        acme = addrs.portals["acme"][0]
        async with httpx.AsyncClient(timeout=10) as http:
            for _ in range(3):
                assert (await http.post(acme + "/v1/chat/completions", json=body)).status_code == 200
            spent = sum(r["cost"] for r in (await http.get(addrs.admin_url + "/admin/usage?by=portal",
                                                           headers=admin)).json()["data"])
            assert spent > 0
            # A budget the portal has all but spent this month: the next request cannot fit.
            _write(tmp_path, priced + f'\n[portals.acme.limits]\nbudget = {spent * 1.01}\nperiod = "month"\n', MODELS)
            reloaded = await http.post(addrs.admin_url + "/admin/reload", headers=admin)
            assert reloaded.json()["applied"] == ["portals.acme.limits"], reloaded.text
            refused = await http.post(acme + "/v1/chat/completions", json=body)
        assert refused.status_code == 429, refused.text
        assert refused.json()["error"]["code"] == "insufficient_quota"
        cortex.stop()


async def test_a_request_admitted_while_usage_was_recorded_is_recorded_after_a_reload_turns_recording_off(
        tmp_path: Path) -> None:
    """Whether a request is recorded is decided when it is admitted: a reload that turns
    ``record_usage`` off while a stream runs must not lose that stream's ledger record (it
    was read when the request was booked), and the next request is not recorded."""
    recorded = CONFIG.replace("[portals.acme]", "[portals.acme]\nrecord_usage = true")
    cortex, _, admin = reloadable(tmp_path, recorded)
    NeuronDouble("n1", cortex.fleet, loaded=("chat",), tokens=20, token_delay=0.05)
    body = {"model": "fast", "max_tokens": 20, "messages": [{"role": "user", "content": "x"}]}
    async with trio.open_nursery() as nursery:
        addrs = await nursery.start(cortex.run)
        acme = addrs.portals["acme"][0]
        async with httpx.AsyncClient(timeout=10) as http:
            reloaded = await reload_mid_stream(
                http, acme + "/v1/chat/completions", body, addrs.admin_url, admin,
                lambda: _write(tmp_path, recorded.replace("record_usage = true", "record_usage = false"), MODELS))
            assert reloaded.json()["applied"] == ["portals.acme.record_usage"], reloaded.text
            assert (await http.post(acme + "/v1/chat/completions", json=body)).status_code == 200
            records = (await http.get(addrs.admin_url + "/admin/usage/records?portal=acme", headers=admin)).json()
        assert [rec["completion_tokens"] for rec in records["data"]] == [20]
        assert records["data"][0]["outcome"] == "ok"
        cortex.stop()


async def test_a_money_budget_counts_only_what_was_spent_in_its_portals_currency_across_a_reload(
        tmp_path: Path) -> None:
    """A budget is an amount in the portal's currency: after a reload changes the currency,
    it counts what is spent in the new one, never adding euros to dollars, neither the
    ledger's rows nor a stream admitted (and billed) in euros that ends after the change,
    nor after a restart (budgets rebuilt from the ledger).
    Each request here costs 25 and may cost 49 (x 1e-3); the budget, 60, holds one."""
    priced = CONFIG.replace("[portals.acme]", "[portals.acme]\nrecord_usage = true\ncurrency = \"EUR\"").replace(
        "input = 1.0, output = 1.0", "input = 1000.0, output = 1000.0") + (
        '\n[portals.acme.limits]\nbudget = 0.06\nperiod = "month"\n')
    cortex, loader, admin = reloadable(tmp_path, priced, usage_store=str(tmp_path / "usage.sqlite"))
    NeuronDouble("n1", cortex.fleet, loaded=("chat",), tokens=20, token_delay=0.05)
    body = {"model": "fast", "max_tokens": 20, "messages": [{"role": "user", "content": "x"}]}
    async with trio.open_nursery() as nursery:
        addrs = await nursery.start(cortex.run)
        acme = addrs.portals["acme"][0]
        async with httpx.AsyncClient(timeout=10) as http:
            reloaded = await reload_mid_stream(
                http, acme + "/v1/chat/completions", body, addrs.admin_url, admin,
                lambda: _write(tmp_path, priced.replace('currency = "EUR"', 'currency = "USD"'), MODELS))
            assert reloaded.json()["applied"] == ["portals.acme.currency"], reloaded.text
            state = cortex.gateway.metering.account_state("portal:acme")
            in_dollars = await http.post(acme + "/v1/chat/completions", json=body)
            over = await http.post(acme + "/v1/chat/completions", json=body)
            records = (await http.get(addrs.admin_url + "/admin/usage/records?portal=acme", headers=admin)).json()
        assert state is not None and state["spent"]["money"] == 0.0  # the euros are not dollars
        assert in_dollars.status_code == 200, in_dollars.text
        assert over.status_code == 429 and over.json()["error"]["code"] == "insufficient_quota"  # it still holds
        assert sorted(rec["currency"] for rec in records["data"]) == ["EUR", "USD"]
        assert all(rec["cost"] == pytest.approx(0.025) for rec in records["data"])
        cortex.stop()

    restarted = Cortex(loader(), loader=loader)
    async with trio.open_nursery() as nursery:
        await nursery.start(restarted.run)
        state = restarted.gateway.metering.account_state("portal:acme")
        restarted.stop()
    assert state is not None and state["spent"]["money"] == pytest.approx(0.025)  # the dollars alone


async def test_a_model_renamed_or_removed_in_the_catalogue_is_unloaded_where_the_cortex_loaded_it(
        tmp_path: Path) -> None:
    """After a reload, the copies of a model the catalogue dropped that the cortex loaded
    itself are unloaded once their requests finished (a rename holds the model once, not
    twice); an operator's load and a model the neuron held before stay."""
    models = MODELS + '\n[models.chat2]\nbackend = "synthetic"\nmemory_mb = 100\n'
    cortex, _, admin = reloadable(tmp_path, CONFIG, models)
    neuron = NeuronDouble("n1", cortex.fleet, loaded=("manual",), tokens=20, token_delay=0.05)
    async with trio.open_nursery() as nursery:
        addrs = await nursery.start(cortex.run)
        acme = addrs.portals["acme"][0]
        async with httpx.AsyncClient(timeout=10) as http:
            chunks: list[str] = []
            streaming = trio.Event()
            finished_at: list[float] = []

            async def stream() -> None:  # cold-loads chat: the cortex's own load
                body = {"model": "fast", "stream": True, "messages": [{"role": "user", "content": "x"}]}
                async with http.stream("POST", acme + "/v1/chat/completions", json=body) as r:
                    assert r.status_code == 200
                    async for line in r.aiter_lines():
                        if line.startswith("data: {"):
                            chunks.append(line)
                            streaming.set()
                finished_at.append(trio.current_time())

            nursery.start_soon(stream)
            await streaming.wait()
            r = await http.post(addrs.admin_url + "/admin/models/chat2/load", json={"neuron": "n1"}, headers=admin)
            assert r.status_code == 200 and '"done"' in r.text, r.text  # the operator's load
            assert set(neuron.models) == {"manual", "chat", "chat2"}

            # chat renamed to chat-new (the alias follows), chat2 removed.
            _write(tmp_path, CONFIG.replace('fast = "chat" }', 'fast = "chat-new" }'),
                   MODELS.replace("[models.chat]", "[models.chat-new]"))
            r = await http.post(addrs.admin_url + "/admin/reload", headers=admin)
            assert r.status_code == 200, r.text
            assert r.json()["catalogue"] == {"added": ["chat-new"], "removed": ["chat", "chat2"], "changed": []}

            with trio.fail_after(10):
                while "chat" in neuron.models:
                    await trio.sleep(0.05)
            await trio.sleep(0.5)  # a few more housekeeping passes
        # The stream under way finished whole before its model was unloaded.
        assert finished_at and len(chunks) >= 20
        assert json.loads(chunks[-1].removeprefix("data: "))["choices"][0]["finish_reason"] == "stop"
        assert neuron.unloads() == ["chat"]  # the operator's chat2 and the neuron's own model stay
        assert set(neuron.models) == {"manual", "chat2"}
        cortex.stop()


async def test_a_reload_that_removes_a_pinned_model_drops_its_pins_with_one_line(tmp_path: Path, caplog) -> None:
    """A pin of a model the catalogue dropped can never be honoured (a load needs its
    entry): the reload drops it with one warning, and it is shown nowhere (the admin API,
    the console's Fleet page); housekeeping no longer tries to load it every ``warm_retry``
    with a warning each time. Its copy stays loaded until the operator unloads it."""
    from helexa.roles.cortex.web.fleet_feed import FleetFeed

    models = MODELS + '\n[models.chat2]\nbackend = "synthetic"\nmemory_mb = 100\n'
    config_text = CONFIG.replace("retry_after = 5.0", "retry_after = 5.0\nwarm_retry = 0.1")
    cortex, _, admin = reloadable(tmp_path, config_text, models)
    neuron = NeuronDouble("n1", cortex.fleet)
    feed = FleetFeed(cortex.fleet, cortex.orchestrator.provisioner)

    def pinned_on_the_fleet_page() -> bool:
        (n1,) = json.loads(feed.document())["neurons"]
        return any(m["pinned"] for m in n1["models"] if m["id"] == "chat2")

    caplog.set_level(logging.INFO)
    async with trio.open_nursery() as nursery:
        addrs = await nursery.start(cortex.run)
        async with httpx.AsyncClient(base_url=addrs.admin_url, headers=admin, timeout=10) as http:
            r = await http.post("/admin/models/chat2/pin", json={"neuron": "n1"})
            assert r.json()["pinned"] is True, r.text
            with trio.fail_after(5):
                while "chat2" not in neuron.models:
                    await trio.sleep(0.02)
            assert pinned_on_the_fleet_page()

            _write(tmp_path, config_text, MODELS)  # chat2 removed
            r = await http.post("/admin/reload")
            assert r.json()["catalogue"]["removed"] == ["chat2"] and r.json()["pins_dropped"] == ["chat2 on n1"]
            assert "chat2" in neuron.models and not pinned_on_the_fleet_page()  # still loaded, no longer pinned
            neuron.models.pop("chat2")  # then lost (a crash of its worker, say)
            cortex.fleet.notify()
            await trio.sleep(1.0)  # ten warm_retry periods
            listed = {m["id"]: m for m in (await http.get("/admin/models")).json()["data"]}
        cortex.stop()
    warnings = [rec.getMessage() for rec in caplog.records if rec.levelno >= logging.WARNING]
    assert [w for w in warnings if "chat2" in w] == [
        "reload: dropped the pins of models no longer in the catalogue: chat2 on n1 "
        "(a copy loaded stays until `helexa models unload MODEL`)"]
    assert neuron.loads() == ["chat2"]  # never again once it left the catalogue
    assert "chat2" not in listed and cortex.orchestrator.provisioner.operator.pins() == {}


async def test_a_price_under_a_name_the_portal_does_not_serve_is_refused_not_left_free(tmp_path: Path) -> None:
    """A reload whose price names no model of the portal (``fsat`` for its alias ``fast``)
    was applied: the price applied to nothing and ``fast`` was served free from then on. It
    is refused, naming the key, and the prices in force stay; a cortex does not start on it."""
    priced = CONFIG.replace("[portals.acme]", "[portals.acme]\nrecord_usage = true")
    cortex, loader, admin = reloadable(tmp_path, priced)
    NeuronDouble("n1", cortex.fleet, loaded=("chat",), tokens=5)
    body = {"model": "fast", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}
    typo = priced.replace("prices = { fast =", "prices = { fsat =")
    async with trio.open_nursery() as nursery:
        addrs = await nursery.start(cortex.run)
        async with httpx.AsyncClient(timeout=10) as http:
            _write(tmp_path, typo, MODELS)
            reloaded = await http.post(addrs.admin_url + "/admin/reload", headers=admin)
            answer = await http.post(addrs.portals["acme"][0] + "/v1/chat/completions", json=body)
            records = (await http.get(addrs.admin_url + "/admin/usage/records?portal=acme", headers=admin)).json()
        cortex.stop()
    assert reloaded.status_code == 400 and "prices.fsat" in reloaded.text, reloaded.text
    assert answer.status_code == 200
    assert [r["cost"] > 0 for r in records["data"]] == [True]  # still at the price in force
    with pytest.raises(ConfigError, match=r"prices\.fsat: this portal serves no model of that name"):
        loader()


async def test_a_reload_that_changes_a_models_entry_forgets_its_failed_loads(tmp_path: Path) -> None:
    """A model whose load failed is not loaded again before its backoff ends (requests get
    503 ``load_failed`` at once); the operator fixes its entry and reloads: the next request
    tries the new config at once."""
    config_text = CONFIG.replace("retry_after = 5.0", "retry_after = 5.0\nload_backoff = 300.0")
    cortex, _, admin = reloadable(tmp_path, config_text)
    neuron = NeuronDouble("n1", cortex.fleet)
    neuron.refuse_load = True
    ask = {"model": "chat", "messages": [{"role": "user", "content": "x"}]}
    async with trio.open_nursery() as nursery:
        addrs = await nursery.start(cortex.run)
        async with httpx.AsyncClient(base_url=addrs.admin_url, headers=admin, timeout=10) as http:
            first = await http.post("/v1/chat/completions", json=ask)
            second = await http.post("/v1/chat/completions", json=ask)
            neuron.refuse_load = False  # the operator fixes the model's entry...
            _write(tmp_path, config_text, MODELS.replace("memory_mb = 100", "memory_mb = 120"))
            r = await http.post("/admin/reload")
            third = await http.post("/v1/chat/completions", json=ask)
        cortex.stop()
    assert [a.status_code for a in (first, second)] == [503, 503]
    assert second.json()["error"]["code"] == "load_failed" and int(second.headers["retry-after"]) > 250
    assert r.json()["catalogue"]["changed"] == ["chat"]
    assert third.status_code == 200, third.text
    assert neuron.loads() == ["chat", "chat"]  # none for the second request
