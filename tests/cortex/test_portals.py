"""Portals over real sockets with the official ``openai`` client: separate sockets, keys
and model lists; aliases; what a key may use; per-portal model lists; usage as billed."""

from __future__ import annotations

import httpx
import openai
import pytest
import trio

from helexa.roles.cortex.config import CortexConfig
from helexa.roles.cortex.fleet import Fleet
from helexa.roles.cortex.portal.store import SqliteStore
from neuron_double import NeuronDouble
from portals import acme, bearer, new_key, portals, self_signed
from serving import admin_headers

BETA = {"listen": ["127.0.0.1:0"], "auth": "keys", "aliases": {"smart": "chat2"}}


def client(url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=10)


def in_thread(fn, *args):
    return trio.to_thread.run_sync(fn, *args)


async def test_two_portals_serve_their_own_models_to_their_own_keys() -> None:
    fleet = Fleet()
    neuron = NeuronDouble("n1", fleet, loaded=("chat", "chat2", "embed"), tokens=3)
    store = SqliteStore(":memory:")
    a_key, b_key = new_key(store, "acme"), new_key(store, "beta")
    async with portals(fleet, {"acme": acme(), "beta": BETA}, store=store) as (_, urls):
        assert len({urls["acme"], urls["beta"], urls["default"]}) == 3

        def run():
            a, b = client(urls["acme"], a_key), client(urls["beta"], b_key)
            a_models = sorted(m.id for m in a.models.list())
            b_models = sorted(m.id for m in b.models.list())
            answer = a.chat.completions.create(model="fast", messages=[{"role": "user", "content": "hi"}])
            smart = b.completions.create(model="smart", prompt="p")
            errors = {}
            for name, call in {
                "a key on b": lambda: client(urls["beta"], a_key).models.list(),
                "b key on a": lambda: client(urls["acme"], b_key).chat.completions.create(
                    model="fast", messages=[{"role": "user", "content": "x"}]),
                "no such key": lambda: client(urls["acme"], "sk-hlx-0123456789abcdef_" + "A" * 43).models.list(),
                "b's model on a": lambda: a.completions.create(model="smart", prompt="p"),
                "a catalogue model a does not list": lambda: a.completions.create(model="chat2", prompt="p"),
                "a's model on b": lambda: b.completions.create(model="fast", prompt="p"),
            }.items():
                try:
                    call()
                    errors[name] = None
                except openai.APIStatusError as exc:
                    errors[name] = (exc.status_code, exc.body["code"] if isinstance(exc.body, dict) else exc.body)
            return a_models, b_models, answer, smart, errors

        a_models, b_models, answer, smart, errors = await in_thread(run)
    assert a_models == ["chat", "embed", "fast"] and b_models == ["smart"]
    assert answer.model == "fast" and answer.choices[0].message.content == "t0 t1 t2 "
    assert smart.choices[0].text == "t0 t1 t2 "
    assert errors == {
        "a key on b": (401, "invalid_api_key"),
        "b key on a": (401, "invalid_api_key"),
        "no such key": (401, "invalid_api_key"),
        "b's model on a": (404, "model_not_found"),
        "a catalogue model a does not list": (404, "model_not_found"),
        "a's model on b": (404, "model_not_found"),
    }
    assert len(neuron.finished) == 2  # the alias ran its catalogue model; nothing refused reached a neuron


