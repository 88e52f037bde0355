"""A request body that comes too slowly is a 408 Request Timeout in the shape of the API its
path is under, and the connection closes after it (the rest of the body may still come):
on a real gateway over a raw socket, for a body that stops and for one that trickles."""

from __future__ import annotations

import json

import pytest
import trio

from helexa.roles.cortex.fleet import Fleet
from neuron_double import NeuronDouble
from portals import CATALOGUE
from serving import serving

PATHS = ["/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/messages", "/api/chat", "/api/generate"]


def shape_of(path: str, body: dict) -> str:
    """The error text, checking the body is in the path's API's shape."""
    if path.startswith("/api/"):
        assert set(body) == {"error"} and isinstance(body["error"], str)
        return body["error"]
    if path == "/v1/messages":
        assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
        return body["error"]["message"]
    assert set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["code"] == "request_timeout"
    return body["error"]["message"]


async def exchange(url: str, path: str, trickle: bool) -> tuple[int, dict[str, str], dict, bytes]:
    """Send a head promising 100 bytes and too few of them (all at once, or one every 0.1s);
    read until the server closes; return the status, headers, JSON body and what followed."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    stream = await trio.open_tcp_stream(host, int(port))
    await stream.send_all(f"POST {path} HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n"
                          f"content-length: 100\r\n\r\n{{".encode())
    got = b""

    async def read() -> None:
        nonlocal got
        while data := await stream.receive_some(65536):
            got += data

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read)
        if trickle:
            for _ in range(30):
                await trio.sleep(0.1)
                try:
                    await stream.send_all(b" ")
                except trio.BrokenResourceError:
                    break
    head, _, rest = got.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    length = int(headers["content-length"])
    return int(status_line.split()[1]), headers, json.loads(rest[:length]), rest[length:]


@pytest.mark.parametrize("trickle", [False, True], ids=["stops", "trickles"])
@pytest.mark.parametrize("path", PATHS)
async def test_a_body_too_slow_is_408_in_the_apis_shape_and_the_connection_closes(path, trickle) -> None:
    fleet = Fleet()
    NeuronDouble("n1", fleet, loaded=("chat",))
    async with serving(fleet, CATALOGUE, gateway={"body_timeout": 0.6}) as (_, url):
        with trio.fail_after(10):
            status, headers, body, after = await exchange(url, path, trickle)
    assert status == 408 and headers.get("connection") == "close" and after == b""
    assert "did not arrive within 0.6s" in shape_of(path, body)
