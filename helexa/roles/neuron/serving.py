"""The requests a neuron runs for its cortex: generations and embeddings, by request id.

Each request runs in a task and cancel scope of its own while it runs (a :class:`Cancel`
from the cortex, the connection dropping, the neuron's drain or its model's unload stops
it). In the neuron's services nursery the tasks are kept between requests: a request is
handed to a task waiting for one (``trio.lowlevel.reschedule``), which runs it in the
scope it runs its requests in, and makes a new scope only after one was cancelled.
Spawning a task and entering and leaving a scope per request were 41 of the neuron's
Python calls per request (``docs/benchmarks.md``, issue 17 item 2, branch fab6). A generation's
events go back through :mod:`.relay`; a failure goes back as one :class:`InferenceError`,
retryable elsewhere only while nothing of the answer has been sent.

A request stopped in any of those ways, of a model run in this process (not in a worker,
which kills its own wedged engine), that has not ended within the model's
``cancel_grace`` marks the model failed (:meth:`.ModelRegistry.wedged`). Requests and
these watches run in a nursery that outlives the connection (:attr:`Serving.nursery`, the
neuron's services'), so that neither a dropped link (the neuron redials at once) nor a
drain waits on an engine that never returns.
"""

from __future__ import annotations

import logging
from contextlib import aclosing, nullcontext

import outcome
import trio
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from helexa import logs, telemetry
from helexa.protocol import EmbedRequest, GenerateRequest, InferenceError
from helexa.runtime import Backend, BackendError, embedder, events_of, start_signal
from helexa.runtime.base import DEFAULT_CANCEL_GRACE, cancel_grace
from helexa.transport import ChannelClosed

from .connection import Connection
from .queue_wait import QueueWait
from .registry import ModelRegistry
from .relay import collect, relay

log = logging.getLogger(__name__)

_NOT_LISTENING = nullcontext()
_MAX_IDLE_WORKERS = 64  # tasks kept waiting for a request, at most (more end after theirs)


class _Job:
    """One request while it is in flight: what :meth:`Serving.cancel` reaches it by."""

    __slots__ = ("req", "cancelled", "scope")

    def __init__(self, req: GenerateRequest | EmbedRequest) -> None:
        self.req = req
        self.cancelled = False
        self.scope: trio.CancelScope | None = None
        """The scope of the task that runs it, while it runs."""

    def cancel(self) -> None:
        self.cancelled = True
        if self.scope is not None:
            self.scope.cancel()