async def test_an_alias_runs_its_catalogue_model_and_never_names_it() -> None:
    fleet = Fleet()
    NeuronDouble("n1", fleet, loaded=("chat",), tokens=2)
    seen: list[str] = []
    tenants = []
    store = SqliteStore(":memory:")
    key = new_key(store, "acme")
    async with portals(fleet, {"acme": acme(priority="interactive")}, store=store) as (gateway, urls):
        real = gateway.orchestrator.generate

        def spy(request, **kw):  # noqa: ANN001, ANN202
            seen.append(request.model_id)
            tenants.append(kw["tenant"])
            return real(request, **kw)

        gateway.orchestrator.generate = spy  # type: ignore[method-assign]

        def run():
            stream = client(urls["acme"], key).chat.completions.create(
                model="fast", messages=[{"role": "user", "content": "x"}], stream=True)
            return [chunk.model for chunk in stream]

        models = await in_thread(run)
        async with httpx.AsyncClient() as http:
            listed = (await http.get(urls["acme"] + "/v1/models", headers=bearer(key))).json()["data"]
            metrics = (await http.get(urls["default"] + "/metrics", headers=admin_headers())).text
    assert seen == ["chat"] and set(models) == {"fast"}
    key_id = key.split("_")[0].removeprefix("sk-hlx-")
    assert [(t.portal, t.key, t.priority) for t in tenants] == [("acme", key_id, "interactive")]
    assert 'helexa_portal_requests_total{model="fast",outcome="ok",portal="acme"} 1.0' in metrics
    assert 'helexa_portal_tokens_total{kind="completion",model="fast",portal="acme"} 2.0' in metrics
    assert key_id not in metrics
    fast = next(m for m in listed if m["id"] == "fast")
    assert set(fast) == {"id", "object", "created", "owned_by", "loaded"} and fast["owned_by"] == "acme"


async def test_a_key_limited_to_some_models_is_answered_as_if_the_others_did_not_exist() -> None:
    # A 403 model_not_allowed told the key what its listing hides: that the model is here.
    # Every surface answers a model the key may not use exactly as one the portal lacks.
    fleet = Fleet()
    NeuronDouble("n1", fleet, loaded=("chat", "embed"))
    store = SqliteStore(":memory:")
    key = new_key(store, "acme", models=("embed",))
    msg = [{"role": "user", "content": "x"}]
    calls = [("/v1/chat/completions", {"messages": msg}), ("/v1/completions", {"prompt": "x"}),
             ("/v1/embeddings", {"input": "x"}), ("/v1/responses", {"input": "x"}),
             ("/v1/messages", {"messages": msg, "max_tokens": 4}), ("/v1/messages/count_tokens", {"messages": msg}),
             ("/api/chat", {"messages": msg}), ("/api/generate", {"prompt": "x"}), ("/api/embed", {"input": "x"}),
             ("/api/show", {})]
    async with portals(fleet, {"acme": acme()}, store=store) as (_, urls):
        def run():
            c = client(urls["acme"], key)
            vectors = c.embeddings.create(model="embed", input=["a"], encoding_format="float")
            with pytest.raises(openai.NotFoundError):
                c.chat.completions.create(model="fast", messages=msg)
            return vectors, [m.id for m in c.models.list()]

        vectors, listed = await in_thread(run)
        answers: dict[str, list[tuple[int, str]]] = {}
        async with httpx.AsyncClient(base_url=urls["acme"], headers=bearer(key)) as http:
            for model in ("fast", "nowhere"):
                got = [await http.post(path, json={"model": model, **body}) for path, body in calls]
                got.append(await http.get(f"/v1/models/{model}"))
                answers[model] = [(r.status_code, r.text.replace(model, "M")) for r in got]
    assert vectors.data[0].embedding == [0.0, 1.0, 2.0] and listed == ["embed"]
    assert answers["fast"] == answers["nowhere"]
    assert {status for status, _ in answers["fast"]} == {404}
    assert not any("allowed" in text or "permission" in text for _, text in answers["fast"])


async def test_every_answer_uses_and_bills_the_same_usage_at_the_portals_price() -> None:
    fleet = Fleet()
    NeuronDouble("n1", fleet, loaded=("chat",), tokens=4)
    store = SqliteStore(":memory:")
    key = new_key(store, "acme", budget=100.0)
    async with portals(fleet, {"acme": acme()}, store=store) as (gateway, urls):
        def run():
            stream = client(urls["acme"], key).chat.completions.create(
                model="fast", messages=[{"role": "user", "content": "x"}], stream=True,
                stream_options={"include_usage": True})
            return [c.usage for c in stream if c.usage is not None][0]

        usage = await in_thread(run)
        async with httpx.AsyncClient() as http:
            mine = (await http.get(urls["acme"] + "/v1/usage", headers=bearer(key))).json()
    (row,) = store.records()
    assert (usage.prompt_tokens, usage.completion_tokens) == (row.prompt_tokens, row.completion_tokens) == (5, 4)
    assert row.cost == pytest.approx(9 * 1000 / 1e6) and row.currency == "EUR"
    assert (row.portal, row.model_asked, row.model_served, row.node_id, row.outcome) == (
        "acme", "fast", "chat", "n1", "ok")
    assert row.key_id == key.split("_")[0].removeprefix("sk-hlx-") and row.latency >= 0
    assert mine["spent"]["money"] == pytest.approx(0.009) and mine["remaining_budget"] == pytest.approx(99.991)
    assert mine["models"][0]["model"] == "fast" and mine["currency"] == "EUR"


