"""An operator's change to a key applies to the requests it finds under way.

A request is authenticated when its head arrives and admitted once its body has come (up to
``body_timeout`` later). It held the key's record of its head's time: a client that sent
heads ahead and their bodies after a revoke was served, billed to the revoked key; one
after ``budget: 0`` was served past it; one after its ``models`` were narrowed ran a model
the key may no longer use. And each answer's ``x-ratelimit-*`` headers, computed as it is
written, made the key's quota account again from that old record: a key revoked while its
answers ran kept an account in memory for good (``keys show`` gave its quota, not null),
and a key whose limits were changed while an answer ran had its old limits put back.

Here, over real sockets: heads sent, the key changed through the admin API, bodies sent."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
import trio

from helexa.roles.cortex.fleet import Fleet
from neuron_double import NeuronDouble
from portals import acme, bearer, portals
from serving import ADMIN_TOKEN, admin_headers

CHAT = {"model": "fast", "max_tokens": 4, "messages": [{"role": "user", "content": "x"}]}
EMBED = {"model": "embed", "input": "x"}


async def head_then_body(url: str, key: str, path: str, body: dict[str, Any], between: Any,
                         method: str = "POST") -> tuple[int, dict]:
    """Send the head of a request, await ``between()``, then send its body; the status and JSON answer."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    data = json.dumps(body).encode()
    stream = await trio.open_tcp_stream(host, int(port))
    async with stream:
        await stream.send_all(f"{method} {path} HTTP/1.1\r\nhost: localhost\r\nauthorization: Bearer {key}\r\n"
                              f"content-type: application/json\r\ncontent-length: {len(data)}\r\n\r\n".encode())
        await trio.sleep(0.2)  # the head is read and authenticated
        await between()
        await stream.send_all(data)
        got = b""
        while b"\r\n\r\n" not in got or len(got.partition(b"\r\n\r\n")[2]) < _length(got):
            chunk = await stream.receive_some(65536)
            if not chunk:
                break
            got += chunk
    head, _, rest = got.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(rest[:_length(got)])


def _length(got: bytes) -> int:
    for line in got.partition(b"\r\n\r\n")[0].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 1 << 30


@pytest.mark.parametrize("change, path, status, code", [
    ("revoke", "/v1/chat/completions", 401, "invalid_api_key"),
    ("revoke", "/v1/embeddings", 401, "invalid_api_key"),
    ("expire", "/v1/chat/completions", 401, "invalid_api_key"),
    ("budget", "/v1/chat/completions", 429, "insufficient_quota"),
    ("models", "/v1/chat/completions", 404, "model_not_found"),
])
async def test_a_key_changed_between_a_request_head_and_its_body_applies(change: str, path: str, status: int,
                                                                        code: str) -> None:
    fleet = Fleet()
    NeuronDouble("n1", fleet, loaded=("chat", "embed"))
    async with portals(fleet, {"acme": acme()}) as (gateway, urls):
        with trio.fail_after(30):
            async with httpx.AsyncClient(base_url=urls["default"], headers=admin_headers()) as admin:
                made = (await admin.post("/admin/keys", json={"portal": "acme", "name": "k", "budget": 5.0})).json()
                kid = made["key_id"]

                async def operator() -> None:
                    if change == "revoke":
                        r = await admin.post(f"/admin/keys/{kid}/revoke")
                    elif change == "expire":
                        r = await admin.patch(f"/admin/keys/{kid}", json={"expires_at": "2020-01-01"})
                    elif change == "budget":
                        r = await admin.patch(f"/admin/keys/{kid}", json={"budget": 0.0})
                    else:
                        r = await admin.patch(f"/admin/keys/{kid}", json={"models": ["embed"]})
                    assert r.status_code == 200, r.text

                got, body = await head_then_body(urls["acme"], made["key"], path,
                                                 EMBED if path == "/v1/embeddings" else CHAT, operator)
                assert (got, body["error"]["code"]) == (status, code), body
                records = (await admin.get(f"/admin/usage/records?key={kid}")).json()["data"]
    assert all(r["completion_tokens"] == 0 and r["cost"] == 0 for r in records)  # nothing served, nothing billed


