"""Other sites' pages and DNS rebinding are refused at the edge (:mod:`.browser_guard`).

A real gateway on 127.0.0.1:0; raw HTTP over a socket where the ``Host`` and ``Origin``
headers are the point (an HTTP client would set ``Host`` itself), the official clients
where a client's behaviour is."""

from __future__ import annotations

import json

import anthropic
import openai
import trio

from helexa.roles.cortex.browser_guard import BrowserGuard, HostNotAllowed, OriginNotAllowed
from helexa.roles.cortex.catalogue import Catalogue, CatalogueEntry
from helexa.roles.cortex.fleet import Fleet
from neuron_double import NeuronDouble
from serving import serving

CATALOGUE = Catalogue([CatalogueEntry(id="chat", backend="synthetic", memory_mb=500, max_output=64)])
CHAT = json.dumps({"model": "chat", "messages": [{"role": "user", "content": "hi"}]}).encode()


async def raw(url: str, method: str, path: str, headers: dict[str, str], body: bytes = b"") -> tuple[int, dict, bytes]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    lines = [f"{method} {path} HTTP/1.1", *(f"{k}: {v}" for k, v in headers.items()),
             f"content-length: {len(body)}", "connection: close", "", ""]
    stream = await trio.open_tcp_stream(host, int(port))
    async with stream:
        await stream.send_all("\r\n".join(lines).encode() + body)
        data = b""
        with trio.fail_after(10):
            while chunk := await stream.receive_some():
                data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    out = {}
    for line in header_lines:
        k, _, v = line.partition(":")
        out[k.strip().lower()] = v.strip()
    return int(status_line.split()[1]), out, rest


async def test_a_cross_site_simple_post_is_refused_before_any_work_in_each_surfaces_shape() -> None:
    fleet = Fleet()
    neuron = NeuronDouble("n1", fleet, loaded=("chat",))
    async with serving(fleet, CATALOGUE) as (_, url):
        host = url.removeprefix("http://")
        evil = {"host": host, "origin": "https://evil.example", "content-type": "text/plain"}
        status, _, body = await raw(url, "POST", "/v1/chat/completions", evil, CHAT)
        assert status == 403
        error = json.loads(body)["error"]
        assert error["code"] == "origin_not_allowed" and "evil.example" in error["message"]
        status, _, body = await raw(url, "POST", "/api/chat", evil, CHAT)
        assert status == 403 and isinstance(json.loads(body)["error"], str)  # Ollama's shape
        status, _, body = await raw(url, "POST", "/v1/messages", evil, CHAT)
        assert status == 403 and json.loads(body)["type"] == "error"  # Anthropic's shape
        status, _, _ = await raw(url, "GET", "/v1/models", {"host": host, "origin": "null"})
        assert status == 403  # a sandboxed frame or a file:// page
        assert neuron.requests == []  # nothing ran
        # The same request from the gateway's own origin (the console, a portal page) runs.
        status, _, body = await raw(url, "POST", "/v1/chat/completions",
                                    {"host": host, "origin": url, "content-type": "application/json"}, CHAT)
        assert status == 200, body
        assert len(neuron.requests) == 1


async def test_a_rebinding_host_is_refused_on_a_loopback_socket() -> None:
    fleet = Fleet()
    neuron = NeuronDouble("n1", fleet, loaded=("chat",))
    async with serving(fleet, CATALOGUE) as (_, url):
        port = url.rsplit(":", 1)[1]
        # An attacker's domain resolving to 127.0.0.1: same-origin with itself, so Origin alone would pass.
        rebound = {"host": f"evil.example:{port}", "origin": f"http://evil.example:{port}",
                   "content-type": "text/plain"}
        status, _, body = await raw(url, "POST", "/v1/chat/completions", rebound, CHAT)
        assert status == 403 and json.loads(body)["error"]["code"] == "host_not_allowed"
        status, _, _ = await raw(url, "GET", "/v1/models", {"host": "evil.example"})
        assert status == 403
        assert neuron.requests == []
        for ok in (f"localhost:{port}", f"127.0.0.1:{port}", f"127.1.2.3:{port}", f"[::1]:{port}", "localhost"):
            status, _, _ = await raw(url, "GET", "/v1/models", {"host": ok})
            assert status == 200, ok


async def test_allowed_origins_and_hosts_let_the_operators_own_in_with_cors_headers() -> None:
    fleet = Fleet()
    NeuronDouble("n1", fleet, loaded=("chat",))
    gateway = {"allowed_origins": ["https://app.example/"], "allowed_hosts": ["llm.internal"]}
    async with serving(fleet, CATALOGUE, gateway=gateway) as (_, url):
        host = url.removeprefix("http://")
        status, headers, body = await raw(url, "POST", "/v1/chat/completions",
                                          {"host": host, "origin": "https://app.example",
                                           "content-type": "application/json"}, CHAT)
        assert status == 200, body
        assert headers["access-control-allow-origin"] == "https://app.example" and headers["vary"] == "origin"
        status, headers, _ = await raw(url, "OPTIONS", "/v1/chat/completions",
                                       {"host": host, "origin": "https://app.example",
                                        "access-control-request-method": "POST",
                                        "access-control-request-headers": "authorization, content-type"})
        assert status == 204
        assert "POST" in headers["access-control-allow-methods"]
        assert headers["access-control-allow-headers"] == "authorization, content-type"
        status, _, _ = await raw(url, "OPTIONS", "/v1/chat/completions",
                                 {"host": host, "origin": "https://evil.example",
                                  "access-control-request-method": "POST"})
        assert status == 403
        status, _, _ = await raw(url, "GET", "/v1/models", {"host": "llm.internal:443"})  # behind a reverse proxy
        assert status == 200


async def test_the_official_clients_send_no_origin_and_are_unaffected() -> None:
    fleet = Fleet()
    NeuronDouble("n1", fleet, loaded=("chat",))
    async with serving(fleet, CATALOGUE) as (_, url):
        def run() -> tuple[str | None, str]:
            oa = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=10)
            chat = oa.chat.completions.create(model="chat", messages=[{"role": "user", "content": "hi"}])
            an = anthropic.Anthropic(base_url=url, api_key="unused", max_retries=0, timeout=10)
            msg = an.messages.create(model="chat", max_tokens=8, messages=[{"role": "user", "content": "hi"}])
            return chat.choices[0].message.content, msg.type
        content, kind = await trio.to_thread.run_sync(run)
    assert content and kind == "message"


def test_the_guard_decides_without_a_server() -> None:
    guard = BrowserGuard(["https://app.example"], [], loopback=False)
    assert guard.check([(b"host", b"anything.example")]) is None  # not loopback: Host not checked
    assert guard.check([(b"host", b"a.example"), (b"origin", b"https://a.example")]) is None
    assert guard.check([(b"host", b"a.example"), (b"origin", b"https://app.example")]) == b"https://app.example"
    for headers in ([(b"host", b"a.example"), (b"origin", b"https://b.example")],
                    [(b"origin", b"https://a.example")],  # no Host to be the same origin as
                    [(b"host", b"a.example"), (b"origin", b"https://xa.example")]):
        try:
            guard.check(headers)
        except OriginNotAllowed:
            continue
        raise AssertionError(headers)
    loop = BrowserGuard([], [], loopback=True)
    for _ in range(2):  # the second time from the accepted set
        assert loop.check([(b"host", b"localhost:8080")]) is None
    for bad in (b"localhost.evil.example", b"127.0.0.1.nip.io:80", b"[::2]:80", b""):
        try:
            loop.check([(b"host", bad)])
        except HostNotAllowed:
            continue
        raise AssertionError(bad)
