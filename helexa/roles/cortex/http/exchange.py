"""One request on the lean HTTP server's connection and its response: the ASGI scope,
``receive`` and ``send`` the app gets (:class:`AsgiExchange`, made by the connection of
:mod:`.server` for each request head)."""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

import trio

from .errors import ClientGone, LocalProtocolError
from .events import Data, Request
from .parser import BoundedMemo
from .states import State

if TYPE_CHECKING:
    from .server import _ServerConnection as ServerConnection

_METHODS = BoundedMemo(bytes.decode, limit=64, longest=16,
                       seed=(b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"PATCH", b"OPTIONS"))
"""``_METHODS[b"POST"]`` is ``"POST"``: a request method as the ASGI scope's string."""
_DISCONNECT = {"type": "http.disconnect"}

BODY_EXTENSION = "helexa.body"
"""The ASGI scope's ``extensions`` key under which a request's whole body is given when
it came with the head: the app may take it from there rather than through ``receive()``
(which still hands it out too), and so wait for nothing and need no deadline for it."""

CANCEL_EXTENSION = "helexa.cancel_scope"
"""The ASGI scope's ``extensions`` key of the connection's ``trio.CancelScope``, around the
app's call: an app that learns the client went away may cancel it rather than open a scope
of its own per request (the request ends, and so does the connection, which has nobody
left to answer)."""


class AsgiExchange:
    """One request and its response: the ``receive`` and ``send`` the app gets."""

    __slots__ = ("conn", "request", "ended", "_ended_event", "watch", "body")

    def __init__(self, conn: ServerConnection, request: Request) -> None:
        self.conn = conn
        self.request = request
        self.body: bytes | None = None
        """The whole body, when it came with the head (until ``receive()`` hands it out)."""
        self.ended = False
        """Whether ``http.disconnect`` is due: the response is complete, the client left,
        or the app returned."""
        self._ended_event: trio.Event | None = None  # made only for a receive() that waits for the end
        self.watch: trio.CancelScope | None = None

    def asgi_scope(self) -> dict[str, Any]:
        req = self.request
        conn = self.conn
        target = req.target
        if target == conn._target:  # a keep-alive client asks for the same path again and again
            path, raw_path, query = conn._path
        else:
            raw_path, _, query = target.partition(b"?")
            path = raw_path.decode("latin-1")
            if "%" in path:
                path = unquote(path)
            conn._target, conn._path = target, (path, raw_path, query)
        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1" if req.http_version == b"1.1" else req.http_version.decode(),
            "method": _METHODS[req.method],
            "scheme": "http",
            "path": path,
            "raw_path": raw_path,
            "query_string": query,
            "root_path": "",
            "headers": req.headers,
            "client": conn.client,
            "server": conn.local,
        }
        extensions: dict[str, Any] = {CANCEL_EXTENSION: conn.scope}
        if self.body is not None:
            extensions[BODY_EXTENSION] = self.body
        scope["extensions"] = extensions
        return scope

    def end(self) -> None:
        self.ended = True
        if self._ended_event is not None:
            self._ended_event.set()
        if self.watch is not None:
            self.watch.cancel()

    async def _wait_ended(self) -> None:
        if self.ended:
            await trio.lowlevel.checkpoint()
            return
        if self._ended_event is None:
            self._ended_event = trio.Event()
        await self._ended_event.wait()

    async def receive(self) -> dict[str, Any]:
        """ASGI ``receive``: the body's parts, then ``http.disconnect`` when it is due."""
        conn = self.conn
        if conn.exchange is not self or self.ended:
            return dict(_DISCONNECT)
        if self.body is not None:
            body, self.body = self.body, None
            return {"type": "http.request", "body": body, "more_body": False}
        if conn.protocol.client_state is State.BODY:
            event = await conn.next_event()
            if type(event) is Data:
                return {"type": "http.request", "body": event.body, "more_body": event.more}
            return dict(_DISCONNECT)  # the client left mid-body, or its body was malformed or late
        if not conn.protocol.exchange_open:
            return dict(_DISCONNECT)
        if self.watch is not None:  # a task is already watching the socket
            await self._wait_ended()
            return dict(_DISCONNECT)
        self.watch = trio.CancelScope()
        with self.watch:
            try:
                peek = await conn.stream.socket.recv(1, socket.MSG_PEEK)
            except OSError:
                peek = b""
            if peek:
                await self._wait_ended()  # a pipelined request: it waits its turn
            else:
                conn.protocol.receive_data(b"", conn.now())
                self.end()
        return dict(_DISCONNECT)

    async def send(self, message: dict[str, Any]) -> None:
        """ASGI ``send``.

        Raises:
            ClientGone: the client went away (see :meth:`.Connection.send_body`).
            LocalProtocolError: a message out of order, of an unknown type, or after the
                app returned.
        """
        conn = self.conn
        if conn.exchange is not self:
            raise LocalProtocolError("send() after the app returned")
        kind = message["type"]
        if kind == "http.response.body":
            protocol = conn.protocol
            try:
                # (`in` and subscripts rather than .get: no method call per message)
                protocol.send_body(message["body"] if "body" in message else b"",
                                   "more_body" in message and message["more_body"])
                data = protocol.data_to_send()
                if data:
                    await conn.write(data)
            except ClientGone:
                self.end()
                raise
            if protocol.server_state is State.DONE:
                self.end()
        elif kind == "http.response.start":
            conn.protocol.start_response(message["status"], list(message["headers"]) if "headers" in message else [])
        else:
            raise LocalProtocolError(f"unexpected ASGI message {kind!r}")
