"""The worker process: one model's backend, run for a neuron over a socket.

Started by :class:`~helexa.runtime.worker.process.WorkerProcess` as
``python -m helexa.runtime.worker --fd N --model ID`` with one end of a socketpair. It runs
its own trio loop with the ordinary backend (:func:`helexa.runtime.create_backend`) inside
and answers the session of :mod:`helexa.protocol.worker`: load, requests by id, cancels,
pings, unload. Whatever the backend does here (hold the interpreter lock through a whole
load, crash in native code, run out of memory) stays in this process.

Frames to the neuron go through one writer (:class:`Outbox`): what queues up while a write
is under way goes out in one write, and text chunks of one request are joined on the way
(:func:`coalesce`), so a backend faster than the pipe costs fewer frames on both sides.
A backend whose engine has a thread of its own (llama.cpp) writes a request's text frames
from that thread instead (:mod:`helexa.runtime.token_tap`), and the trio thread sleeps
until the request ends.

The worker exits after unloading, and when the neuron's end of the socket closes (the
neuron exited or was killed: a worker never outlives its neuron for long, although one
stuck in a native call only notices once the call returns).
"""

from __future__ import annotations

import logging
import math
import os
from contextlib import aclosing, nullcontext, suppress
from typing import Any

import trio

from helexa.protocol import (
    Cancel,
    EmbedRequest,
    GenerateRequest,
    GenerateResult,
    InferenceError,
    ModelConfig,
    ModelStatus,
    Ping,
    Pong,
    ProtocolError,
    TokenChunk,
)
from helexa.protocol.worker import (
    END_OF_REQUEST,
    WorkerLoad,
    WorkerLoaded,
    WorkerLoadFailed,
    WorkerProgress,
    WorkerReady,
    WorkerStarted,
    WorkerStatus,
    WorkerUnload,
    WorkerUnloaded,
    frame,
)
from helexa.transport import ChannelClosed

from .. import start_signal, token_tap
from ..base import Backend, BackendError, embedder, events_of
from ..registry import create_backend
from .pipe import Pipe

log = logging.getLogger(__name__)

BATCH_TICKS = 8
"""Scheduler ticks the writer waits for more text while a fast backend keeps producing it."""

FAST_S = 0.001
"""Text that follows the previous text within this time comes from a backend faster than a
round trip through the pipe: it is joined into fewer frames. Slower text (every real model's
tokens) goes out at once, without a scheduler pass of its own."""

MAX_JOINED_CHARS = 256 * 1024
"""Text chunks are joined up to about this size, so no frame grows without bound while the
neuron is not reading."""

_NOT_LISTENING = nullcontext()

UNLOAD_DRAIN_S = 10.0
"""How long cancelled requests get to hand their slots back before the backend unloads."""


def coalesce(msgs: list[Any]) -> list[Any]:
    """Join the plain text chunks of each request into one, keeping every request's frames
    in order (a chunk's text goes where the first of its pieces was; a request's other
    frames, tool calls and its end, stay after all of its text before them)."""
    out: list[Any] = []
    open_: dict[str, int] = {}
    for m in msgs:
        if type(m) is TokenChunk and not m.tool_calls:
            i = open_.get(m.request_id)
            if i is not None and len(out[i].text) < MAX_JOINED_CHARS:
                prev = out[i]
                out[i] = TokenChunk(m.request_id, prev.text + m.text, prev.tokens + m.tokens,
                                    prompt_tokens=prev.prompt_tokens)
                continue
            open_[m.request_id] = len(out)
            out.append(m)
        else:
            rid = getattr(m, "request_id", None)
            if rid is not None:
                open_.pop(rid, None)
            out.append(m)
    return out


