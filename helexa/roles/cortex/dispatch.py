"""Running a request on the targets the orchestrator picks: deadlines, failover, feedback.

:meth:`Dispatcher.generate` is an async context manager yielding a :class:`Generation`
(an async iterator of :class:`TokenChunk` then one :class:`GenerateResult`). It asks its
``pick`` callable (the orchestrator's choice) for a :class:`Target`, starts the request
there and waits for the first event. Before that first event, a neuron that dies
(``NeuronGone(started=False)``) or refuses retryably (``RemoteError(retryable=True)``) is
excluded and ``pick`` is asked again (the orchestrator lifts a neuron's exclusion once the
model is loaded there again, in a new process: :func:`.admission.excluded`); after it,
failures propagate as they are. Leaving the
context early (a client disconnect is a cancellation) leaves the target's own context,
which tells the neuron (or the peer) to stop. Every wait has a deadline from
:class:`~.config.OrchestratorConfig`, and every outcome is fed back to
:class:`~.scheduler.LiveLoad` and the metrics, then to ``on_end`` (the orchestrator admits
the next request waiting for the slot).
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Protocol

import trio
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from helexa import logs, telemetry
from helexa.protocol import EmbedRequest, EmbedResult, GenerateRequest, GenerateResult, TokenChunk

from .errors import ClientGone, GatewayError, ModelNotFound, NoCapacity, UpstreamTimeout, to_gateway_error
from .fleet import CommandTimeout, NeuronGone, RemoteError
from .link_stream import LinkStream
from .metrics import Metrics
from .scheduler import LiveLoad

if TYPE_CHECKING:
    from .config import OrchestratorConfig

log = logging.getLogger(__name__)


class Target(Protocol):
    """Something that runs a generation: a neuron link, or a peer cortex's handle.

    The contract (``tests/cortex/test_target_conformance.py`` runs it against every
    implementation, the test double included): ``generate`` is an async context manager
    that sends the request on entry and yields an async iterator of :class:`TokenChunk`
    then exactly one :class:`GenerateResult`; leaving it before the result stops the
    generation where it runs. ``embed`` answers one :class:`EmbedResult` within
    ``timeout``. Failures are exceptions that :func:`~.errors.to_gateway_error` maps.
    """

    node_id: str

    def generate(self, request: GenerateRequest) -> AbstractAsyncContextManager[AsyncIterator[Any]]: ...

    async def embed(self, request: EmbedRequest, *, timeout: float) -> EmbedResult: ...


Pick = Callable[[frozenset[str]], Awaitable[Target]]
"""``pick(exclude)``: the target for the next attempt, never one in ``exclude``; raises
the :mod:`.errors` tree when there is none."""


class RemoteRouter(Protocol):
    """The mesh federation, seen from the orchestrator."""

    def can_route(self, model_id: str) -> bool:
        """Whether a live peer offers ``model_id`` and the outbound policy allows asking it."""
        ...

    def unavailable(self, model_id: str) -> float | None:
        """The Retry-After for ``model_id`` when no live peer offers it but one did lately
        (a partition): temporarily unavailable, not unknown. None otherwise. Raises
        ``OutboundRefused`` when the peers that offered it lately are all ones the outbound
        policy excludes (refused, as while they offered it)."""
        ...

    def listing(self) -> dict[str, dict[str, Any]]:
        """Models peers offer, each with the fields ``/v1/models`` shows for it."""
        ...

    async def route(self, request: GenerateRequest | EmbedRequest) -> Target | None:
        """A handle to a peer cortex that serves ``request.model_id``, or None when no
        peer does."""
        ...


def model_not_found(model_id: str, router: RemoteRouter | None) -> GatewayError:
    """What a request for a model nobody here or among live peers serves gets: unknown
    (404), unless only peers served it and their offers expired lately (a partition, a peer
    restarting): then temporarily unavailable (503 with Retry-After), which clients retry."""
    retry = router.unavailable(model_id) if router is not None else None
    if retry is None:
        return ModelNotFound(model_id)
    return NoCapacity(f"model {model_id!r} is served by a mesh peer that cannot be reached right now; it is "
                      "temporarily unavailable", retry_after=retry, code="model_unavailable")


def _retryable(exc: BaseException) -> bool:
    if isinstance(exc, NeuronGone):
        return not exc.started
    return isinstance(exc, RemoteError) and exc.retryable


IDLE_SLACK = 1 / 16
"""How much later than ``idle_timeout`` after its last event a stalled stream may be cut, as
a fraction of ``idle_timeout`` (see :class:`Generation`)."""


class Generation:
    """The events of one generation on ``node_id``; iterate it once.

    Every event keeps ``idle``'s deadline at least ``idle_timeout`` ahead: one cancel scope
    for the whole stream instead of one per event (measured: the per-event scope was a
    noticeable share of a short request's cost). The deadline is moved only when an event
    finds it nearer than that, and then :data:`IDLE_SLACK` of ``idle_timeout`` further, so a
    stream that stalls is cut between ``idle_timeout`` and ``idle_timeout`` times
    ``1 + IDLE_SLACK`` after its last event, never sooner; moving a deadline re-files it in
    trio's deadline heap, and doing that per token was a share of each streamed event's
    cost (docs/benchmarks.md, 2026-12-01, branch tok3).
    """

    def __init__(self, node_id: str, first: TokenChunk | GenerateResult, events: AsyncIterator,
                 idle: trio.CancelScope | None, idle_timeout: float, ttft: float, *, keep_text: bool = False
                 ) -> None:
        self.node_id = node_id
        self.result: GenerateResult | None = None
        self.ttft: float | None = ttft
        self.decision: Any = None
        """The orchestrator's :class:`~.scheduler.RoutingDecision` for this request."""
        self.text: list[str] | None = [] if keep_text else None
        """The answer's text as it went by (when asked for: the prefix index records it)."""
        self._pending: TokenChunk | GenerateResult | None = first
        self._events = events
        self._idle = idle
        self._idle_timeout = idle_timeout
        # Where the deadline is now (kept here: reading it back costs a call). No scope when
        # ``first`` is the result: nothing more is read.
        self._idle_at = idle.deadline if idle is not None else math.inf

    def __aiter__(self) -> "Generation":
        return self

    async def __anext__(self) -> TokenChunk | GenerateResult:
        if self._pending is not None:
            event, self._pending = self._pending, None
        else:
            if self.result is not None:
                raise StopAsyncIteration
            event = await self._events.__anext__()
            due = trio.current_time() + self._idle_timeout
            if due > self._idle_at:
                self._idle_at = due + self._idle_timeout * IDLE_SLACK
                self._idle.deadline = self._idle_at
        if isinstance(event, GenerateResult):
            self.result = event
        if self.text is not None and event.text:
            self.text.append(event.text)
        return event


class Dispatcher:
    """Runs requests on picked targets (see the module docstring)."""

    def __init__(self, live: LiveLoad, metrics: Metrics, config: OrchestratorConfig,
                 on_end: Callable[[str, str], None] | None = None) -> None:
        self.live = live
        self.metrics = metrics
        self.config = config
        self.on_end = on_end
        """Called with (node id, model id) each time a request there ended, any way."""

    def generate(self, request: GenerateRequest, pick: Pick, *, endpoint: str = "chat",
                 keep_text: bool = False) -> "Dispatching":
        """Start ``request`` on ``pick``'s target, failing over while nothing has started
        (``keep_text``: the :class:`Generation` keeps the answer's text); ``async with``
        it for the :class:`Generation`.

        Raises what ``pick`` raises, :class:`UpstreamTimeout` when no first event comes in
        time, and the target's errors (``NeuronGone``, ``RemoteError``, the federation's)
        from iteration after the stream started.
        """
        return Dispatching(self, request, pick, endpoint, keep_text)

    async def embed(self, request: EmbedRequest, pick: Pick) -> EmbedResult:
        """Embed on ``pick``'s target, failing over as :meth:`generate` does."""
        exclude: frozenset[str] = frozenset()
        for attempt in range(1, self.config.max_attempts + 1):
            target = await pick(exclude)
            started = trio.current_time()
            self.live.begin(target.node_id, request.model_id, started)
            span = _span("dispatch", request, target.node_id, attempt)
            traced = replace(request, trace=telemetry.traceparent(span)) if span is not None else request
            try:
                result = await target.embed(traced, timeout=self.config.embed_timeout)
            except BaseException as exc:
                self._failed(target.node_id, request.model_id, exc)
                _mark(span, exc)
                if span is not None:
                    span.end()
                if _retryable(exc) and attempt < self.config.max_attempts:
                    exclude = exclude | {target.node_id}
                    continue
                if isinstance(exc, CommandTimeout):
                    raise UpstreamTimeout(str(exc)) from None
                raise
            if span is not None:
                span.end()
            now = trio.current_time()
            self.live.end(target.node_id, request.model_id, now, latency=now - started, ok=True)
            if self.on_end is not None:
                self.on_end(target.node_id, request.model_id)
            self.metrics.request_done(request.model_id, target.node_id, "embeddings", duration=now - started,
                                      ttft=None, prompt_tokens=result.usage.prompt_tokens, completion_tokens=0)
            return result
        raise AssertionError("unreachable")

    def _done(self, gen: Generation, model_id: str, endpoint: str, started: float) -> None:
        now = trio.current_time()
        self.live.end(gen.node_id, model_id, now, latency=gen.ttft, ok=True)
        if self.on_end is not None:
            self.on_end(gen.node_id, model_id)
        usage = gen.result.usage if gen.result is not None else None
        self.metrics.request_done(
            model_id, gen.node_id, endpoint, duration=now - started, ttft=gen.ttft,
            prompt_tokens=usage.prompt_tokens if usage else 0,
            completion_tokens=usage.completion_tokens if usage else 0,
        )

    def _failed(self, node_id: str, model_id: str, exc: BaseException) -> None:
        cancelled = isinstance(exc, (trio.Cancelled, GeneratorExit, ClientGone))
        self.live.end(node_id, model_id, trio.current_time(), latency=None, ok=cancelled)
        if self.on_end is not None:
            self.on_end(node_id, model_id)
        if cancelled:
            code = "cancelled"
        elif isinstance(exc, Exception):
            code = getattr(exc, "code", None) or to_gateway_error(exc).code or "error"
        else:
            code = "error"
        self.metrics.request_failed(model_id, node_id, code)


class Dispatching:
    """:meth:`Dispatcher.generate`'s context. A class rather than ``@asynccontextmanager``:
    it is on every request's path, where each generator-based layer was a measurable share
    (docs/benchmarks.md, 2026-11-30, item 2).

    One cancel scope per attempt holds both of its deadlines: entered once the request is
    sent (inside the target's context, so the two nest), with ``first_token_timeout`` for
    the first event, then moved to ``idle_timeout`` from event to event, and left on exit
    (around the caller's block); when the first event is the result (a non-streamed
    answer) the scope is left at once, as nothing more comes from the neuron. Opening a
    scope costs several times what moving a deadline does (docs/benchmarks.md, issue 17
    item 2), and this was two scopes per request. A non-streamed request on a neuron link
    opens none: its first-token deadline is kept by the link's watch (:meth:`_whole`).
    """

    __slots__ = ("_dispatcher", "_request", "_pick", "_endpoint", "_keep_text", "_context", "_gen", "_scope",
                 "_span", "_fields", "_started")

    def __init__(self, dispatcher: Dispatcher, request: GenerateRequest, pick: Pick, endpoint: str,
                 keep_text: bool) -> None:
        self._dispatcher = dispatcher
        self._request = request
        self._pick = pick
        self._endpoint = endpoint
        self._keep_text = keep_text

    async def __aenter__(self) -> Generation:
        d, request = self._dispatcher, self._request
        config = d.config
        exclude: frozenset[str] = frozenset()
        for attempt in range(1, config.max_attempts + 1):
            target = await self._pick(exclude)
            span = _span("dispatch", request, target.node_id, attempt)
            traced = replace(request, trace=telemetry.traceparent(span)) if span is not None else request
            fields = logs.push(model=request.model_id, neuron=target.node_id)
            try:
                started = trio.current_time()
                d.live.begin(target.node_id, request.model_id, started)
                ctx = target.generate(traced)
                entered = False
                try:
                    events = await ctx.__aenter__()
                    entered = True
                    first, now = await self._first(events, target.node_id)
                except BaseException as exc:
                    if entered:
                        with trio.CancelScope(shield=True):
                            await ctx.__aexit__(type(exc), exc, exc.__traceback__)
                    d._failed(target.node_id, request.model_id, exc)
                    _mark(span, exc)
                    if _retryable(exc) and attempt < config.max_attempts:
                        log.info("request %s not started on %s (%s): trying another neuron",
                                 request.request_id, target.node_id, exc)
                        exclude = exclude | {target.node_id}
                        _end(fields, span)
                        continue
                    raise
            except BaseException:
                _end(fields, span)
                raise
            gen = Generation(target.node_id, first, events, self._scope, config.idle_timeout, now - started,
                             keep_text=self._keep_text)
            self._context, self._gen = ctx, gen
            self._span, self._fields, self._started = span, fields, started
            return gen
        raise AssertionError("unreachable")

    async def _first(self, events: AsyncIterator[Any], node_id: str) -> tuple[TokenChunk | GenerateResult, float]:
        """The attempt's first event, within ``first_token_timeout``, and the time it came;
        on return the scope is entered (``self._scope``) with the idle deadline, else it
        was left (and is None when that event is the result: nothing more comes)."""
        config = self._dispatcher.config
        if type(events) is LinkStream and not self._request.stream:
            return await self._whole(events, config)
        scope = self._scope = trio.CancelScope(deadline=trio.current_time() + config.first_token_timeout)
        scope.__enter__()
        try:
            first = await events.__anext__()
        except BaseException as exc:
            if scope.__exit__(type(exc), exc, exc.__traceback__):  # its own deadline (never an outer cancel)
                raise UpstreamTimeout(f"neuron {node_id} did not start within "
                                      f"{config.first_token_timeout:g}s") from None
            if isinstance(exc, StopAsyncIteration):
                raise RemoteError("empty_stream", "the neuron ended the stream without a result") from None
            raise
        # One clock read for the checks below and the first token's time (each read is
        # three Python calls through trio).
        now = trio.current_time()
        if type(first) is GenerateResult:
            # The whole answer (a non-streamed request's one event): nothing more is read from
            # the neuron, so there is no idle deadline to keep. The scope is left here, not
            # moved to the idle deadline and left on exit (a deadline moved re-files it in
            # trio's deadline heap: docs/benchmarks.md, issue 17 item 2, branch fab5).
            scope.__exit__(None, None, None)
            self._scope = None
            return first, now
        if now >= scope.deadline:  # it passed just as the event came (the scope's only cancel): a fresh scope
            scope.__exit__(None, None, None)
            scope = self._scope = trio.CancelScope()
            scope.__enter__()
        scope.deadline = now + config.idle_timeout
        return first, now

    async def _whole(self, stream: LinkStream, config: OrchestratorConfig) -> tuple[TokenChunk | GenerateResult, float]:
        """:meth:`_first` for a whole answer from a neuron link: its first-token deadline is
        kept by the link's watch (:meth:`.NeuronLink.expire`, every ``heartbeat_interval / 2``
        of the control server), which ends the stream with the same :class:`UpstreamTimeout`,
        rather than by a cancel scope: a scope with a deadline, entered and left, was ~40 of
        the cortex's ~740 Python calls per request (docs/benchmarks.md, issue 17 item 2,
        branch fab5). An answer long enough to come in pieces (past the neuron's
        ``COLLECT_FLUSH_CHARS``) gets the idle deadline's scope from its first piece on."""
        stream.timeout = config.first_token_timeout
        stream.deadline = trio.current_time() + config.first_token_timeout
        try:
            first = await stream.__anext__()
        except StopAsyncIteration:
            raise RemoteError("empty_stream", "the neuron ended the stream without a result") from None
        now = trio.current_time()
        if type(first) is GenerateResult:
            self._scope = None
            return first, now
        stream.deadline = math.inf  # from here on the idle deadline's scope, as for a stream
        scope = self._scope = trio.CancelScope(deadline=now + config.idle_timeout)
        scope.__enter__()
        return first, now

    async def __aexit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        d, gen, idle, span = self._dispatcher, self._gen, self._scope, self._span
        model_id = self._request.model_id
        try:
            if exc is not None:
                d._failed(gen.node_id, model_id, exc)
                _mark(span, exc)
            # Its own Cancelled: the idle deadline passed (None: left at the first event, the result).
            swallowed = idle.__exit__(exc_type, exc, tb) if idle is not None else False
            if exc is not None and not swallowed:
                await self._context.__aexit__(exc_type, exc, tb)
                return False
            await self._context.__aexit__(None, None, None)
            if idle is not None and idle.cancelled_caught:
                raise UpstreamTimeout(f"the stream from neuron {gen.node_id} made no progress "
                                      f"for {d.config.idle_timeout:g}s")
            d._done(gen, model_id, self._endpoint, self._started)
            return bool(swallowed)
        finally:
            _end(self._fields, span)


def _end(fields: Any, span: Span | None) -> None:
    logs.pop(fields)
    if span is not None:
        span.end()


def _span(name: str, request: GenerateRequest | EmbedRequest, node_id: str, attempt: int) -> Span | None:
    """A span for one attempt on one target (None while tracing is off); its
    ``traceparent`` goes to the target in the request frame."""
    if not telemetry.enabled():
        return None
    return telemetry.tracer().start_span(name, kind=SpanKind.CLIENT, attributes={
        "helexa.request_id": request.request_id, "helexa.model": request.model_id, "helexa.neuron": node_id,
        "helexa.attempt": attempt})


def _mark(span: Span | None, exc: BaseException) -> None:
    if span is not None:
        span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
