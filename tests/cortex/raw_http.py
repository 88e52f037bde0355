"""A raw HTTP/1.1 client over TCP and the lean HTTP server it talks to, for the server's
tests (``test_http_server*.py``): a raw client says exactly what goes over the wire (one
connection or several, a head sent in pieces, a socket closed mid-request), which httpx
would hide."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import trio
from trio.testing import MockClock

from helexa.roles.cortex.gateway import server_error_body
from helexa.roles.cortex.http import HttpServer


def guard() -> trio.CancelScope:
    """A limit on a test that hangs: 10 s, or 1,000 virtual seconds on the autojump clock."""
    return trio.fail_after(1000 if isinstance(trio.lowlevel.current_clock(), MockClock) else 10)


@asynccontextmanager
async def serving(app, **options) -> AsyncIterator[tuple[HttpServer, int]]:
    # As the gateway runs it: the server's own error responses carry OpenAI's envelope.
    options.setdefault("error_body", server_error_body)
    server = HttpServer(app, port=0, **options)
    with guard():
        async with trio.open_nursery() as nursery:
            url = (await nursery.start(server.run))[0]
            yield server, int(url.rsplit(":", 1)[1])
            nursery.cancel_scope.cancel()


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self):
        return json.loads(self.body)


class Client:
    """One TCP connection, with just enough HTTP/1.1 parsing to read responses."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buf = b""

    @classmethod
    async def connect(cls, port: int) -> Client:
        return cls(await trio.open_tcp_stream("127.0.0.1", port))

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def _fill(self) -> None:
        data = await self.stream.receive_some(65536)
        if not data:
            raise EOFError(f"the server closed the connection; unread: {self.buf!r}")
        self.buf += data

    async def read_until(self, marker: bytes) -> bytes:
        while marker not in self.buf:
            await self._fill()
        head, _, self.buf = self.buf.partition(marker)
        return head

    async def read_exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            await self._fill()
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    async def response(self, *, to_head: bool = False) -> Response:
        head = (await self.read_until(b"\r\n\r\n")).decode("latin-1")
        status_line, *lines = head.split("\r\n")
        status = int(status_line.split(" ")[1])
        headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if to_head or status < 200:
            body = b""
        elif headers.get("transfer-encoding") == "chunked":
            body = b""
            while size := int(await self.read_until(b"\r\n"), 16):
                body += await self.read_exactly(size)
                await self.read_exactly(2)
            await self.read_until(b"\r\n")
        else:
            body = await self.read_exactly(int(headers["content-length"]))
        return Response(status, headers, body)

    async def request(self, method: str = "GET", target: str = "/", body: bytes = b"", headers: str = "") -> Response:
        length = f"content-length: {len(body)}\r\n" if body else ""
        await self.send(f"{method} {target} HTTP/1.1\r\nhost: t\r\n{length}{headers}\r\n".encode() + body)
        return await self.response(to_head=method == "HEAD")

    async def rest(self) -> bytes:
        """Everything the server still sends until it closes the connection."""
        while True:
            data = await self.stream.receive_some(65536)
            if not data:
                rest, self.buf = self.buf, b""
                return rest
            self.buf += data

    async def aclose(self) -> None:
        await self.stream.aclose()


async def read_body(receive) -> tuple[bytes, int]:
    body, parts = b"", 0
    while True:
        msg = await receive()
        assert msg["type"] == "http.request"
        body += msg.get("body", b"")
        parts += 1
        if not msg.get("more_body", False):
            return body, parts


async def respond(send, body: bytes, status: int = 200, headers=()) -> None:
    await send({"type": "http.response.start", "status": status, "headers": list(headers)})
    await send({"type": "http.response.body", "body": body})


async def echo(scope, receive, send) -> None:
    """Answers with what it was asked, as JSON."""
    body, parts = await read_body(receive)
    await respond(send, json.dumps({
        "method": scope["method"], "path": scope["path"], "query": scope["query_string"].decode(),
        "client": list(scope["client"]), "body": body.decode(), "parts": parts,
    }).encode(), headers=[(b"content-type", b"application/json")])
