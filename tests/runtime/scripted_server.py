"""A scripted HTTP server on 127.0.0.1 for the upstream client's and openai_proxy's tests:
real sockets, and a handler per connection that says byte for byte what the server does."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio

Handler = Callable[["Conn"], Awaitable[None]]


class Conn:
    """The server's side of one accepted connection."""

    def __init__(self, stream: trio.SocketStream, index: int) -> None:
        self.stream = stream
        self.index = index
        self.buf = b""

    async def request(self) -> tuple[bytes, bytes] | None:
        """The next request's head and body, or None when the client closed."""
        while b"\r\n\r\n" not in self.buf:
            data = await self.stream.receive_some(65536)
            if not data:
                return None
            self.buf += data
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.lower() == b"content-length":
                length = int(value)
        while len(self.buf) < length:
            self.buf += await self.stream.receive_some(65536)
        body, self.buf = self.buf[:length], self.buf[length:]
        return head, body

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def answer(self, body: bytes = b"ok", status: str = "200 OK") -> None:
        await self.send(b"HTTP/1.1 %s\r\ncontent-length: %d\r\n\r\n%s" % (status.encode(), len(body), body))

    async def until_closed(self) -> None:
        while await self.stream.receive_some(65536):
            pass


class Server:
    """Runs ``handler`` for each connection; counts connections and requests."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.accepted = 0
        self.url = ""

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.url = "http://127.0.0.1:%d" % listener.socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._serve, [listener])

    async def _serve(self, stream: trio.SocketStream) -> None:
        self.accepted += 1
        async with stream:
            try:
                await self.handler(Conn(stream, self.accepted))
            except trio.BrokenResourceError:
                pass


async def serving(nursery: trio.Nursery, handler: Handler) -> Server:
    server = Server(handler)
    await nursery.start(server.run)
    return server


async def keep_answering(conn: Conn) -> None:
    while await conn.request() is not None:
        await conn.answer()