class Outbox:
    """The worker's frames to the neuron.

    A frame goes out at once when nothing is queued before it, and, for text of a request
    already under way, when the neuron has read what was written before and the text did
    not follow other text within :data:`FAST_S`. Otherwise it queues for :meth:`run`, which
    waits until the neuron has read what was written, and while a fast backend keeps
    producing (at most :data:`BATCH_TICKS` ticks), then joins each request's queued text
    into one frame (:func:`coalesce`).
    """

    def __init__(self, pipe: Pipe) -> None:
        self._pipe = pipe
        self._pending: list[Any] = []
        self._wake = trio.Event()
        self._taken = trio.Event()
        self._streaming: set[str] = set()
        self._last_text = -math.inf

    def put(self, msg: Any) -> None:
        """Send ``msg`` after everything put before it (dropped once the neuron is gone:
        the reader then ends the session)."""
        if not self._pending:
            if not self._running_text(msg):
                return self._post(msg)
            now = trio.current_time()
            fast, self._last_text = now - self._last_text < FAST_S, now
            if not fast and self._pipe.flushed:
                return self._post(msg)
        self._pending.append(msg)
        self._wake.set()

    def _post(self, msg: Any) -> None:
        self._track(msg)
        try:
            self._pipe.send(msg)
        except ChannelClosed:
            pass

    async def flush(self) -> None:
        """Return once everything put so far has been written."""
        while self._pending:
            self._taken = trio.Event() if self._taken.is_set() else self._taken
            await self._taken.wait()
        await self._pipe.wait_flushed()

    async def run(self) -> None:
        """Write the queued frames until cancelled."""
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            if not self._pending:
                continue
            await self._pipe.wait_flushed()
            await self._while_producing()
            batch, self._pending = coalesce(self._pending), []
            self._taken.set()
            for m in batch:
                self._track(m)
            try:
                self._pipe.post(b"".join(map(frame, batch)))
            except ChannelClosed:
                return

    def _running_text(self, msg: Any) -> bool:
        return type(msg) is TokenChunk and not msg.tool_calls and msg.request_id in self._streaming

    def _track(self, msg: Any) -> None:
        rid = getattr(msg, "request_id", None)
        if rid is None or type(msg) is WorkerStarted:  # a request's text starts with its first chunk
            return
        if isinstance(msg, END_OF_REQUEST):
            self._streaming.discard(rid)
        else:
            self._streaming.add(rid)

    async def _while_producing(self) -> None:
        idle = 0
        for _ in range(BATCH_TICKS):
            if idle == 2 or not all(self._running_text(m) for m in self._pending):
                return
            ready = len(self._pending)
            await trio.lowlevel.checkpoint()
            idle = idle + 1 if len(self._pending) == ready else 0


class _Frames:
    """A request's :mod:`~helexa.runtime.token_tap`: its chunks written to the neuron from
    the engine's own thread (:meth:`Pipe.post_from_thread`), so that the worker's trio
    thread is not woken per token. They go out before anything the request puts in the
    :class:`Outbox` later (its end comes from the generator once the engine's thread is
    done); frames of other requests waiting in the outbox may be overtaken, which the
    protocol allows (each request's frames keep their own order)."""

    __slots__ = ("_pipe", "_rid")

    def __init__(self, pipe: Pipe, rid: str) -> None:
        self._pipe, self._rid = pipe, rid

    def send(self, chunk: TokenChunk) -> bool:
        try:
            self._pipe.post_from_thread(frame(chunk))
        except ChannelClosed:
            return False
        return True

    def started(self) -> None:
        with suppress(ChannelClosed):
            self._pipe.post_from_thread(frame(WorkerStarted(self._rid)))


