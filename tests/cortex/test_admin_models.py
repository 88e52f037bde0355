"""The admin API's model routes over neuron doubles: the catalogue against the fleet,
operator loads streamed as NDJSON, unloads, pins that keep a model resident. Progress
from a real neuron's download is in ``tests/e2e/test_models_cli_e2e.py``."""

from __future__ import annotations

import json
import sys
from functools import partial

import httpx
import pytest
import trio
from click.testing import CliRunner

from helexa import cli_models
from helexa.cli import main as cli_main
from helexa.protocol import ModelState, ModelStatus
from helexa.roles.cortex.portal import admin_models

from helexa.roles.cortex.catalogue import Catalogue, CatalogueEntry
from helexa.roles.cortex.fleet import Fleet, Health
from neuron_double import NeuronDouble, hardware
from serving import ADMIN_TOKEN, admin_headers, serving

HELEXA = [sys.executable, "-m", "helexa.cli"]


async def helexa_models(url: str, token_file, *args: str) -> tuple[int, str, str]:  # noqa: ANN001
    """``helexa models ARGS`` in a process of its own: its exit code, stdout and stderr."""
    done = await trio.run_process([*HELEXA, "models", *args, "--cortex", url, "--admin-token-file", str(token_file)],
                                  capture_stdout=True, capture_stderr=True, check=False)
    return done.returncode, done.stdout.decode(), done.stderr.decode()

CATALOGUE = Catalogue([
    CatalogueEntry(id="chat", backend="synthetic", memory_mb=500),
    CatalogueEntry(id="big", backend="synthetic", memory_mb=500, min_devices=1, min_device_vram_mb=1000),
    CatalogueEntry(id="chat2", backend="synthetic", memory_mb=500, idle_ttl=10),
])


