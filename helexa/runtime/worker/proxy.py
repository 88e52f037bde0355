"""The neuron's side of a worker process: a :class:`Backend` whose model runs in a child.

:class:`WorkerBackend` implements every capability interface, so the neuron's registry,
serving and relay code use it as they use an in-process backend. :meth:`~WorkerBackend.load`
starts the worker (:class:`~.process.WorkerProcess`, which supervises it) and the ordinary
backend for the config loads there. This module routes the requests: each crosses the
socket by request id (:mod:`helexa.protocol.worker`), its frames come back into its own
queue, and leaving a request early cancels it in the worker.

What the process boundary buys:

* A load never blocks the neuron's event loop, whatever the engine does with the
  interpreter lock, so a loading neuron heartbeats like any other.
* A worker that dies (a segfault, an out-of-memory kill, ``kill -9``, a missed ping
  deadline) fails only its own model's requests, with :class:`BackendCrashed`
  (``backend_crashed``; retryable elsewhere when nothing of the answer was sent), and the
  backend reports the model ``FAILED`` with the reason through ``status_listener``; a new
  :class:`WorkerBackend` reloads it.
* A request cancelled (its caller left, or its deadline passed) that the worker has not
  ended within ``cancel_grace`` means its engine is wedged (a step it cannot cancel never
  returns, and the slot never comes back): the worker is killed, which is then a crash as
  above, so one request cannot take the model down for good.
* Unloading ends the process, so all of its memory goes back to the system.

Resource handling: the worker's supervision runs in ``service_nursery`` (required);
:meth:`~WorkerBackend.unload` stops it and reaps the process, and if that nursery is
cancelled first the process is killed on the way out.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import trio

from helexa import telemetry
from helexa.protocol import (
    Cancel,
    EmbedRequest,
    EmbedResult,
    GenerateRequest,
    GenerateResult,
    InferenceError,
    ModelConfig,
    ModelState,
    ModelStatus,
    TokenChunk,
    Workload,
)
from helexa.protocol.worker import WorkerStarted
from helexa.transport import ChannelClosed

from .. import start_signal
from ..base import (
    Backend,
    BackendCrashed,
    BackendError,
    ChatInference,
    ContextLengthExceeded,
    EmbeddingInference,
    GenerationEvent,
    InvalidRequest,
    LoadFailed,
    Overloaded,
    ProgressFn,
    TextInference,
    Unsupported,
    cancel_grace,
)
from .process import Phase, WorkerProcess, WorkerSettings

log = logging.getLogger(__name__)


class _Crash:
    """Put in every open request's queue when the worker died."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


_ERRORS: dict[str, type[BackendError]] = {
    "invalid_request": InvalidRequest,
    "context_length_exceeded": ContextLengthExceeded,
    "unsupported": Unsupported,
    "overloaded": Overloaded,
    "backend_crashed": BackendCrashed,
}