async def test_the_open_default_portal_is_unchanged_and_records_nothing() -> None:
    fleet = Fleet()
    NeuronDouble("n1", fleet, loaded=("chat",))
    store = SqliteStore(":memory:")
    async with portals(fleet, {}, store=store) as (_, urls):
        answer = await in_thread(lambda: client(urls["default"], "unused").completions.create(model="chat", prompt="x"))
        async with httpx.AsyncClient() as http:
            r = await http.post(urls["default"] + "/v1/completions", json={"model": "chat", "prompt": "x"})
    assert answer.choices[0].text == "t0 t1 t2 " and "x-ratelimit-limit-requests" not in r.headers
    assert store.records() == []


async def test_a_keyed_portal_without_a_key_is_401_in_the_openai_envelope() -> None:
    fleet = Fleet()
    async with portals(fleet, {"acme": acme()}) as (_, urls):
        async with httpx.AsyncClient() as http:
            r = await http.post(urls["acme"] + "/v1/chat/completions", json={"model": "fast", "messages": []})
            health = await http.get(urls["acme"] + "/health")
            admin = await http.get(urls["acme"] + "/admin/fleet")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert r.headers["www-authenticate"].startswith("Bearer")
    assert health.status_code == 200 and admin.status_code == 404  # the admin API is not on a portal's socket


def test_a_portal_on_a_public_address_must_say_how_it_authenticates() -> None:
    from helexa.config import ConfigError, load_config

    with pytest.raises(ConfigError) as err:
        load_config(CortexConfig, file=None, environ={}, overrides={"portals": {"acme": {"listen": ["0.0.0.0:9000"]}}})
    assert "\n" not in str(err.value) and 'auth = "keys"' in str(err.value) and "0.0.0.0:9000" in str(err.value)
    with pytest.raises(ConfigError, match="not loopback"):
        load_config(CortexConfig, file=None, environ={}, overrides={"gateway_socket": "0.0.0.0:8080"})
    for auth in ("keys", "none"):
        config = load_config(CortexConfig, file=None, environ={},
                             overrides={"portals": {"acme": {"listen": ["0.0.0.0:9000"], "auth": auth}}})
        assert config.portals["acme"].auth == auth
    assert list(CortexConfig().portals) == ["default"] and CortexConfig().portals["default"].listen == ["127.0.0.1:8080"]


def test_a_price_or_budget_that_is_not_a_finite_amount_is_refused_in_one_line(tmp_path) -> None:
    """TOML has inf and nan: an infinite price made every request's cost inf, a ledger row
    the reports showed as null and `helexa usage` failed on with a traceback. Refused at
    start and by a reload (same loader), naming the key; 1e15 is the admin API's bound."""
    from helexa.config import ConfigError, load_config

    path = tmp_path / "cortex.toml"
    for table, key in (("prices = { fast = { input = %s } }", "prices.fast.input"),
                       ("prices = { fast = { output = %s } }", "prices.fast.output"),
                       ("quotas = { budget = %s }", "quotas.budget")):
        for value in ("inf", "-inf", "nan", "1e16"):
            path.write_text(f"[portals.acme]\nlisten = [\"127.0.0.1:0\"]\n{table % value}\n")
            with pytest.raises(ConfigError) as err:
                load_config(CortexConfig, file=path, environ={})
            assert f"portals.acme.{key}" in str(err.value) and "\n" not in str(err.value), (table, value)
    path.write_text('[portals.acme]\nlisten = ["127.0.0.1:0"]\nprices = { fast = { input = 1e15 } }\n')
    assert load_config(CortexConfig, file=path, environ={}).portals["acme"].prices["fast"].input == 1e15