async def test_answers_written_after_a_revoke_or_a_change_leave_the_key_account_as_it_is_now() -> None:
    fleet = Fleet()
    NeuronDouble("n1", fleet, loaded=("chat",), tokens=3, token_delay=0.3)
    async with portals(fleet, {"acme": acme()}) as (gateway, urls):
        with trio.fail_after(30):
            async with httpx.AsyncClient(base_url=urls["default"], headers=admin_headers()) as admin, \
                    httpx.AsyncClient(base_url=urls["acme"], timeout=20) as api:
                gone = (await admin.post("/admin/keys", json={"portal": "acme", "name": "gone", "rpm": 100})).json()
                kept = (await admin.post("/admin/keys", json={"portal": "acme", "name": "kept", "tpm": 100000})).json()
                answers: dict[str, httpx.Response] = {}

                async def ask(name: str, key: str) -> None:
                    answers[name] = await api.post("/v1/chat/completions", json=CHAT, headers=bearer(key))

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(ask, "gone", gone["key"])
                    nursery.start_soon(ask, "kept", kept["key"])
                    await trio.sleep(0.3)  # both admitted, generating
                    assert (await admin.post(f"/admin/keys/{gone['key_id']}/revoke")).status_code == 200
                    r = await admin.patch(f"/admin/keys/{kept['key_id']}", json={"tpm": 5000})
                    assert r.status_code == 200
                assert answers["gone"].status_code == 401
                assert answers["kept"].status_code == 200
                assert answers["kept"].headers["x-ratelimit-limit-tokens"] == "5000"
                shown_gone = (await admin.get(f"/admin/keys/{gone['key_id']}")).json()
                shown_kept = (await admin.get(f"/admin/keys/{kept['key_id']}")).json()
    assert shown_gone["quota"] is None
    assert "key:" + gone["key_id"] not in gateway.metering._accounts
    assert shown_kept["quota"]["limits"]["tpm"] == 5000


@pytest.mark.parametrize("change", ["revoke", "rotate", "update"])
async def test_an_update_whose_body_comes_after_another_change_keeps_that_change(change: str) -> None:
    """``PATCH /admin/keys/ID`` read the key's record before its body, and wrote back that
    record with its change once the body came: a revoke in between was undone (the revoked
    key served again, and was stored active, so a restart kept it so), a rotation undone (the
    old secret worked again, the new one not), another update's change lost."""
    fleet = Fleet()
    NeuronDouble("n1", fleet, loaded=("chat",))
    async with portals(fleet, {"acme": acme()}) as (gateway, urls):
        with trio.fail_after(30):
            async with httpx.AsyncClient(base_url=urls["default"], headers=admin_headers()) as admin, \
                    httpx.AsyncClient(base_url=urls["acme"]) as api:
                made = (await admin.post("/admin/keys", json={"portal": "acme", "name": "k"})).json()
                kid, secret = made["key_id"], made["key"]
                rotated: dict[str, Any] = {}

                async def operator() -> None:
                    if change == "revoke":
                        r = await admin.post(f"/admin/keys/{kid}/revoke")
                    elif change == "rotate":
                        r = await admin.post(f"/admin/keys/{kid}/rotate")
                        rotated.update(r.json())
                    else:
                        r = await admin.patch(f"/admin/keys/{kid}", json={"budget": 2.0})
                    assert r.status_code == 200, r.text

                got, body = await head_then_body(urls["default"], ADMIN_TOKEN, f"/admin/keys/{kid}", {"rpm": 77},
                                                 operator, method="PATCH")
                assert got == 200, body
                shown = (await admin.get(f"/admin/keys/{kid}")).json()
                old = await api.post("/v1/chat/completions", json=CHAT, headers=bearer(secret))
                new = await api.post("/v1/chat/completions", json=CHAT, headers=bearer(rotated["key"])) \
                    if rotated else None
    stored = next(k for k in gateway.store.keys() if k.key_id == kid)
    assert shown["limits"]["rpm"] == 77 and stored.limits.rpm == 77  # the update applied
    if change == "revoke":
        assert shown["state"] == "revoked" and stored.revoked_at is not None
        assert old.status_code == 401
    elif change == "rotate":
        assert old.status_code == 401 and new is not None and new.status_code == 200, (old.text, new)
    else:
        assert shown["limits"]["budget"] == 2.0 and stored.limits.budget == 2.0
        assert old.status_code == 200


