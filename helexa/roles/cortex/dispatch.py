"""Running a request on a neuron: pick, cold-load if needed, fail over, feed back.

:meth:`Dispatcher.generate` is an async context manager yielding a :class:`Generation`
(an async iterator of :class:`TokenChunk` then one :class:`GenerateResult`). Before the
first event arrives, a neuron that dies (``NeuronGone(started=False)``) or refuses
retryably (``RemoteError(retryable=True)``) is excluded and the request goes to the next
one; after it, failures propagate as they are. Leaving the context early (a client
disconnect is a cancellation) leaves :meth:`NeuronLink.generate`'s context, which sends
``Cancel`` to the neuron. Every wait has a deadline from :class:`DispatchSettings`.

Federation seam: a :class:`RemoteRouter` (the mesh, wired by the cortex) is asked for
models the local fleet and catalogue do not know, and for catalogued models that no
usable neuron here could ever hold when a peer offers them (:meth:`Dispatcher.routes_remotely`);
it returns a link-shaped handle to a peer, which is then driven exactly like a local
neuron (no failover to local neurons; the router tries peers in turn itself).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, Protocol, TypeVar

import trio
from pydantic import BaseModel, ConfigDict, Field

from helexa.protocol import EmbedRequest, EmbedResult, GenerateRequest, GenerateResult, TokenChunk, WorkloadClass

from .catalogue import Catalogue
from .errors import ClientGone, ModelNotFound, NoCapacity, UpstreamTimeout, to_gateway_error
from .fleet import CommandTimeout, Fleet, NeuronGone, NeuronLink, RemoteError
from .metrics import Metrics
from .provisioner import Provisioner
from .scheduler import Hints, LiveLoad, schedule, snapshot

log = logging.getLogger(__name__)
T = TypeVar("T")


class DispatchSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    first_token_timeout: float = Field(120.0, gt=0)
    """Seconds a neuron may take to produce the first output of a generation."""
    idle_timeout: float = Field(60.0, gt=0)
    """Seconds a generation may go without progress (no output from the neuron, or the
    client not taking it) before it is abandoned."""
    embed_timeout: float = Field(60.0, gt=0)
    route_timeout: float = Field(10.0, gt=0)
    """Seconds the federation may take to find a peer for a model."""
    max_attempts: int = Field(3, ge=1)
    """Neurons tried for one request that has not started."""
    keepalive_interval: float = Field(10.0, gt=0)
    """Seconds between keep-alive callbacks while a request waits for a cold load."""


class RemoteRouter(Protocol):
    """The mesh federation, seen from the gateway."""

    def can_route(self, model_id: str) -> bool:
        """Whether a live peer offers ``model_id`` and the outbound policy allows asking it."""
        ...

    def listing(self) -> dict[str, dict[str, Any]]:
        """Models peers offer, each with the fields ``/v1/models`` shows for it."""
        ...

    async def route(self, request: GenerateRequest | EmbedRequest) -> NeuronLink | None:
        """A handle to a peer cortex that serves ``request.model_id`` (with ``generate`` and
        ``embed`` as on :class:`NeuronLink`), or None when no peer does."""
        ...


_RETRYABLE = (NeuronGone, RemoteError)


def _retryable(exc: Exception) -> bool:
    if isinstance(exc, NeuronGone):
        return not exc.started
    return isinstance(exc, RemoteError) and exc.retryable


class Generation:
    """The events of one generation on ``node_id``; iterate it once.

    Every event pushes ``idle``'s deadline ``idle_timeout`` further: one cancel scope for
    the whole stream instead of one per event (measured: the per-event scope was a
    noticeable share of a short request's cost).
    """

    def __init__(self, node_id: str, first: TokenChunk | GenerateResult, events: AsyncIterator,
                 idle: trio.CancelScope, idle_timeout: float, started: float) -> None:
        self.node_id = node_id
        self.result: GenerateResult | None = None
        self.ttft: float | None = trio.current_time() - started
        self._pending: TokenChunk | GenerateResult | None = first
        self._events = events
        self._idle = idle
        self._idle_timeout = idle_timeout

    def __aiter__(self) -> "Generation":
        return self

    async def __anext__(self) -> TokenChunk | GenerateResult:
        if self._pending is not None:
            event, self._pending = self._pending, None
        else:
            if self.result is not None:
                raise StopAsyncIteration
            event = await self._events.__anext__()
            self._idle.deadline = trio.current_time() + self._idle_timeout
        if isinstance(event, GenerateResult):
            self.result = event
        return event


class Dispatcher:
    """Routes requests onto the fleet (see the module docstring)."""

    def __init__(
        self,
        fleet: Fleet,
        catalogue: Catalogue,
        provisioner: Provisioner,
        live: LiveLoad,
        metrics: Metrics,
        settings: DispatchSettings | None = None,
        remote_router: RemoteRouter | None = None,
    ) -> None:
        self.fleet = fleet
        self.catalogue = catalogue
        self.provisioner = provisioner
        self.live = live
        self.metrics = metrics
        self.settings = settings or DispatchSettings()
        self.remote_router = remote_router

    def served_locally(self, model_id: str) -> bool:
        """Whether the catalogue or a usable neuron knows ``model_id``."""
        return model_id in self.catalogue or any(model_id in link.models for link in self.fleet.usable())

    def routes_remotely(self, model_id: str) -> bool:
        """Whether a request for ``model_id`` goes to the remote router: the model is
        unknown here, or it is catalogued but no usable neuron could hold it and a peer
        offers it."""
        if not self.served_locally(model_id):
            return True
        if self.remote_router is None:
            return False
        usable = self.fleet.usable()
        if any(model_id in link.models for link in usable):
            return False
        entry = self.catalogue.get(model_id)
        if entry is not None and any(entry.is_feasible_on(link.descriptor.hardware) for link in usable):
            return False
        return self.remote_router.can_route(model_id)

    async def remote(self, request: GenerateRequest | EmbedRequest) -> NeuronLink:
        """A peer's handle for a model unknown here. Raises :class:`ModelNotFound`."""
        if self.remote_router is None:
            raise ModelNotFound(request.model_id)
        with trio.move_on_after(self.settings.route_timeout):
            handle = await self.remote_router.route(request)
            if handle is not None:
                return handle
        raise ModelNotFound(request.model_id)

    async def _pick(
        self, model_id: str, workload: WorkloadClass, exclude: set[str],
        on_wait: Callable[[], Awaitable[None]] | None,
    ) -> NeuronLink:
        state = snapshot(self.fleet.usable(), self.live, model_id=model_id)
        decision = schedule(workload, Hints(model_id, frozenset(exclude)), state)
        for node_id in decision.targets:
            if (link := self.fleet.get(node_id)) is not None:
                return link
        if model_id not in self.catalogue:
            if exclude:
                raise NoCapacity(f"no other neuron serves model {model_id!r}")
            raise ModelNotFound(model_id)
        waited = trio.current_time()
        node_id = await _with_ticks(self.provisioner.ensure_loaded(model_id), on_wait, self.settings.keepalive_interval)
        self.metrics.queued(model_id, trio.current_time() - waited)
        link = self.fleet.get(node_id)
        if link is None or node_id in exclude:
            raise NoCapacity(f"no usable neuron for model {model_id!r} right now")
        return link

    @asynccontextmanager
    async def generate(
        self, request: GenerateRequest, workload: WorkloadClass, *, endpoint: str = "chat",
        on_wait: Callable[[], Awaitable[None]] | None = None, link: NeuronLink | None = None,
    ) -> AsyncIterator[Generation]:
        """Start ``request`` on the best neuron (or on ``link``, a federation handle).

        ``on_wait`` is awaited every ``keepalive_interval`` while a cold load holds the
        request. Raises the :mod:`.errors` tree for routing failures and the fleet's errors
        (``NeuronGone``, ``RemoteError``) from iteration after the stream started.
        """
        exclude: set[str] = set()
        for attempt in range(1, self.settings.max_attempts + 1):
            target = link or await self._pick(request.model_id, workload, exclude, on_wait)
            started = trio.current_time()
            self.live.begin(target.node_id, request.model_id, started)
            ctx = target.generate(request)
            entered = False
            try:
                events = await ctx.__aenter__()
                entered = True
                first = None
                try:
                    with trio.move_on_after(self.settings.first_token_timeout):  # cheaper than fail_after
                        first = await events.__anext__()
                except StopAsyncIteration:
                    raise RemoteError("empty_stream", "the neuron ended the stream without a result") from None
                if first is None:
                    raise UpstreamTimeout(f"neuron {target.node_id} did not start within "
                                          f"{self.settings.first_token_timeout:g}s")
            except BaseException as exc:
                if entered:
                    with trio.CancelScope(shield=True):
                        await ctx.__aexit__(type(exc), exc, exc.__traceback__)
                self._failed(target.node_id, request.model_id, started, exc)
                if isinstance(exc, Exception) and _retryable(exc) and attempt < self.settings.max_attempts \
                        and link is None:
                    log.info("request %s not started on %s (%s): trying another neuron",
                             request.request_id, target.node_id, exc)
                    exclude.add(target.node_id)
                    continue
                raise
            idle_timeout = self.settings.idle_timeout
            idle = trio.CancelScope(deadline=trio.current_time() + idle_timeout)
            gen = Generation(target.node_id, first, events, idle, idle_timeout, started)
            try:
                with idle:
                    try:
                        yield gen
                    except BaseException as exc:
                        self._failed(target.node_id, request.model_id, started, exc)
                        raise
            except BaseException as exc:
                await ctx.__aexit__(type(exc), exc, exc.__traceback__)
                raise
            await ctx.__aexit__(None, None, None)
            if idle.cancelled_caught:
                raise UpstreamTimeout(f"the stream from neuron {target.node_id} made no progress "
                                      f"for {idle_timeout:g}s")
            self._done(gen, request.model_id, endpoint, started)
            return

    async def embed(self, request: EmbedRequest, *, link: NeuronLink | None = None) -> EmbedResult:
        """Embed on the best neuron, failing over as :meth:`generate` does."""
        exclude: set[str] = set()
        for attempt in range(1, self.settings.max_attempts + 1):
            target = link or await self._pick(request.model_id, WorkloadClass.EMBEDDING, exclude, None)
            started = trio.current_time()
            self.live.begin(target.node_id, request.model_id, started)
            try:
                result = await target.embed(request, timeout=self.settings.embed_timeout)
            except BaseException as exc:
                self._failed(target.node_id, request.model_id, started, exc)
                if isinstance(exc, Exception) and _retryable(exc) and attempt < self.settings.max_attempts \
                        and link is None:
                    exclude.add(target.node_id)
                    continue
                if isinstance(exc, CommandTimeout):
                    raise UpstreamTimeout(str(exc)) from None
                raise
            now = trio.current_time()
            self.live.end(target.node_id, request.model_id, now, latency=now - started, ok=True)
            self.metrics.request_done(request.model_id, target.node_id, "embeddings", duration=now - started,
                                      ttft=None, prompt_tokens=result.usage.prompt_tokens, completion_tokens=0)
            return result
        raise AssertionError("unreachable")

    def _done(self, gen: Generation, model_id: str, endpoint: str, started: float) -> None:
        now = trio.current_time()
        self.live.end(gen.node_id, model_id, now, latency=gen.ttft, ok=True)
        usage = gen.result.usage if gen.result is not None else None
        self.metrics.request_done(
            model_id, gen.node_id, endpoint, duration=now - started, ttft=gen.ttft,
            prompt_tokens=usage.prompt_tokens if usage else 0,
            completion_tokens=usage.completion_tokens if usage else 0,
        )

    def _failed(self, node_id: str, model_id: str, started: float, exc: BaseException) -> None:
        cancelled = isinstance(exc, (trio.Cancelled, GeneratorExit, ClientGone))
        self.live.end(node_id, model_id, trio.current_time(), latency=None, ok=cancelled)
        if cancelled:
            code = "cancelled"
        elif isinstance(exc, Exception):
            code = getattr(exc, "code", None) or to_gateway_error(exc).code or "error"
        else:
            code = "error"
        self.metrics.request_failed(model_id, node_id, code)


async def _with_ticks(awaitable: Awaitable[T], on_tick: Callable[[], Awaitable[None]] | None,
                      interval: float) -> T:
    """Await ``awaitable``, calling ``on_tick`` every ``interval`` seconds meanwhile."""
    if on_tick is None:
        return await awaitable
    result: list[T] = []

    async def ticker() -> None:
        while True:
            await trio.sleep(interval)
            await on_tick()

    error: list[Exception] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(ticker)
        try:
            result.append(await awaitable)
        except Exception as exc:  # re-raised bare below, not wrapped in an ExceptionGroup
            error.append(exc)
        nursery.cancel_scope.cancel()
    if error:
        raise error[0]
    return result[0]
