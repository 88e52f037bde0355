"""The OpenAI-compatible HTTP API of the cortex: a raw ASGI app on trio.

Endpoints::

    GET  /v1/models             catalogue entries feasible on a connected neuron, plus
                                models loaded anywhere (OpenAI fields + loaded,
                                feasible_on, locations, federated: false), plus models
                                only peers offer (federated: true, operators, peers)
    POST /v1/chat/completions   streaming (SSE) or not
    POST /v1/completions        streaming (SSE) or not
    POST /v1/embeddings         encoding_format float or base64
    GET  /metrics               Prometheus
    GET  /admin/fleet           Fleet.snapshot() as JSON (read by ``helexa status``)
    GET  /health                200 while serving

The gateway parses a request, asks the :class:`~.orchestrator.Orchestrator` to run it,
and streams the answer; it decides nothing about where a request runs. It is a plain ASGI
callable rather than a Quart app (measured: Quart's request cycle cost as much as the rest
of the hot path; figures in ``docs/benchmarks.md``), served by :mod:`.http` (a sans-IO
HTTP/1.1 connection in a trio shell) by default and by hypercorn on request
(``gateway.server``).

A client that disconnects cancels its request: each inference request runs in its own
cancel scope, which :class:`.disconnect_watch.DisconnectWatch` cancels when the client
leaves, and the cancellation leaves the neuron link's context, which sends ``Cancel``. A
write to a client that is gone ends the request the same way. Errors become OpenAI's
envelope in :mod:`.errors` only; a stream that fails after it began ends with an error
event (:mod:`.sse`).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import trio

from helexa.config import split_socket
from helexa.protocol import GenerateResult, TokenChunk

from . import openai_api as api
from . import sse
from .disconnect_watch import DisconnectWatch
from .errors import BadRequest, ClientGone, Forbidden, GatewayError, MethodNotAllowed, NotFound, PayloadTooLarge, envelope
from .http import HttpServer
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .orchestrator import Orchestrator, WaitStatus
from .prefix import session_of
from .shutdown import InFlight

if TYPE_CHECKING:
    from .config import CortexConfig

log = logging.getLogger(__name__)

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

_JSON = [(b"content-type", b"application/json")]
_SSE = [(b"content-type", sse.CONTENT_TYPE), (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]


def server_error_body(status: int, message: str) -> tuple[bytes, bytes]:
    """What the HTTP server says itself (malformed HTTP, a failed app), as OpenAI's envelope."""
    _, headers, body = envelope(BadRequest(message) if status < 500 else GatewayError(message))
    return dict(headers)[b"content-type"], body


class _Responder:
    """One response: remembers whether the headers went out (then errors go in-band)."""

    __slots__ = ("send", "started", "headers")

    def __init__(self, send: Send, headers: list[tuple[bytes, bytes]]) -> None:
        self.send = send
        self.started = False
        self.headers = headers

    async def _send(self, message: dict[str, Any]) -> None:
        try:
            await self.send(message)
        except OSError as exc:  # ASGI servers raise an OSError once the client is gone
            raise ClientGone(str(exc)) from None

    async def start(self, status: int = 200, headers: list[tuple[bytes, bytes]] = _SSE) -> None:
        if not self.started:
            self.started = True
            await self._send({"type": "http.response.start", "status": status, "headers": headers + self.headers})

    async def body(self, data: bytes, more: bool = True) -> None:
        await self._send({"type": "http.response.body", "body": data, "more_body": more})

    async def full(self, status: int, headers: list[tuple[bytes, bytes]], data: bytes) -> None:
        self.started = True
        await self._send({"type": "http.response.start", "status": status,
                          "headers": [*headers, (b"content-length", str(len(data)).encode()), *self.headers]})
        await self._send({"type": "http.response.body", "body": data})

    async def json(self, obj: Any, status: int = 200) -> None:
        await self.full(status, _JSON, json.dumps(obj).encode())


