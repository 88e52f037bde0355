"""One portal's clients cannot take the connections (the open files) every other socket of
the cortex needs: each listening socket holds at most ``gateway.max_connections``, and by
default an even share of the process's open-file limit. Real sockets on 127.0.0.1."""

from __future__ import annotations

import resource

import httpx
import trio

from helexa.roles.cortex.fleet import Fleet
from helexa.roles.cortex.portal.store import SqliteStore
from neuron_double import NeuronDouble
from portals import acme, bearer, new_key, portals

CHAT = {"model": "fast", "max_tokens": 3, "messages": [{"role": "user", "content": "x"}]}


def hostport(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
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
    assert caps == {max(16, (soft - 256) // 4)}  # default, a, and b's two sockets