def _events(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


async def test_list_shows_where_each_model_can_run_and_is_loaded() -> None:
    fleet = Fleet()
    NeuronDouble("n1", fleet, loaded=("chat", "stray"))
    NeuronDouble("n2", fleet, hw=hardware(gpus=(8,)))
    async with serving(fleet, CATALOGUE) as (gateway, url), httpx.AsyncClient(base_url=url) as http:
        r = await http.get("/admin/models", headers=admin_headers())
        assert r.status_code == 200
        models = {m["id"]: m for m in r.json()["data"]}
        assert list(models) == ["chat", "big", "chat2", "stray"]
        assert models["chat"]["feasible_on"] == ["n1", "n2"]
        assert models["chat"]["neurons"]["n1"]["state"] == "loaded"
        assert models["big"]["feasible_on"] == ["n2"] and models["big"]["neurons"] == {}
        assert models["stray"]["catalogued"] is False
        one = await http.get("/admin/models/big", headers=admin_headers())
        assert one.json()["feasible_on"] == ["n2"]
        assert (await http.get("/admin/models/nope", headers=admin_headers())).status_code == 404
        assert (await http.get("/admin/models")).status_code == 401  # the admin token, always


async def test_load_on_a_chosen_neuron_streams_its_outcome_and_unload_takes_it_off() -> None:
    fleet = Fleet()
    n1 = NeuronDouble("n1", fleet)
    n2 = NeuronDouble("n2", fleet)
    async with serving(fleet, CATALOGUE) as (gateway, url), httpx.AsyncClient(base_url=url) as http:
        r = await http.post("/admin/models/chat/load", json={"neuron": "n2"}, headers=admin_headers())
        assert r.status_code == 200 and r.headers["content-type"] == "application/x-ndjson"
        assert _events(r.text) == [{"event": "done", "neuron": "n2"}, {"event": "end", "ok": True}]
        assert n2.loads() == ["chat"] and n1.loads() == []
        r = await http.post("/admin/models/big/load", json={}, headers=admin_headers())
        events = _events(r.text)
        assert events[0]["event"] == "error" and "hardware" in events[0]["message"]
        assert events[-1] == {"event": "end", "ok": False}
        r = await http.post("/admin/models/chat/unload", json={}, headers=admin_headers())
        assert r.json() == {"model": "chat", "unloaded_from": ["n2"]}
        assert n2.unloads() == ["chat"]
        for path, body, status in [("/admin/models/chat/load", {"neuron": "n9"}, 404),
                                   ("/admin/models/nope/load", {}, 404),
                                   ("/admin/models/chat/pin", {}, 400),
                                   ("/admin/models/chat/load", {"node": "n1"}, 400),
                                   # a model id may hold "/": this is model chat/explode's path, GET only
                                   ("/admin/models/chat/explode", {}, 405)]:
            r = await http.post(path, json=body, headers=admin_headers())
            assert r.status_code == status, (path, r.text)
            assert "error" in r.json()


async def test_a_pinned_model_is_loaded_there_kept_past_its_idle_ttl_and_reloaded_when_lost(autojump_clock) -> None:
    fleet = Fleet()
    n1 = NeuronDouble("n1", fleet)
    NeuronDouble("n2", fleet)
    async with serving(fleet, CATALOGUE) as (gateway, url), httpx.AsyncClient(base_url=url) as http:
        r = await http.post("/admin/models/chat2/pin", json={"neuron": "n1"}, headers=admin_headers())
        assert r.json() == {"model": "chat2", "neuron": "n1", "pinned": True, "changed": True}
        await trio.sleep(1)
        assert n1.loads() == ["chat2"]
        await trio.sleep(60)  # six idle TTLs
        assert n1.unloads() == []
        assert (await http.get("/admin/models/chat2", headers=admin_headers())).json()["pinned_on"] == ["n1"]
        n1.models.pop("chat2")  # lost (a crash of its worker, say)
        fleet.notify()
        await trio.sleep(1)
        assert n1.loads() == ["chat2", "chat2"]
        r = await http.post("/admin/models/chat2/unpin", json={"neuron": "n1"}, headers=admin_headers())
        assert r.json()["changed"] is True
        await trio.sleep(11)
        assert n1.unloads() == ["chat2"]  # an ordinary model again: idle past its TTL


async def test_models_unload_waits_for_the_running_request_to_finish_past_the_client_timeout(tmp_path) -> None:
    """The unload is answered once the model's running requests have finished (the drain),
    which may take far longer than the command's --timeout for a plain answer: the command
    waits for it and reports the unload, not a timed-out "cannot reach the cortex"."""
    fleet = Fleet()
    n1 = NeuronDouble("n1", fleet, loaded=("chat",), tokens=80, token_delay=0.1)
    token_file = tmp_path / "admin-token"
    token_file.write_text(ADMIN_TOKEN)
    async with serving(fleet, CATALOGUE) as (gateway, url), httpx.AsyncClient(base_url=url, timeout=30) as http:
        streamed: list[str] = []

        async def stream() -> None:
            body = {"model": "chat", "messages": [{"role": "user", "content": "hi"}], "stream": True}
            async with http.stream("POST", "/v1/chat/completions", json=body) as r:
                streamed.extend([line async for line in r.aiter_lines() if line.startswith("data: ")])

        async with trio.open_nursery() as nursery:
            nursery.start_soon(stream)
            await trio.sleep(0.5)
            started = trio.current_time()
            code, out, err = await helexa_models(url, token_file, "unload", "chat", "--timeout", "1")
            took = trio.current_time() - started
        assert code == 0, err
        assert out.strip() == "chat: unloaded from n1" and took > 1.0
        assert streamed[-1] == "data: [DONE]" and n1.unloads() == ["chat"]


async def test_a_load_where_a_cold_load_would_go_names_that_neuron_and_a_second_one_waits_for_it() -> None:
    """``load`` without a neuron: every progress event names the neuron the load went to
    (not null, which left ``helexa models load``'s bar open past its "loaded on" line). A
    second load of the model while one is under way (another operator's, a request's cold
    load) waits for it and reports where it landed, instead of failing "already loading"
    (with a null code) as a deploy script's ``helexa models load`` did whenever a request
    happened to arrive first."""
    fleet = Fleet()
    n1 = NeuronDouble("n1", fleet, load_delay=0.5)
    n1.load_progress = True
    async with serving(fleet, CATALOGUE) as (gateway, url), httpx.AsyncClient(base_url=url) as http:
        answers: list[list[dict]] = []

        async def load(model: str = "chat", target: dict | None = None) -> None:
            r = await http.post(f"/admin/models/{model}/load", json=target or {}, headers=admin_headers())
            answers.append(_events(r.text))

        async def ask() -> None:
            body = {"model": "chat2", "messages": [{"role": "user", "content": "hi"}]}
            answers.append([{"status": (await http.post("/v1/chat/completions", json=body)).status_code}])

        async with trio.open_nursery() as nursery:
            nursery.start_soon(load)
            await trio.sleep(0.2)
            nursery.start_soon(load)
        loaded, joined = sorted(answers, key=len, reverse=True)  # the one that loaded has progress too
        answers.clear()
        async with trio.open_nursery() as nursery:  # a request's cold load first, then the operator's
            nursery.start_soon(ask)
            await trio.sleep(0.2)
            nursery.start_soon(load, "chat2", {"neuron": "n1"})
    progress = [e for e in loaded if e["event"] == "progress"]
    assert [(e["neuron"], e["done"]) for e in progress] == [("n1", 0), ("n1", 1)]
    assert loaded[-2:] == [{"event": "done", "neuron": "n1"}, {"event": "end", "ok": True}]
    assert joined == [{"event": "done", "neuron": "n1"}, {"event": "end", "ok": True}]
    assert sorted(answers, key=len) == [[{"status": 200}], [{"event": "done", "neuron": "n1"},
                                                            {"event": "end", "ok": True}]]
    assert n1.loads() == ["chat", "chat2"]  # each loaded once


async def test_a_quiet_load_sends_keepalives_so_a_client_can_tell_quiet_from_gone(monkeypatch) -> None:
    monkeypatch.setattr(admin_models, "KEEPALIVE_INTERVAL", 0.2)
    fleet = Fleet()
    NeuronDouble("n1", fleet, load_delay=1.0)
    async with serving(fleet, CATALOGUE) as (gateway, url), httpx.AsyncClient(base_url=url) as http:
        r = await http.post("/admin/models/chat/load", json={"neuron": "n1"}, headers=admin_headers())
    events = _events(r.text)
    assert events[-2:] == [{"event": "done", "neuron": "n1"}, {"event": "end", "ok": True}]
    assert events[:-2] and all(e == {"event": "keepalive"} for e in events[:-2]), events


@pytest.mark.parametrize("as_json", [False, True])
async def test_models_load_gives_up_on_a_cortex_gone_silent_mid_stream(monkeypatch, tmp_path, as_json) -> None:
    """A cortex that answered and then went silent (a partition, its host gone: no FIN ever
    comes) must not hold ``helexa models load`` forever: past STREAM_SILENCE without a line
    (the cortex sends a keepalive at least every 10 s) it fails, saying so."""
    monkeypatch.setattr(cli_models, "STREAM_SILENCE", 0.5)
    token_file = tmp_path / "admin-token"
    token_file.write_text(ADMIN_TOKEN)

    async def silent(stream: trio.SocketStream) -> None:
        await stream.receive_some(65536)
        await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/x-ndjson\r\n"
                              b"transfer-encoding: chunked\r\n\r\n")
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, silent, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        args = ["models", "load", "chat", "--cortex", f"http://127.0.0.1:{port}", "--admin-token-file", str(token_file)]
        with trio.fail_after(15):
            done = await trio.to_thread.run_sync(
                lambda: CliRunner().invoke(cli_main, args + (["--json"] if as_json else [])), abandon_on_cancel=True)
        nursery.cancel_scope.cancel()
    assert done.exit_code == 1 and "sent nothing for 0.5s" in done.output, done.output


