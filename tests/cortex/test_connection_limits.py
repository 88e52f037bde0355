"""One portal's clients cannot take the connections (the open files) every other socket of
the cortex needs: each listening socket holds at most ``gateway.max_connections``, and by
default an even share of the process's open-file limit. Real sockets on 127.0.0.1."""

from __future__ import annotations

import json
import resource
import ssl

import httpx
import trio

from helexa.roles.cortex.fleet import Fleet
from helexa.roles.cortex.portal.store import SqliteStore
from neuron_double import NeuronDouble
from portals import acme, bearer, new_key, portals, self_signed

CHAT = {"model": "fast", "max_tokens": 3, "messages": [{"role": "user", "content": "x"}]}


def hostport(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").removeprefix("https://").rsplit(":", 1)
    return host, int(port)


async def closed_at_once(stream: trio.SocketStream) -> bool:
    with trio.move_on_after(5):
        try:
            return await stream.receive_some() == b""
        except trio.BrokenResourceError:
            return True
    return False


async def test_a_flood_of_idle_connections_on_one_portal_leaves_another_portal_served() -> None:
    fleet = Fleet()
    NeuronDouble("n1", fleet, loaded=("chat",), tokens=2)
    store = SqliteStore(":memory:")
    key_a, key_b = new_key(store, "a"), new_key(store, "b")
    async with portals(fleet, {"a": acme(), "b": acme()}, store=store,
                       gateway={"max_connections": 4}) as (gateway, urls):
        # A slowloris on portal a: four connections that send a few bytes of a head, then nothing.
        held = [await trio.open_tcp_stream(*hostport(urls["a"])) for _ in range(4)]
        for s in held:
            await s.send_all(b"POST /v1/chat/completions HTTP/1.1\r\n")
        await trio.sleep(0.2)
        extra = await trio.open_tcp_stream(*hostport(urls["a"]))
        assert await closed_at_once(extra)  # the fifth is closed unheard
        async with httpx.AsyncClient(timeout=5) as http:
            b = await http.post(urls["b"] + "/v1/chat/completions", json=CHAT, headers=bearer(key_b))
            assert b.status_code == 200  # portal b's socket is untouched
            await held.pop().aclose()
            await trio.sleep(0.2)
            a = await http.post(urls["a"] + "/v1/chat/completions", json=CHAT, headers=bearer(key_a))
            assert a.status_code == 200  # a freed place is taken again
        for s in held:
            await s.aclose()
        await extra.aclose()


async def test_by_default_each_socket_gets_its_share_of_the_open_file_limit() -> None:
    fleet = Fleet()
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    async with portals(fleet, {"a": acme(), "b": acme(listen=["127.0.0.1:0", "127.0.0.1:0"])}) as (gateway, _):
        caps = {server.max_connections for server in gateway._servers}
    # default, a, b's two sockets, and the control plane's pending handshakes: five shares
    assert caps == {max(4, (soft - min(256, soft // 2)) // 5)}


async def tls(ctx: ssl.SSLContext, url: str) -> trio.SSLStream[trio.SocketStream]:
    stream = trio.SSLStream(await trio.open_tcp_stream(*hostport(url)), ctx, server_hostname="localhost",
                            https_compatible=True)
    await stream.do_handshake()
    return stream


async def test_a_tls_portal_caps_its_connections_and_cuts_a_slow_head_but_not_a_long_stream(tmp_path) -> None:
    """A TLS portal (hypercorn) holds the lean server's limits: ``max_connections`` per
    socket, and a head must arrive within ``body_timeout`` of its first byte; a streamed
    answer that lasts longer than that deadline still flows to its end."""
    cert_file, key_file = self_signed(tmp_path)
    fleet = Fleet()
    NeuronDouble("n1", fleet, loaded=("chat",), tokens=8, token_delay=0.3)  # a 2.4 s stream
    store = SqliteStore(":memory:")
    key = new_key(store, "a")
    ctx = ssl.create_default_context(cafile=str(cert_file))
    tables = {"a": acme(tls_cert_file=str(cert_file), tls_key_file=str(key_file))}
    async with portals(fleet, tables, store=store, gateway={"max_connections": 3, "body_timeout": 1.0}) as (_, urls):
        url = urls["a"]
        assert url.startswith("https://")
        port = hostport(url)[1]
        streamed: list[float] = []

        async def stream_answer() -> None:
            async with httpx.AsyncClient(verify=ctx, timeout=10) as http:
                async with http.stream("POST", f"https://localhost:{port}/v1/chat/completions",
                                       json=CHAT | {"stream": True, "max_tokens": 8}, headers=bearer(key)) as r:
                    assert r.status_code == 200
                    async for line in r.aiter_lines():
                        if line.startswith("data: ") and line != "data: [DONE]":
                            if json.loads(line[6:])["choices"] and json.loads(line[6:])["choices"][0]["delta"]:
                                streamed.append(trio.current_time())

        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                started = trio.current_time()
                nursery.start_soon(stream_answer)
                await trio.sleep(0.3)
                idle = [await tls(ctx, url) for _ in range(2)]  # with the stream: three open, the cap
                extra = await trio.open_tcp_stream(*hostport(url))
                assert await closed_at_once(extra)  # the fourth is closed unheard, before any TLS
                await extra.aclose()
                await idle.pop().aclose()
                await trio.sleep(0.2)
                # A slowloris: a head sent a byte at a time is cut at the deadline (1 s), not
                # at keep_alive_timeout (75 s).
                slow = await tls(ctx, url)
                head = b"POST /v1/chat/completions HTTP/1.1\r\nhost: localhost\r\n" + b"x-pad: " + b"a" * 400
                first = trio.current_time()
                cut_after = None
                for byte in head:
                    try:
                        await slow.send_all(bytes([byte]))
                        with trio.move_on_after(0.05):
                            if await slow.receive_some() == b"":
                                cut_after = trio.current_time() - first
                                break
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        cut_after = trio.current_time() - first
                        break
                assert cut_after is not None and 0.8 <= cut_after < 3, cut_after
                await trio.aclose_forcefully(slow)
                # A body that stops arriving is answered 408 (Request Timeout) at the same deadline.
                slow = await tls(ctx, url)
                await slow.send_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: localhost\r\n"
                                    b"authorization: Bearer " + key.encode() + b"\r\n"
                                    b"content-type: application/json\r\ncontent-length: 100\r\n\r\n{")
                first = trio.current_time()
                answer = b""
                with trio.move_on_after(5):
                    while b"\r\n\r\n" not in answer:
                        answer += await slow.receive_some()
                assert answer.startswith(b"HTTP/1.1 408"), answer
                assert 0.8 <= trio.current_time() - first < 3
                await trio.aclose_forcefully(slow)
                for s in idle:
                    await s.aclose()
        assert len(streamed) >= 8  # every token (and the role), the last well past the head deadline
        assert streamed[-1] - started > 2.0