async def test_a_concurrency_limit_given_to_a_key_counts_its_answers_already_running() -> None:
    # A key with no limits has no quota account; one made by an update started empty: the
    # key's two answers running did not count against max_concurrent = 2, and two more ran.
    fleet = Fleet()
    NeuronDouble("n1", fleet, loaded=("chat",), tokens=3, token_delay=0.3)
    async with portals(fleet, {"acme": acme()}) as (gateway, urls):
        with trio.fail_after(30):
            async with httpx.AsyncClient(base_url=urls["default"], headers=admin_headers()) as admin, \
                    httpx.AsyncClient(base_url=urls["acme"], timeout=20) as api:
                made = (await admin.post("/admin/keys", json={"portal": "acme", "name": "k"})).json()
                answers: list[int] = []

                async def ask() -> None:
                    answers.append((await api.post("/v1/chat/completions", json=CHAT,
                                                   headers=bearer(made["key"]))).status_code)

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(ask)
                    nursery.start_soon(ask)
                    await trio.sleep(0.3)  # both admitted, generating
                    r = await admin.patch(f"/admin/keys/{made['key_id']}", json={"max_concurrent": 2})
                    assert r.status_code == 200, r.text
                    during = await api.post("/v1/chat/completions", json=CHAT, headers=bearer(made["key"]))
                after = await api.post("/v1/chat/completions", json=CHAT, headers=bearer(made["key"]))
                shown = (await admin.get(f"/admin/keys/{made['key_id']}")).json()
    assert answers == [200, 200]
    assert during.status_code == 429 and "at most 2 concurrent" in during.json()["error"]["message"], during.text
    assert after.status_code == 200 and shown["quota"]["in_flight"] == 0


@pytest.mark.parametrize("change, status, kind", [
    ("revoke", 401, "authentication_error"),
    ("models", 404, "not_found_error"),
])
async def test_anthropic_count_tokens_reads_its_key_as_it_is_once_its_body_is_in(change: str, status: int,
                                                                                 kind: str) -> None:
    # count_tokens runs no model, but it held its head's record of the key: a revoked key
    # could still count tokens, and a key narrowed away from a model count its prompts.
    fleet = Fleet()
    NeuronDouble("n1", fleet, loaded=("chat",))
    async with portals(fleet, {"acme": acme(surfaces=["openai", "anthropic"])}) as (gateway, urls):
        with trio.fail_after(30):
            async with httpx.AsyncClient(base_url=urls["default"], headers=admin_headers()) as admin:
                made = (await admin.post("/admin/keys", json={"portal": "acme", "name": "k"})).json()
                kid = made["key_id"]

                async def operator() -> None:
                    if change == "revoke":
                        r = await admin.post(f"/admin/keys/{kid}/revoke")
                    else:
                        r = await admin.patch(f"/admin/keys/{kid}", json={"models": ["embed"]})
                    assert r.status_code == 200, r.text

                body = {"model": "fast", "messages": [{"role": "user", "content": "x"}]}
                got, answer = await head_then_body(urls["acme"], made["key"], "/v1/messages/count_tokens", body,
                                                   operator)
    assert (got, answer["type"], answer["error"]["type"]) == (status, "error", kind), answer