class Gateway:
    """The HTTP API over an orchestrator. Also the ASGI app (``await gateway(scope, receive, send)``).

    Args:
        config: the cortex's config (``gateway_socket``, ``shutdown_grace``, ``[gateway]``).
        orchestrator: decides where requests run and runs them (its :meth:`~.Orchestrator.run`
            must be running too).
    """

    def __init__(self, config: CortexConfig, orchestrator: Orchestrator) -> None:
        self.config = config.gateway
        self.host, self.port = split_socket(config.gateway_socket)
        self.shutdown_grace = config.shutdown_grace
        self.orchestrator = orchestrator
        self.fleet = orchestrator.fleet
        self.metrics = orchestrator.metrics
        self._created = int(time.time())
        self._stop = trio.Event()
        self._watch = DisconnectWatch()
        self._server: HttpServer | None = None
        self.in_flight = InFlight()
        """HTTP requests being handled right now (a drain waits for none)."""
        self._routes: dict[str, tuple[str, Callable[[Scope, Receive, _Responder], Awaitable[None]]]] = {
            "/v1/chat/completions": ("POST", self._chat),
            "/v1/completions": ("POST", self._completions),
            "/v1/embeddings": ("POST", self._embeddings),
            "/v1/models": ("GET", self._models),
            "/metrics": ("GET", self._metrics),
            "/admin/fleet": ("GET", self._fleet),
            "/health": ("GET", self._health),
        }

    # --- serving -------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until :meth:`stop`; reports the bound URLs (``["http://127.0.0.1:8080"]``).

        Stopping lets in-flight requests finish for ``shutdown_grace`` seconds.
        """
        c = self.config
        async with trio.open_nursery() as nursery:
            async def http(task_status: trio.TaskStatus[list[str]]) -> None:
                if c.server == "hypercorn":
                    await self._hypercorn(task_status)
                else:
                    self._server = HttpServer(self, host=self.host, port=self.port,
                                              keep_alive_timeout=c.keep_alive_timeout,
                                              keep_alive_max_requests=c.keep_alive_max_requests,
                                              read_timeout=c.body_timeout, send_timeout=c.send_timeout,
                                              shutdown_grace=self.shutdown_grace, error_body=server_error_body)
                    if self._stop.is_set():
                        self._server.stop()
                    await self._server.run(task_status=task_status)
                # The server returns once its graceful shutdown is over: stop the watch too.
                nursery.cancel_scope.cancel()

            await nursery.start(self._watch.run)
            binds = await nursery.start(http)
            log.info("gateway listening on %s", ", ".join(binds))
            task_status.started(binds)

    def stop(self) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.stop()

    async def _hypercorn(self, task_status: trio.TaskStatus[list[str]]) -> None:
        import hypercorn.config
        import hypercorn.trio

        cfg = hypercorn.config.Config()
        cfg.bind = [f"{self.host}:{self.port}"]
        cfg.keep_alive_timeout = self.config.keep_alive_timeout
        cfg.keep_alive_max_requests = self.config.keep_alive_max_requests
        cfg.graceful_timeout = self.shutdown_grace
        cfg.accesslog = None
        cfg.errorlog = logging.getLogger("helexa.gateway.http")
        await hypercorn.trio.serve(self, cfg, shutdown_trigger=self._stop.wait, task_status=task_status, mode="asgi")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif msg["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        request_id = uuid.uuid4().hex
        out = _Responder(send, [(b"x-request-id", request_id.encode())])
        scope["helexa.request_id"] = request_id
        self.in_flight.enter()
        try:
            route = self._routes.get(scope["path"])
            if route is None:
                raise NotFound(f"no route {scope['path']}")
            method, handler = route
            if scope["method"] != method:
                raise MethodNotAllowed(f"{scope['method']} is not allowed on {scope['path']}")
            await handler(scope, receive, out)
        except ClientGone:
            pass
        except Exception as exc:
            if out.started:
                log.warning("request %s failed after its response began: %s", request_id, exc)
                return
            status, headers, body = envelope(exc)
            await out.full(status, headers, body)
        finally:
            self.in_flight.exit()

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes:
        limit = self.config.max_body_bytes
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                raise PayloadTooLarge(f"the body is over the limit of {limit} bytes")
        parts: list[bytes] = []
        size = 0
        with trio.move_on_after(self.config.body_timeout):  # cheaper than fail_after, on every request
            while True:
                msg = await receive()
                if msg["type"] == "http.disconnect":
                    raise ClientGone("the client went away while sending its body")
                chunk = msg.get("body", b"")
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLarge(f"the body is over the limit of {limit} bytes")
                parts.append(chunk)
                if not msg.get("more_body", False):
                    return parts[0] if len(parts) == 1 else b"".join(parts)
        raise BadRequest(f"the body did not arrive within {self.config.body_timeout:g}s")

    async def _until_disconnect(self, receive: Receive, work: Callable[[], Awaitable[None]]) -> None:
        """Run ``work``; cancel it if the client disconnects first (:mod:`.disconnect_watch`)."""
        with trio.CancelScope() as scope:
            watched = self._watch.add(receive, scope)
            try:
                await work()
            finally:
                self._watch.discard(watched)

    # --- inference -----------------------------------------------------------------------

    async def _chat(self, scope: Scope, receive: Receive, out: _Responder) -> None:
        await self._generate(scope, receive, out, api.ChatCompletionRequest, "chat", "chatcmpl-")

    async def _completions(self, scope: Scope, receive: Receive, out: _Responder) -> None:
        await self._generate(scope, receive, out, api.CompletionRequest, "completions", "cmpl-")

    async def _generate(self, scope: Scope, receive: Receive, out: _Responder, model: type,
                        endpoint: str, id_prefix: str) -> None:
        body = api.parse(model, await self._read_body(scope, receive))
        request = api.to_generate_request(body, scope["helexa.request_id"])
        entry = self.orchestrator.catalogue.get(request.model_id)
        max_tokens = request.sampling.max_tokens
        if entry is not None and entry.max_output and max_tokens and max_tokens > entry.max_output:
            raise BadRequest(f"max_tokens {max_tokens} is over model {entry.id!r}'s limit of "
                             f"{entry.max_output}", param="max_tokens")
        response_id = id_prefix + request.request_id

        async def keepalive(status: WaitStatus) -> None:
            # The first tick of a long wait commits to a 200 stream; each tick says what it
            # waits for (an SSE comment: clients ignore it, people read it).
            await out.start()
            await out.body(sse.comment(status.describe()))

        async def stream() -> None:
            encoder = sse.StreamEncoder(request, response_id, include_usage=body.include_usage)
            try:
                async with self.orchestrator.generate(request, endpoint=endpoint, on_wait=keepalive,
                                                      session=session_of(scope["headers"], body)) as gen:
                    await out.start()
                    head = encoder.start()
                    async for event in gen:
                        frame = encoder.chunk(event) if isinstance(event, TokenChunk) else encoder.finish(event)
                        if head:
                            frame, head = head + frame, b""
                        if frame:
                            await out.body(frame)
            except Exception as exc:
                if not out.started:
                    raise
                await out.body(sse.error_event(exc))
            await out.body(b"", more=False)

        async def complete() -> None:
            parts: list[str] = []
            tool_calls: list[Any] = []
            result: GenerateResult | None = None
            async with self.orchestrator.generate(request, endpoint=endpoint,
                                                  session=session_of(scope["headers"], body)) as gen:
                async for event in gen:
                    if isinstance(event, GenerateResult):
                        result = event
                    parts.append(event.text)
                    tool_calls.extend(event.tool_calls or ())
            assert result is not None
            await out.json(api.completion_response(request, response_id, "".join(parts), result, tool_calls or None))

        await self._until_disconnect(receive, stream if request.stream else complete)

    async def _embeddings(self, scope: Scope, receive: Receive, out: _Responder) -> None:
        body = api.parse(api.EmbeddingRequest, await self._read_body(scope, receive))
        request = api.to_embed_request(body, scope["helexa.request_id"])

        async def work() -> None:
            result = await self.orchestrator.embed(request)
            await out.json(api.embedding_response(request.model_id, result, body.encoding_format))

        await self._until_disconnect(receive, work)

    # --- reads ---------------------------------------------------------------------------

    def models(self) -> list[dict[str, Any]]:
        """The ``/v1/models`` entries: the orchestrator's listing in OpenAI's shape."""
        return [{**m, "object": "model", "created": self._created, "owned_by": m["owned_by"] or self.config.owned_by}
                for m in self.orchestrator.models()]

    async def _models(self, scope: Scope, receive: Receive, out: _Responder) -> None:
        await out.json({"object": "list", "data": self.models()})

    async def _metrics(self, scope: Scope, receive: Receive, out: _Responder) -> None:
        await out.full(200, [(b"content-type", METRICS_CONTENT_TYPE.encode())], self.metrics.render())

    async def _fleet(self, scope: Scope, receive: Receive, out: _Responder) -> None:
        client = (scope.get("client") or ("", 0))[0]
        if client not in self.config.admin_clients:
            raise Forbidden(f"the admin API is not served to {client or 'this client'} (see gateway.admin_clients)")
        await out.json(self.fleet.snapshot())

    async def _health(self, scope: Scope, receive: Receive, out: _Responder) -> None:
        await out.json({"status": "ok", "neurons": len(self.fleet.usable())})