async def test_a_neurons_refusal_keeps_its_own_code_for_the_operator_and_only_load_failed_for_clients() -> None:
    """docs/operations.md: a download that cannot fit fails with ``disk_full``, a file that
    does not match with ``hash_mismatch``: the operator's pull and load events say so (they
    said ``load_failed`` for every refusal); a client's cold load still learns only ``load_failed``."""
    fleet = Fleet()
    n1 = NeuronDouble("n1", fleet)
    n1.refuse_load, n1.load_code, n1.load_error = True, "hash_mismatch", "x.gguf: SHA-256 mismatch"
    async with serving(fleet, CATALOGUE) as (gateway, url), httpx.AsyncClient(base_url=url) as http:
        pulled = _events((await http.post("/admin/models/chat/pull", json={}, headers=admin_headers())).text)
        loaded = _events((await http.post("/admin/models/chat/load", json={}, headers=admin_headers())).text)
        body = {"model": "chat2", "messages": [{"role": "user", "content": "hi"}]}
        client = await http.post("/v1/chat/completions", json=body)
    assert pulled[0]["event"] == "error" and pulled[0]["code"] == "disk_full", pulled
    assert loaded[0]["event"] == "error" and loaded[0]["code"] == "hash_mismatch", loaded
    assert client.status_code == 503 and client.json()["error"]["code"] == "load_failed", client.text