class WorkerBackend(Backend, ChatInference, TextInference, EmbeddingInference):
    """``config``'s backend, run in a worker process (see the module docstring).

    Args:
        config: the model's config; its ``backend_kind`` is what runs in the worker.
        settings: the worker's deadlines; a config's ``metadata.cancel_grace`` (seconds)
            replaces their ``cancel_grace``.

    Requests the worker's backend cannot serve fail as they would in-process
    (:class:`Unsupported`, from the worker).
    """

    kind = "worker"
    needs_service_nursery = True
    kills_wedged = True

    def __init__(self, config: ModelConfig, settings: WorkerSettings | None = None) -> None:
        super().__init__(config)
        self.settings = settings or WorkerSettings()
        # the model's own, from models.toml
        self.settings = replace(self.settings, cancel_grace=cancel_grace(config, self.settings.cancel_grace))
        self._worker = WorkerProcess(config, self.settings, deliver=self._deliver, on_crash=self._crashed,
                                     on_status=self._status_changed)
        self._requests: dict[str, trio.MemorySendChannel[Any]] = {}

    # --- views ----------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        """The worker process's id (``None`` before it started)."""
        return self._worker.pid

    @property
    def crash_reason(self) -> str | None:
        """Why the worker died, when it did without being asked to."""
        return self._worker.crash_reason

    @property
    def start_seconds(self) -> float | None:
        """Seconds from spawning the worker to its first frame."""
        return self._worker.start_seconds

    @property
    def in_flight(self) -> int:
        """Requests sent to the worker and not yet ended."""
        return len(self._requests)

    @property
    def workloads(self) -> frozenset[Workload]:
        return self._worker.workloads

    def memory_bytes(self) -> int:
        return self._worker.memory if self._worker.phase is Phase.LOADED else 0

    def slots(self) -> int | None:
        return self._worker.slots

    # --- lifecycle ------------------------------------------------------------------------

    async def load(self, progress: ProgressFn) -> None:
        """Start the worker and load the model in it, forwarding its progress.

        Raises :class:`LoadFailed`: the backend's own reason and code from inside the
        worker; ``backend_crashed`` when the worker died or missed a deadline (it is
        killed); ``load_failed`` when no worker could be started.
        """
        if self._worker.phase is not Phase.NEW:
            raise LoadFailed("a worker backend loads once; make a new one to reload", code="load_failed")
        if self.service_nursery is None:
            raise LoadFailed("a worker backend needs the neuron's service nursery", code="load_failed")
        await self._worker.start(progress, self.service_nursery)

    async def unload(self) -> None:
        """Ask the worker to unload and exit; kill it after ``unload_timeout``. Idempotent;
        returns once the process is reaped."""
        await self._worker.stop()

    def kill(self) -> None:
        """SIGKILL the worker now (the neuron is stopping): an :meth:`unload` waiting for
        it returns once it is reaped."""
        self._worker.kill("did not unload before the neuron stopped")

    # --- the worker's side of things ------------------------------------------------------

    def _deliver(self, msg: Any) -> None:
        if (queue := self._requests.get(msg.request_id)) is not None:
            queue.send_nowait(msg)

    def _status_changed(self, status: ModelStatus) -> None:
        if self.status_listener is not None:
            self.status_listener(status)

    def _crashed(self, reason: str, was_loaded: bool) -> None:
        for queue in list(self._requests.values()):
            queue.send_nowait(_Crash(reason))
        if was_loaded and self.status_listener is not None:
            self.status_listener(
                ModelStatus(self.config.model_id, ModelState.FAILED, self.config.backend_kind, error=reason)
            )

    # --- inference ------------------------------------------------------------------------

    def chat(self, request: GenerateRequest) -> AsyncIterator[GenerationEvent]:
        return self._generate(request)

    def complete(self, request: GenerateRequest) -> AsyncIterator[GenerationEvent]:
        return self._generate(request)

    async def _generate(self, request: GenerateRequest) -> AsyncIterator[GenerationEvent]:
        rid = request.request_id
        receive = self._open(rid)
        sent = ended = False
        try:
            sent = self._send(request)
            while True:
                item = await receive.receive()
                if type(item) is TokenChunk:
                    yield item
                    continue
                if type(item) is WorkerStarted:
                    start_signal.report()
                    continue
                ended = True
                if type(item) is GenerateResult:
                    yield item
                    return
                raise _error(item)
        finally:
            if sent and not ended:
                await self._abandon(rid, receive)
            del self._requests[rid]

    async def embed(self, request: EmbedRequest) -> EmbedResult:
        rid = request.request_id
        receive = self._open(rid)
        sent = ended = False
        try:
            sent = self._send(request)
            item = await receive.receive()
            if type(item) is WorkerStarted:
                start_signal.report()
                item = await receive.receive()
            ended = True
            if type(item) is EmbedResult:
                return item
            raise _error(item)
        finally:
            if sent and not ended:
                await self._abandon(rid, receive)
            del self._requests[rid]

    def _open(self, rid: str) -> trio.MemoryReceiveChannel[Any]:
        if self._worker.phase is Phase.GONE and self.crash_reason is not None:
            raise _crash_error(self.crash_reason)
        if self._worker.phase is not Phase.LOADED:
            raise BackendError(f"model {self.config.model_id!r} is not loaded", code="model_not_loaded")
        if rid in self._requests:
            raise InvalidRequest(f"request {rid!r} is already running on this model")
        send, receive = trio.open_memory_channel[Any](math.inf)
        self._requests[rid] = send
        return receive

    def _send(self, request: GenerateRequest | EmbedRequest) -> bool:
        """Send ``request``; True once it was written. A dead worker is reported through
        the request's queue, like a death later on."""
        if start_signal.listening():  # the worker reports the start of a request with a trace
            request = replace(request, trace=telemetry.traceparent() or request.trace)
        try:
            self._worker.send(request)
        except ChannelClosed:
            return False
        return True

    async def _abandon(self, rid: str, receive: trio.MemoryReceiveChannel[Any]) -> None:
        """The caller left before the end: stop the request in the worker and wait until it
        has (its slot is then free); a worker that does not within ``cancel_grace`` is
        wedged, and killed (see the module docstring)."""
        grace = self.settings.cancel_grace
        with trio.CancelScope(shield=True), trio.move_on_after(grace) as waited:
            try:
                self._worker.send(Cancel(rid))
            except ChannelClosed:
                pass
            while type(await receive.receive()) in (TokenChunk, WorkerStarted):
                pass
        if waited.cancelled_caught:
            log.warning("model %s: request %s did not end within %gs of its cancel (cancel_grace): the engine "
                        "is wedged; killing its worker (pid %s) to reload the model",
                        self.config.model_id, rid, grace, self.pid)
            self._worker.kill(f"did not end request {rid} within {grace:g} s of its cancel (the engine is wedged)")


def _crash_error(reason: str) -> BackendCrashed:
    exc = BackendCrashed(reason)
    exc.retryable = True  # retryable elsewhere unless some of the answer was sent already
    return exc


def _error(item: InferenceError | _Crash) -> BackendError:
    if type(item) is _Crash:
        return _crash_error(item.reason)
    assert isinstance(item, InferenceError)
    exc = _ERRORS.get(item.code, BackendError)(item.message, code=item.code)
    exc.retryable = item.retryable
    return exc