async def test_a_portal_with_a_certificate_serves_https(tmp_path) -> None:
    import ssl

    cert_file, key_file = self_signed(tmp_path)
    fleet = Fleet()
    NeuronDouble("n1", fleet, loaded=("chat",))
    store = SqliteStore(":memory:")
    key = new_key(store, "acme")
    tables = {"acme": acme(listen=["localhost:0"], tls_cert_file=str(cert_file), tls_key_file=str(key_file))}
    async with portals(fleet, tables, store=store) as (_, urls):
        assert urls["acme"].startswith("https://")
        port = urls["acme"].rsplit(":", 1)[1]
        ctx = ssl.create_default_context(cafile=str(cert_file))
        async with httpx.AsyncClient(verify=ctx) as http:
            r = await http.post(f"https://localhost:{port}/v1/completions", json={"model": "fast", "prompt": "x"},
                                headers=bearer(key))
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "t0 t1 t2 "


async def test_a_keys_money_budget_counts_only_its_portals_currency_after_the_currency_changes() -> None:
    """A reload that changes the portal's currency (what ``Cortex.reload`` does to a
    portal: reconfigure it, then tell the metering) leaves the key's budget counting what
    it spent in the new currency: the euros spent are not dollars."""
    fleet = Fleet()
    NeuronDouble("n1", fleet, loaded=("chat",), tokens=4)
    store = SqliteStore(":memory:")
    key = new_key(store, "acme", budget=100.0)
    key_id = key.split("_")[0].removeprefix("sk-hlx-")
    async with portals(fleet, {"acme": acme()}, store=store) as (gateway, urls):
        ask = {"model": "fast", "messages": [{"role": "user", "content": "x"}]}
        async with httpx.AsyncClient(base_url=urls["acme"], headers=bearer(key)) as http:
            assert (await http.post("/v1/chat/completions", json=ask)).status_code == 200
            euros = (await http.get("/v1/usage")).json()
            portal = gateway.portals["acme"]
            portal.reconfigure(portal.config.model_copy(update={"currency": "USD"}))
            gateway.metering.portal_changed(portal)
            state = gateway.metering.account_state("key:" + key_id)
            assert (await http.post("/v1/chat/completions", json=ask)).status_code == 200
            dollars = (await http.get("/v1/usage")).json()
    assert euros["currency"] == "EUR" and euros["spent"]["money"] == pytest.approx(0.009)
    assert state is not None and state["spent"] == {"money": 0.0, "tokens": 9}
    assert dollars["currency"] == "USD" and dollars["spent"] == {"money": pytest.approx(0.009), "tokens": 18}
    assert dollars["remaining_budget"] == pytest.approx(100.0 - 0.009)


async def test_a_stream_cut_by_its_neuron_dying_is_billed_with_its_time_to_first_token() -> None:
    fleet = Fleet()
    neuron = NeuronDouble("n1", fleet, loaded=("chat",), tokens=100, token_delay=0.05)
    store = SqliteStore(":memory:")
    key = new_key(store, "acme")
    async with portals(fleet, {"acme": acme()}, store=store) as (gateway, urls):
        def run() -> list[str]:
            got = []
            with pytest.raises(openai.APIError, match="went away"):
                for chunk in client(urls["acme"], key).chat.completions.create(
                        model="fast", messages=[{"role": "user", "content": "x"}], stream=True):
                    if chunk.choices[0].delta.content:
                        got.append(chunk.choices[0].delta.content)
                    if len(got) == 2:
                        trio.from_thread.run_sync(neuron.kill)
            return got

        got = await in_thread(run)
    (row,) = store.records()
    assert got == ["t0 ", "t1 "] and row.completion_tokens >= 2 and row.outcome != "ok"
    assert row.ttft is not None and 0 <= row.ttft <= row.latency, row
