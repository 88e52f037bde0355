"""No key and no admin token is ever logged or stored: a full cycle of requests, with every
logger at DEBUG, then the logs and every file of the SQLite database are searched."""

from __future__ import annotations

import io
import logging

import httpx

from helexa import logs

from helexa.roles.cortex.fleet import Fleet
from helexa.roles.cortex.portal.store import SqliteStore
from neuron_double import NeuronDouble
from portals import acme, bearer, portals
from serving import ADMIN_TOKEN, admin_headers

CHAT = {"model": "fast", "max_tokens": 10, "messages": [{"role": "user", "content": "x"}]}


async def test_keys_and_the_admin_token_appear_in_no_log_and_no_database_file(tmp_path, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    fleet = Fleet()
    NeuronDouble("n1", fleet, loaded=("chat", "embed"))
    store = SqliteStore(tmp_path / "usage.sqlite")
    secrets: list[str] = [ADMIN_TOKEN]
    async with portals(fleet, {"acme": acme(), "beta": {"listen": ["127.0.0.1:0"], "auth": "keys"}},
                       store=store) as (_, urls):
        async with httpx.AsyncClient(base_url=urls["default"], headers=admin_headers()) as admin, \
                httpx.AsyncClient(base_url=urls["acme"]) as api:
            made = (await admin.post("/admin/keys", json={"portal": "acme", "name": "n", "rpm": 2})).json()
            key = made["key"]
            secrets.append(key)
            for body in (CHAT, {**CHAT, "stream": True}):
                assert (await api.post("/v1/chat/completions", json=body, headers=bearer(key))).status_code == 200
            assert (await api.post("/v1/chat/completions", json=CHAT, headers=bearer(key))).status_code == 429
            assert (await api.post("/v1/embeddings", json={"model": "embed", "input": "a"},
                                   headers={"x-api-key": key})).status_code == 429
            wrong = await api.get(urls["beta"] + "/v1/models", headers=bearer(key))
            assert wrong.status_code == 401
            assert (await api.get("/v1/models", headers=bearer(key[:-3] + "abc"))).status_code == 401
            rotated = (await admin.post(f"/admin/keys/{made['key_id']}/rotate")).json()["key"]
            secrets.append(rotated)
            assert (await api.get("/v1/usage", headers=bearer(rotated))).status_code == 200
            await admin.post(f"/admin/keys/{made['key_id']}/revoke")
            assert (await api.get("/v1/usage", headers=bearer(rotated))).status_code == 401
            assert (await admin.get("/admin/usage/records")).status_code == 200
            assert (await admin.get("/admin/fleet", headers={"authorization": "Bearer " + ADMIN_TOKEN[:-1]})
                    ).status_code == 401
    store.close()
    logged = "\n".join(f"{r.getMessage()} {r.exc_text or ''}" for r in caplog.records)
    assert "created key" in logged and "refused a request" in logged  # the logs did see the cycle
    files = [p for p in tmp_path.iterdir() if p.name.startswith("usage.sqlite")]
    assert files
    for secret in secrets:
        assert secret not in logged
        assert secret[-43:] not in logged  # not even its random part
        for path in files:
            assert secret.encode() not in path.read_bytes(), path.name


async def test_an_admin_token_a_client_puts_in_a_path_or_a_model_name_is_masked_in_the_log(tmp_path) -> None:
    """The gateway logs each request's path (at DEBUG) and an unknown model's name: an admin
    token pasted there (a mistaken URL, a probing client) is masked like a key or a join
    token, in text and JSON lines alike."""
    for fmt in ("text", "json"):
        out = io.StringIO()
        logs.setup("debug", fmt, stream=out)
        try:
            fleet = Fleet()
            NeuronDouble("n1", fleet, loaded=("chat", "embed"))
            async with portals(fleet, {}) as (_, urls):
                async with httpx.AsyncClient(base_url=urls["default"]) as api:
                    assert (await api.get("/" + ADMIN_TOKEN)).status_code == 404
                    assert (await api.get("/v1/models/" + ADMIN_TOKEN)).status_code == 404
                    body = {"model": ADMIN_TOKEN, "messages": [{"role": "user", "content": "x"}]}
                    assert (await api.post("/v1/chat/completions", json=body)).status_code == 404
        finally:
            logs.setup("info")
        text = out.getvalue()
        assert "GET /hlx-admin-*** -> 404" in text, fmt  # the lines were written, masked
        assert ADMIN_TOKEN not in text and "test-token" not in text, fmt
