"""The ASGI edge of the gateway: one request as its handler sees it (:class:`Exchange`),
the response being written (:class:`Responder`), and the routes a surface serves
(:class:`Route`, :class:`Router`).

A surface (``openai_surface.py``, the admin API) is a set of routes whose handlers take an
:class:`Exchange`; the portal app (``gateway.py``) finds the route, authenticates the
caller and turns every error into the error envelope.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

import orjson
import trio

from . import sse
from .disconnect_watch import DisconnectWatch
from .errors import ClientGone, MethodNotAllowed, NotFound, PayloadTooLarge, RequestTimeout
from .http import BODY_EXTENSION, CANCEL_EXTENSION

if TYPE_CHECKING:
    from .portal.metering import Caller

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]

JSON: Headers = [(b"content-type", b"application/json")]
SSE: Headers = [(b"content-type", sse.CONTENT_TYPE), (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]


class Responder:
    """One response: remembers whether the headers went out (then errors go in-band).

    ``headers`` go on every response; ``late``, when set, is called as the head goes out
    and its headers are added too (a portal's rate-limit state at that moment).
    """

    __slots__ = ("send", "started", "headers", "late", "status")

    def __init__(self, send: Send, headers: Headers) -> None:
        self.send = send
        self.started = False
        self.status = 0
        self.headers = headers
        self.late: Callable[[], Headers] | None = None

    def _all(self, headers: Headers) -> Headers:
        return headers + self.headers + self.late() if self.late is not None else headers + self.headers

    async def _send(self, message: dict[str, Any]) -> None:
        try:
            await self.send(message)
        except OSError as exc:  # ASGI servers raise an OSError once the client is gone
            raise ClientGone(str(exc)) from None

    async def start(self, status: int = 200, headers: Headers = SSE) -> None:
        if not self.started:
            self.started = True
            self.status = status
            await self._send({"type": "http.response.start", "status": status, "headers": self._all(headers)})

    async def body(self, data: bytes, more: bool = True) -> None:
        await self._send({"type": "http.response.body", "body": data, "more_body": more})

    async def full(self, status: int, headers: Headers, data: bytes) -> None:
        self.started = True
        self.status = status
        await self._send({"type": "http.response.start", "status": status,
                          "headers": self._all([*headers, (b"content-length", b"%d" % len(data))])})
        await self._send({"type": "http.response.body", "body": data})

    async def json(self, obj: Any, status: int = 200) -> None:
        try:  # orjson: ~1 us for a completion's body where json.dumps took ~9 (on every answer)
            data = orjson.dumps(obj, option=orjson.OPT_NON_STR_KEYS)
        except TypeError:  # what orjson refuses (a lone surrogate, an int past 64 bits): json's escapes
            data = json.dumps(obj).encode()
        await self.full(status, JSON, data)


class BodyReads:
    """The request bodies being read from their clients (not yet whole): the stop's cut
    (:meth:`~.gateway.Gateway.cut`) ends each with its error, so a client still sending its
    body when the grace is over is answered (a 503 ``shutting_down``) instead of having its
    connection closed with no answer."""

    __slots__ = ("scopes", "error")

    def __init__(self) -> None:
        self.scopes: set[trio.CancelScope] = set()
        self.error: Exception | None = None

    def cut(self, error: Exception) -> None:
        self.error = error
        for scope in self.scopes:
            scope.cancel()


@dataclass(frozen=True, slots=True)
class Limits:
    """The edge's limits on a request (from ``[gateway]``)."""

    max_body_bytes: int
    body_timeout: float
    reads: BodyReads | None = None
    """Where bodies being read are registered for the stop's cut (None: not cut)."""


class Exchange:
    """One HTTP request, as a route handler gets it.

    ``caller`` is who asks (the portal, and its key when the portal needs keys);
    ``path_rest`` the part of the path after a prefix route's prefix.
    """

    __slots__ = ("scope", "receive", "out", "request_id", "caller", "path_rest", "_limits", "_watch")

    def __init__(self, scope: Scope, receive: Receive, out: Responder, request_id: str, limits: Limits,
                 watch: DisconnectWatch) -> None:
        self.scope = scope
        self.receive = receive
        self.out = out
        self.request_id = request_id
        self.caller: Caller | None = None
        self.path_rest = ""
        self._limits = limits
        self._watch = watch

    @property
    def client(self) -> str:
        return (self.scope.get("client") or ("", 0))[0]

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.scope["headers"]:
            if key == name:
                return value
        return None

    def query(self) -> dict[str, str]:
        raw = self.scope.get("query_string") or b""
        return dict(parse_qsl(raw.decode("latin-1"))) if raw else {}

    async def body(self) -> bytes:
        """The request body. Raises PayloadTooLarge (413), RequestTimeout (408: too slow), ClientGone.

        A body the server already holds whole (:data:`.http.BODY_EXTENSION`) is taken as it
        is; otherwise it is read within ``body_timeout``."""
        limit = self._limits.max_body_bytes
        scope = self.scope
        # (`in` and subscripts: no method call on every request's path)
        if "extensions" in scope and (extensions := scope["extensions"]) and BODY_EXTENSION in extensions:
            whole = extensions[BODY_EXTENSION]
            if whole is not None:
                if len(whole) > limit:
                    raise PayloadTooLarge(f"the body is over the limit of {limit} bytes")
                return whole
        for name, value in self.scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                raise PayloadTooLarge(f"the body is over the limit of {limit} bytes")
        parts: list[bytes] = []
        size = 0
        reads = self._limits.reads
        with trio.CancelScope() as cut:
            if reads is not None:
                if reads.error is not None:
                    raise reads.error
                reads.scopes.add(cut)
            try:
                with trio.move_on_after(self._limits.body_timeout):  # cheaper than fail_after, on every request
                    while True:
                        msg = await self.receive()
                        if msg["type"] == "http.disconnect":
                            raise ClientGone("the client went away while sending its body")
                        chunk = msg.get("body", b"")
                        size += len(chunk)
                        if size > limit:
                            raise PayloadTooLarge(f"the body is over the limit of {limit} bytes")
                        parts.append(chunk)
                        if not msg.get("more_body", False):
                            return parts[0] if len(parts) == 1 else b"".join(parts)
            finally:
                if reads is not None:
                    reads.scopes.discard(cut)
        if cut.cancelled_caught and reads is not None and reads.error is not None:
            raise reads.error  # the cortex is stopping, past its grace
        raise RequestTimeout(f"the body did not arrive within {self._limits.body_timeout:g}s")

    async def until_disconnect(self, work: Callable[[], Awaitable[None]]) -> None:
        """Run ``work``; cancel it if the client disconnects first (:mod:`.disconnect_watch`).

        Under the gateway's own server the scope cancelled is the connection's
        (:data:`.http.CANCEL_EXTENSION`): the request's cancellation then ends the
        connection too, where a scope opened here per request would cost more than the
        rest of this method (docs/benchmarks.md, issue 17 item 2)."""
        scope = self.scope
        connection = None
        if "extensions" in scope and (extensions := scope["extensions"]) and CANCEL_EXTENSION in extensions:
            connection = extensions[CANCEL_EXTENSION]
        if connection is not None:
            watched = self._watch.add(self.receive, connection)
            try:
                await work()
            finally:
                self._watch.discard(watched)
            return
        with trio.CancelScope() as scope:
            watched = self._watch.add(self.receive, scope)
            try:
                await work()
            finally:
                self._watch.discard(watched)


Handler = Callable[[Exchange], Awaitable[None]]
ErrorShape = Callable[[BaseException], tuple[int, Headers, bytes]]
"""``(status, headers, body)`` of the error response for an exception, in a surface's own
shape (OpenAI's :func:`.errors.envelope`, Anthropic's, Ollama's)."""


@dataclass(frozen=True, slots=True)
class Route:
    """One route.

    ``metered``: it runs a model, so its handler must go through
    :class:`~.portal.metering.Metering` (a test checks every such route is metered).
    ``keyed``: on a portal with keys, the caller must present one (else 401).
    ``prefix``: ``path`` matches every path under it (``/admin/keys/``).
    ``allow``: for a prefix route, the methods the rest of a path under it takes (empty:
    no such path, a 404), so that a wrong method on a path that exists is a 405 naming
    the right ones (``Allow``) and one on a path that does not is a 404; without it, every
    path under the prefix takes the methods of the prefix's routes.
    ``errors``: how its errors are shaped (None: OpenAI's envelope), before and after the
    caller is authenticated. ``errors_by``: for a route that two APIs share, the shape
    chosen from the request (its headers); None from it falls back to ``errors``.
    """

    method: str
    path: str
    handler: Handler
    metered: bool = False
    keyed: bool = True
    prefix: bool = False
    errors: ErrorShape | None = None
    errors_by: Callable[[Scope], ErrorShape | None] | None = None
    allow: Callable[[str], tuple[str, ...]] | None = None


class Router:
    """Finds the route of a method and path (exact paths first, then prefixes)."""

    def __init__(self, routes: list[Route]) -> None:
        self.routes = list(routes)
        self._exact: dict[str, dict[str, Route]] = {}
        self._prefixes: list[tuple[str, dict[str, Route]]] = []
        for route in routes:
            if route.prefix:
                for prefix, methods in self._prefixes:
                    if prefix == route.path:
                        methods[route.method] = route
                        break
                else:
                    self._prefixes.append((route.path, {route.method: route}))
            else:
                self._exact.setdefault(route.path, {})[route.method] = route

    def find(self, method: str, path: str) -> tuple[Route, str]:
        """``(route, rest of the path)``. Raises NotFound (404) or MethodNotAllowed (405)."""
        methods = self._exact[path] if path in self._exact else None  # (no method call per request)
        rest = ""
        if methods is None:
            for prefix, candidates in self._prefixes:
                if path.startswith(prefix) and len(path) > len(prefix):
                    methods, rest = candidates, path[len(prefix):]
                    break
            else:
                raise NotFound(f"no route {path}")
            allow = next((r.allow for r in methods.values() if r.allow is not None), None)
            if allow is not None:
                allowed = allow(rest)
                if not allowed:
                    raise NotFound(f"no route {path}")
                if method not in allowed:
                    raise MethodNotAllowed(f"{method} is not allowed on {path}", allow=allowed)
        route = methods[method] if method in methods else None
        if route is None:
            raise MethodNotAllowed(f"{method} is not allowed on {path}", allow=tuple(methods))
        return route, rest
