"""The ASGI edge's own pieces: what a response's JSON body is, and where an Exchange takes
the request body and its cancel scope from (the gateway's server's extensions)."""

from __future__ import annotations

import json

import trio

from helexa.roles.cortex.asgi import Exchange, Limits, Responder
from helexa.roles.cortex.disconnect_watch import DisconnectWatch
from helexa.roles.cortex.errors import PayloadTooLarge
from helexa.roles.cortex.http import BODY_EXTENSION, CANCEL_EXTENSION


async def sent_json(obj) -> bytes:  # noqa: ANN001
    messages = []

    async def send(message) -> None:  # noqa: ANN001
        messages.append(message)

    await Responder(send, []).json(obj)
    return messages[-1]["body"]


async def test_json_bodies_are_compact_utf8_and_what_orjson_refuses_still_goes_out() -> None:
    assert await sent_json({"text": "café", 1: [1.5, None]}) == '{"text":"café","1":[1.5,null]}'.encode()
    for refused in ({"text": "\ud800"}, {"n": 2**70}):  # a lone surrogate, an int past 64 bits
        assert json.loads(await sent_json(refused)) == refused


async def never() -> dict:
    await trio.sleep_forever()
    return {}


def exchange(extensions: dict, limit: int = 100) -> Exchange:
    scope = {"headers": [], "extensions": extensions}
    return Exchange(scope, never, Responder(never, []), "r", Limits(limit, 1.0), DisconnectWatch())


async def test_a_body_the_server_holds_whole_is_taken_without_a_receive_and_still_limited() -> None:
    assert await exchange({BODY_EXTENSION: b"{}"}).body() == b"{}"
    try:
        await exchange({BODY_EXTENSION: b"x" * 101}).body()
    except PayloadTooLarge:
        pass
    else:
        raise AssertionError("a body over the limit was taken")


async def test_a_client_leaving_cancels_the_connections_scope_when_the_server_offers_it(autojump_clock) -> None:
    async def gone() -> dict:
        return {"type": "http.disconnect"}

    watch = DisconnectWatch(grace=1.0)
    connection = trio.CancelScope()
    async with trio.open_nursery() as nursery:
        await nursery.start(watch.run)
        ex = Exchange({"headers": [], "extensions": {CANCEL_EXTENSION: connection}}, gone, Responder(never, []),
                      "r", Limits(100, 1.0), watch)
        with connection:
            await ex.until_disconnect(trio.sleep_forever)
        nursery.cancel_scope.cancel()
    assert connection.cancelled_caught and trio.current_time() == 1.0  # once the watch's grace is over