class Worker:
    """One worker process's session with its neuron (see the module docstring)."""

    def __init__(self, pipe: Pipe) -> None:
        self._pipe = pipe
        self._out = Outbox(pipe)
        self._backend: Backend | None = None
        self._loading = False
        self._running: dict[str, trio.CancelScope] = {}
        self._idle = trio.Event()
        self._idle.set()
        self._nursery: trio.Nursery | None = None

    async def run(self) -> None:
        """Serve the neuron until it asks to unload or goes away."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._pipe.run)
                nursery.start_soon(self._out.run)
                self._out.put(WorkerReady(os.getpid()))
                await self._read(nursery)
        finally:
            if self._backend is not None:  # the neuron went away: free what we hold
                with trio.CancelScope(shield=True), trio.move_on_after(UNLOAD_DRAIN_S):
                    await self._backend.unload()

    async def _read(self, nursery: trio.Nursery) -> None:
        while True:
            try:
                for msg in await self._pipe.receive_batch():
                    self._dispatch(msg, nursery)
            except ChannelClosed:
                log.info("the neuron closed the connection; exiting")
                nursery.cancel_scope.cancel()
                return
            except ProtocolError as exc:
                log.error("the neuron broke the protocol (%s); exiting", exc)
                nursery.cancel_scope.cancel()
                return

    def _dispatch(self, msg: Any, nursery: trio.Nursery) -> None:
        match msg:
            case Ping(nonce=n):
                self._out.put(Pong(n))
            case GenerateRequest() | EmbedRequest():
                scope = trio.CancelScope()
                if msg.request_id in self._running:
                    self._out.put(InferenceError(msg.request_id, "invalid_request", "request id already in flight"))
                    return
                if not self._running:
                    self._idle = trio.Event()
                self._running[msg.request_id] = scope
                nursery.start_soon(self._serve, msg, scope)
            case Cancel(request_id=rid):
                if (scope := self._running.get(rid)) is not None:
                    scope.cancel()
            case WorkerLoad(config=config):
                nursery.start_soon(self._load, config)
            case WorkerUnload():
                nursery.start_soon(self._unload, nursery)
            case _:
                raise ProtocolError(f"unexpected {type(msg).__name__} from the neuron", code="unexpected")

    # --- lifecycle ------------------------------------------------------------------------

    async def _load(self, config: ModelConfig) -> None:
        if self._backend is not None or self._loading:
            self._out.put(WorkerLoadFailed("load_failed", "this worker already holds a model"))
            return
        self._loading = True
        backend: Backend | None = None

        def progress(stage: str, done: int, total: int | None, unit: str) -> None:
            self._out.put(WorkerProgress(stage, done, total, unit))

        try:
            backend = create_backend(config)
            backend.service_nursery = self._nursery
            backend.status_listener = self._status_changed
            await backend.load(progress)
        except Exception as exc:
            if isinstance(exc, BackendError):
                code, reason = exc.code, str(exc)
            else:
                log.exception("loading %s failed", config.model_id)
                code, reason = "load_failed", f"{type(exc).__name__}: {exc}"
            if backend is not None:
                with trio.CancelScope(shield=True):
                    try:
                        await backend.unload()
                    except Exception:
                        log.exception("cleanup after a failed load of %s failed", config.model_id)
            self._out.put(WorkerLoadFailed(code, reason))
            return
        finally:
            self._loading = False
        self._backend = backend
        workloads = tuple(sorted(backend.workloads, key=lambda w: w.value))
        self._out.put(WorkerLoaded(workloads, backend.memory_bytes(), backend.slots()))

    def _status_changed(self, status: ModelStatus) -> None:
        self._out.put(WorkerStatus(status))

    async def _unload(self, nursery: trio.Nursery) -> None:
        for scope in self._running.values():
            scope.cancel()
        with trio.move_on_after(UNLOAD_DRAIN_S):
            await self._idle.wait()
        backend, self._backend = self._backend, None
        if backend is not None:
            try:
                await backend.unload()
            except Exception:
                log.exception("unloading failed")
        self._out.put(WorkerUnloaded())
        with trio.move_on_after(UNLOAD_DRAIN_S):
            await self._out.flush()
        nursery.cancel_scope.cancel()

    # --- requests -------------------------------------------------------------------------

    async def _serve(self, req: GenerateRequest | EmbedRequest, scope: trio.CancelScope) -> None:
        rid = req.request_id
        ended = False
        put = self._out.put
        # A traced request's neuron measures its queue wait: tell it when the backend starts.
        listening = start_signal.listen(lambda: put(WorkerStarted(rid))) if req.trace else _NOT_LISTENING
        try:
            with scope, listening, token_tap.tap(_Frames(self._pipe, rid)):
                try:
                    backend = self._require()
                    if isinstance(req, EmbedRequest):
                        put(await embedder(backend, req).embed(req))
                        ended = True
                        return
                    async with aclosing(events_of(backend, req)) as it:
                        async for event in it:
                            put(event)
                            if type(event) is GenerateResult:
                                ended = True
                    if not ended:
                        raise BackendError("the backend ended without a result")
                except BackendError as exc:
                    if not ended:
                        ended = True
                        put(InferenceError(rid, exc.code, str(exc), retryable=exc.retryable))
                except Exception as exc:
                    log.exception("request %s failed", rid)
                    if not ended:
                        ended = True
                        put(InferenceError(rid, "internal_error", f"the backend failed: {type(exc).__name__}"))
        finally:
            if not ended:
                put(InferenceError(rid, "cancelled", "the request was cancelled"))
            del self._running[rid]
            if not self._running:
                self._idle.set()

    def _require(self) -> Backend:
        if self._backend is None:
            raise BackendError("no model is loaded in this worker", code="model_not_loaded")
        return self._backend


async def serve(pipe: Pipe) -> None:
    """Run one worker session on ``pipe`` (the entry point's trio main)."""
    try:
        await Worker(pipe).run()
    finally:
        await pipe.aclose()