class Serving:
    """Runs requests on the models of ``registry``; answers go through ``connection``."""

    def __init__(self, registry: ModelRegistry, connection: Connection) -> None:
        self._registry = registry
        self._connection = connection
        self._running: dict[str, _Job] = {}
        self._held: dict[str, Backend] = {}  # the backend each running request holds
        self._ended: dict[str, trio.Event] = {}  # set when a stopped request ends (only those are watched)
        self._judged: dict[str, trio.Event] = {}  # set when a watch is over: the request ended, or was judged
        self.nursery: trio.Nursery | None = None
        """Where requests and their watches run, when set: a nursery that outlives the
        connection (the neuron's services'). Otherwise the connection's, given to :meth:`start`."""
        self._idle = trio.Event()
        self._idle.set()
        self._workers: list[trio.lowlevel.Task] = []  # tasks in _workers_in waiting for a request
        self._workers_in: trio.Nursery | None = None
        self.accepting = True
        """False once :meth:`stop_accepting` was called: new requests are refused."""

    @property
    def in_flight(self) -> int:
        return len(self._running)

    def start(self, req: GenerateRequest | EmbedRequest, nursery: trio.Nursery) -> None:
        """Run ``req`` in ``nursery`` (the connection's), or refuse it as retryable when
        no longer accepting. The request counts as in flight from this call on."""
        if not self.accepting:
            self._connection.post(
                InferenceError(req.request_id, "draining", "this neuron is shutting down", retryable=True)
            )
            return
        job = _Job(req)
        if not self._running:
            self._idle = trio.Event()
        self._running[req.request_id] = job
        if self._workers and self.nursery is self._workers_in:
            trio.lowlevel.reschedule(self._workers.pop(), outcome.Value(job))
        elif self.nursery is not None:
            self._workers_in = self.nursery
            self.nursery.start_soon(self._work, job, True)
        else:
            nursery.start_soon(self._work, job, False)

    def cancel(self, request_id: str, nursery: trio.Nursery | None = None, *, how: str = "its cancel") -> None:
        """Stop a running request (nothing if it already ended). A request of a model run in
        this process that has not ended within its ``cancel_grace`` of this call marks the
        model failed (:meth:`.ModelRegistry.wedged`; ``how`` says what stopped it); a
        worker's backend kills its wedged worker itself. The watch runs in :attr:`nursery`,
        else in ``nursery``; with neither, none."""
        if (job := self._running.get(request_id)) is None:
            return
        job.cancel()
        backend = self._held.get(request_id)
        watch_in = self.nursery or nursery
        if watch_in is not None and backend is not None and not backend.kills_wedged and request_id not in self._ended:
            ended = self._ended[request_id] = trio.Event()
            judged = self._judged[request_id] = trio.Event()
            watch_in.start_soon(self._watch, request_id, backend, ended, judged, how)

    async def _watch(self, rid: str, backend: Backend, ended: trio.Event, judged: trio.Event, how: str) -> None:
        try:
            try:
                grace = cancel_grace(backend.config)
            except BackendError:  # refused when the model loaded; a backend made otherwise (a test's) gets the default
                grace = DEFAULT_CANCEL_GRACE
            with trio.move_on_after(grace):
                await ended.wait()
                return
            self._registry.wedged(backend.config.model_id, backend, rid, grace, how=how)
        finally:
            self._judged.pop(rid, None)
            judged.set()

    def cancel_all(self, nursery: trio.Nursery | None = None, *, how: str = "the neuron's drain stopping it") -> None:
        """Stop every running request, each watched as :meth:`cancel` does."""
        for rid in list(self._running):
            self.cancel(rid, nursery, how=how)

    async def cut(self, model_id: str, how: str) -> None:
        """Stop the requests running on ``model_id`` (its unload's drain is over), tell the
        cortex each was cut (not retryable: part of it may have been sent), and return once
        each has ended or been judged wedged (within its ``cancel_grace``)."""
        rids = [rid for rid, backend in self._held.items() if backend.config.model_id == model_id]
        for rid in rids:
            if rid in self._running and not self._running[rid].cancelled:
                self._connection.post(InferenceError(rid, "model_not_loaded",
                                                     f"model {model_id!r} was unloaded under this request"))
            self.cancel(rid, how=how)
        for rid in rids:
            if (judged := self._judged.get(rid)) is not None:
                await judged.wait()

    def stop_accepting(self) -> None:
        """Refuse every request from now on (as retryable, so the cortex sends it elsewhere)."""
        self.accepting = False

    async def wait_idle(self) -> None:
        """Return once no request is in flight."""
        await self._idle.wait()

    async def _work(self, job: _Job | None, keep: bool) -> None:
        """Run ``job``, then (``keep``: a task of the services nursery) each request handed
        to this task, while no more than ``_MAX_IDLE_WORKERS`` others wait."""
        while job is not None:
            with trio.CancelScope() as scope:
                while job is not None:
                    job.scope = scope
                    if job.cancelled:
                        scope.cancel()
                    running, job = job, None
                    await self._run(running)
                    if scope.cancel_called:
                        break  # this scope is spent: the next request gets a new one
                    job = await self._next_job(keep)
            if scope.cancel_called:
                job = await self._next_job(keep)

    async def _next_job(self, keep: bool) -> _Job | None:
        """The next request handed to this task (:meth:`start`), or None: it is not kept."""
        if not keep or len(self._workers) >= _MAX_IDLE_WORKERS or self.nursery is not self._workers_in:
            return None
        task = trio.lowlevel.current_task()
        self._workers.append(task)

        def abort(_: object) -> trio.lowlevel.Abort:
            self._workers.remove(task)
            return trio.lowlevel.Abort.SUCCEEDED

        return await trio.lowlevel.wait_task_rescheduled(abort)

    async def _run(self, job: _Job) -> None:
        req = job.req
        # push/pop rather than logs.bound: a generator-based context per request was a
        # measurable share of the neuron's CPU per request.
        fields = logs.push(request_id=req.request_id, model=req.model_id)
        try:
            if not telemetry.enabled():
                await self._run_traced(req, job, None)
                return
            kind = "embed" if isinstance(req, EmbedRequest) else "generate"
            span = telemetry.tracer().start_span(
                f"neuron.{kind}", context=telemetry.parent_context(req.trace), kind=SpanKind.SERVER,
                attributes={"helexa.request_id": req.request_id, "helexa.model": req.model_id})
            with trace.use_span(span, end_on_exit=True):
                await self._run_traced(req, job, span)
        finally:
            logs.pop(fields)

    async def _run_traced(self, req: GenerateRequest | EmbedRequest, job: _Job, span: trace.Span | None) -> None:
        rid = req.request_id
        started: list[bool] = []

        def first() -> None:
            started.append(True)
            if span is not None:
                span.add_event("first_output")

        try:
            try:
                await self._answer(req, on_first=first, traced=span is not None)
            except BackendError as exc:
                if span is not None:
                    span.set_status(Status(StatusCode.ERROR, f"{exc.code}: {exc}"))
                await self._connection.try_send(
                    InferenceError(rid, exc.code, str(exc), retryable=exc.retryable and not started)
                )
            except (ChannelClosed, trio.TooSlowError):
                pass
            except Exception as exc:
                log.exception("request %s failed", rid)
                await self._connection.try_send(
                    InferenceError(rid, "internal_error", f"the neuron failed: {type(exc).__name__}")
                )
        finally:
            job.scope = None
            if (ended := self._ended.pop(rid, None)) is not None:
                ended.set()
            if self._running.get(rid) is job:
                del self._running[rid]
            if not self._running:
                self._idle.set()

    async def _answer(self, req: GenerateRequest | EmbedRequest, *, on_first, traced: bool) -> None:
        send = self._connection.send
        busy = self._registry.in_flight_of(req.model_id) if traced else 0
        backend = self._held[req.request_id] = self._registry.acquire(req.model_id)
        wait: QueueWait | None = None
        listening = _NOT_LISTENING
        if traced:
            wait = QueueWait(request_id=req.request_id, model_id=req.model_id, busy=busy, slots=backend.slots())
            listening = start_signal.listen(lambda: wait.end("backend_start"))
            first_output = on_first

            def on_first() -> None:
                wait.end("first_output")
                first_output()
        try:
            with listening:
                if isinstance(req, EmbedRequest):
                    result = await embedder(backend, req).embed(req)
                    if wait is not None:
                        wait.end("result")
                    await send(result)
                    return
                async with aclosing(events_of(backend, req)) as it:
                    if req.stream:
                        await relay(it, send, on_first=on_first)
                    else:
                        await collect(it, send, on_first=on_first)
            if wait is not None:
                wait.end("result")
        finally:
            if wait is not None:
                wait.end("failed")  # nothing when it ended before
            self._registry.release(req.model_id)
            self._held.pop(req.request_id, None)