async def test_unloading_a_model_only_configured_on_a_neuron_says_it_is_not_loaded() -> None:
    """A neuron lists a model it was only configured with (a pull, a past load): ``helexa
    models unload`` said "unloaded from n1" for it, though nothing was loaded there."""
    fleet = Fleet()
    n1 = NeuronDouble("n1", fleet)
    n1.models["chat"] = ModelStatus("chat", ModelState.CONFIGURED)
    async with serving(fleet, CATALOGUE) as (gateway, url), httpx.AsyncClient(base_url=url) as http:
        everywhere = await http.post("/admin/models/chat/unload", json={}, headers=admin_headers())
        there = await http.post("/admin/models/chat/unload", json={"neuron": "n1"}, headers=admin_headers())
    assert everywhere.status_code == 400 and everywhere.json()["error"]["code"] == "not_loaded", everywhere.text
    assert there.status_code == 404 and "does not hold" in there.json()["error"]["message"], there.text
    assert n1.unloads() == []


async def test_a_sources_credentials_and_signature_are_not_shown() -> None:
    signed = "https://operator:s3cret@files.example/m/model.gguf?X-Amz-Signature=SIG0123&token=TOK0456"
    catalogue = Catalogue([CatalogueEntry(id="signed", backend="synthetic", memory_mb=500, source=signed,
                                          sha256="0" * 64)])
    fleet = Fleet()
    NeuronDouble("n1", fleet)
    async with serving(fleet, catalogue) as (_, url), httpx.AsyncClient(base_url=url) as http:
        listed = (await http.get("/admin/models", headers=admin_headers())).text
        one = (await http.get("/admin/models/signed", headers=admin_headers())).json()
    assert one["source"] == "https://***@files.example/m/model.gguf?***"
    for leak in ("s3cret", "SIG0123", "TOK0456"):
        assert leak not in listed and leak not in str(one)


async def test_loading_a_model_already_loaded_there_touches_nothing() -> None:
    """``helexa models load chat --neuron n1`` with chat loaded on n1 planned another copy of
    it there: where n1 had no room for a second copy, the plan evicted chat itself (an unload
    draining its requests, then the load again: "loaded chat on n1 ... (evicted ['chat'])");
    and a load without a neuron loaded a second copy elsewhere. Both now answer where it is
    loaded, sending the neuron nothing."""
    fleet = Fleet()
    n1 = NeuronDouble("n1", fleet, hw=hardware(ram_gb=1), loaded=("chat", "chat2"))  # no room for a copy
    n2 = NeuronDouble("n2", fleet)
    async with serving(fleet, CATALOGUE, orchestrator={"min_residency": 0.0}) as (gateway, url), \
            httpx.AsyncClient(base_url=url) as http:
        load = partial(http.post, "/admin/models/chat/load", headers=admin_headers())
        here = _events((await load(json={"neuron": "n1"})).text)
        anywhere = _events((await load(json={})).text)
        gateway.orchestrator.provisioner.operator.begin_load_on("chat", "n1")  # the console's
        await trio.sleep(0.5)
    assert here == anywhere == [{"event": "done", "neuron": "n1"}, {"event": "end", "ok": True}]
    assert n1.commands == [] and n2.commands == []


async def test_a_model_whose_load_keeps_failing_shows_its_backoff_and_requests_get_503_without_a_load(
        tmp_path) -> None:
    fleet = Fleet()
    n1 = NeuronDouble("n1", fleet)
    n1.refuse_load, n1.load_error = True, "no such file: /models/typo.gguf"
    token_file = tmp_path / "admin-token"
    token_file.write_text(ADMIN_TOKEN)
    async with serving(fleet, CATALOGUE, orchestrator={"load_backoff": 30.0}) as (gateway, url), \
            httpx.AsyncClient(base_url=url) as http:
        body = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}
        first = await http.post("/v1/chat/completions", json=body)
        again = await http.post("/v1/chat/completions", json=body)
        models = {m["id"]: m for m in (await http.get("/admin/models", headers=admin_headers())).json()["data"]}
        code, out, err = await helexa_models(url, token_file, "list")
        shown = await helexa_models(url, token_file, "show", "chat")
    assert n1.loads() == ["chat"]  # the second request started no load
    for r in (first, again):
        assert r.status_code == 503 and r.json()["error"]["code"] == "load_failed", r.text
        assert "typo" not in r.text  # the neuron's words are the operator's
    assert 25 <= int(again.headers["retry-after"]) <= 30
    failed = models["chat"]["load_failed"]["n1"]
    assert failed["failures"] == 1 and "typo.gguf" in failed["error"] and 25 < failed["retry_in"] <= 30
    assert models["chat2"]["load_failed"] == {}
    assert code == 0, err
    row = next(line for line in out.splitlines() if line.startswith("chat "))
    assert "n1(failed, retry in" in row, out
    assert "n1: load failed 1 time(s) in a row, next try in" in shown[1] and "typo.gguf" in shown[1], shown


async def test_a_pin_that_cannot_fit_beside_the_neurons_other_pins_is_refused_with_409(tmp_path) -> None:
    fleet = Fleet()
    n1 = NeuronDouble("n1", fleet, hw=hardware(ram_gb=1))  # 921 MB usable: one 500 MB model
    token_file = tmp_path / "admin-token"
    token_file.write_text(ADMIN_TOKEN)
    async with serving(fleet, CATALOGUE) as (gateway, url), httpx.AsyncClient(base_url=url) as http:
        pin = partial(http.post, headers=admin_headers())
        assert (await pin("/admin/models/chat/pin", json={"neuron": "n1"})).status_code == 200
        r = await pin("/admin/models/chat2/pin", json={"neuron": "n1"})
        code, out, err = await helexa_models(url, token_file, "pin", "chat2", "--neuron", "n1")
        again = await pin("/admin/models/chat/pin", json={"neuron": "n1"})  # pinned already: still fine
        models = {m["id"]: m for m in (await http.get("/admin/models", headers=admin_headers())).json()["data"]}
    assert r.status_code == 409, r.text
    error = r.json()["error"]
    assert error["code"] == "pins_do_not_fit" and error["param"] == "neuron"
    assert "beside its other pins (chat: 500 MB)" in error["message"] and "921 MB" in error["message"]
    assert code != 0 and "beside its other pins" in err and "pinned on" not in out, (out, err)
    assert again.status_code == 200
    assert models["chat"]["pinned_on"] == ["n1"] and models["chat2"]["pinned_on"] == []
    assert "chat2" not in n1.loads()


async def test_feasible_on_lists_only_neurons_that_can_take_work_as_v1_models_does() -> None:
    fleet = Fleet()
    NeuronDouble("n1", fleet)
    offline = NeuronDouble("n2", fleet, loaded=("chat2",))
    offline.health = Health.UNHEALTHY  # missed its heartbeats: still in the fleet, given no work
    async with serving(fleet, CATALOGUE) as (gateway, url), httpx.AsyncClient(base_url=url) as http:
        models = {m["id"]: m for m in (await http.get("/admin/models", headers=admin_headers())).json()["data"]}
        listed = {m["id"]: m for m in (await http.get("/v1/models")).json()["data"]}
    assert models["chat"]["feasible_on"] == ["n1"] == listed["chat"]["feasible_on"]
    assert models["chat2"]["neurons"]["n2"]["state"] == "loaded"  # its state there is still shown
