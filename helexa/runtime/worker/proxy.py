"""The neuron's side of a worker process: a :class:`Backend` whose model runs in a child.

:class:`WorkerBackend` implements every capability interface, so the neuron's registry,
serving and relay code use it as they use an in-process backend. :meth:`~WorkerBackend.load`
starts ``python -m helexa.runtime.worker`` (a fresh interpreter: forking a process that
runs trio and native threads is unsafe) with one end of a socketpair, and the ordinary
backend for the config loads there. Requests, their chunks and cancels cross the socket
by request id (:mod:`helexa.protocol.worker`).

What the process boundary buys:

* A load never blocks the neuron's event loop, whatever the engine does with the
  interpreter lock, so a loading neuron heartbeats like any other.
* A worker that dies (a segfault, an out-of-memory kill, ``kill -9``) fails only its own
  model's requests, with :class:`BackendCrashed` (``backend_crashed``; retryable elsewhere
  when nothing of the answer was sent), and the backend reports the model ``FAILED`` with
  the reason through ``status_listener``; a new :class:`WorkerBackend` reloads it.
* A worker that stops answering pings for ``ping_timeout`` seconds once loaded is killed
  (``SIGKILL``) and reported the same way. A load has its own deadline (``load_timeout``),
  since an engine may hold the child's interpreter lock, and so its pongs, for a whole load.
* Unloading ends the process, so all of its memory goes back to the system.

Resource handling: the worker's reader and watchdog run in ``service_nursery`` (required);
:meth:`~WorkerBackend.unload` stops them and reaps the process, and if that nursery is
cancelled first the process is killed on the way out.
"""

from __future__ import annotations

import enum
import logging
import math
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

import trio

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
    Ping,
    Pong,
    ProtocolError,
    TokenChunk,
    Workload,
)
from helexa.protocol.worker import (
    Liveness,
    WorkerLoad,
    WorkerLoaded,
    WorkerLoadFailed,
    WorkerProgress,
    WorkerReady,
    WorkerStarted,
    WorkerStatus,
    WorkerUnload,
    WorkerUnloaded,
)
from helexa import telemetry
from helexa.transport import ChannelClosed

from ..base import (
    Backend,
    BackendCrashed,
    BackendError,
    ChatInference,
    EmbeddingInference,
    GenerationEvent,
    InvalidRequest,
    LoadFailed,
    Overloaded,
    ProgressFn,
    TextInference,
    Unsupported,
)
from .. import start_signal
from ..process_output import relay_lines
from .pipe import Pipe

log = logging.getLogger(__name__)

CANCEL_GRACE_S = 30.0
"""How long leaving a stream waits for the worker to confirm the request stopped (its slot
is then free, as with an in-process backend)."""


@dataclass(frozen=True)
class WorkerSettings:
    """Deadlines of a worker process (seconds)."""

    start_timeout: float = 60.0
    """From spawning the interpreter to its first frame (imports, on a busy machine)."""
    load_timeout: float = 1800.0
    """For the backend's load inside the worker (a large model from a slow disk)."""
    ping_interval: float = 1.0
    ping_timeout: float = 10.0
    """Silence after which a loaded worker counts as hung and is killed."""
    unload_timeout: float = 30.0
    """For the worker to unload and exit before it is killed."""
    exit_grace: float = 5.0
    """For a worker that closed its socket to exit before it is killed."""
    python: str = sys.executable


class _Phase(enum.Enum):
    NEW = "new"
    STARTING = "starting"
    LOADING = "loading"
    LOADED = "loaded"
    UNLOADING = "unloading"
    GONE = "gone"


class _Crash:
    """Put in every open request's queue when the worker died."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


_ERRORS: dict[str, type[BackendError]] = {
    "invalid_request": InvalidRequest,
    "unsupported": Unsupported,
    "overloaded": Overloaded,
    "backend_crashed": BackendCrashed,
}


class WorkerBackend(Backend, ChatInference, TextInference, EmbeddingInference):
    """``config``'s backend, run in a worker process (see the module docstring).

    Args:
        config: the model's config; its ``backend_kind`` is what runs in the worker.
        settings: the worker's deadlines.

    Requests the worker's backend cannot serve fail as they would in-process
    (:class:`Unsupported`, from the worker).
    """

    kind = "worker"
    needs_service_nursery = True

    def __init__(self, config: ModelConfig, settings: WorkerSettings | None = None) -> None:
        super().__init__(config)
        self.settings = settings or WorkerSettings()
        self._phase = _Phase.NEW
        self._process: trio.Process | None = None
        self._pipe: Pipe | None = None
        self._scope = trio.CancelScope()
        self._requests: dict[str, trio.MemorySendChannel[Any]] = {}
        self._ready = trio.Event()
        self._loaded = trio.Event()
        self._exited = trio.Event()
        self._load_error: BackendError | None = None
        self._progress: ProgressFn | None = None
        self._liveness: Liveness | None = None
        self._kill_reason: str | None = None
        self._workloads: frozenset[Workload] = frozenset()
        self._memory = 0
        self._slots: int | None = None
        self.crash_reason: str | None = None
        """Why the worker died, once it did without being asked to."""
        self.start_seconds: float | None = None
        """Seconds from spawning the worker to its first frame."""

    # --- views ----------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        """The worker process's id (``None`` before it started)."""
        return None if self._process is None else self._process.pid

    @property
    def in_flight(self) -> int:
        """Requests sent to the worker and not yet ended."""
        return len(self._requests)

    @property
    def workloads(self) -> frozenset[Workload]:
        return self._workloads

    def memory_bytes(self) -> int:
        return self._memory if self._phase is _Phase.LOADED else 0

    def slots(self) -> int | None:
        return self._slots

    # --- lifecycle ------------------------------------------------------------------------

    async def load(self, progress: ProgressFn) -> None:
        """Start the worker and load the model in it, forwarding its progress.

        Raises :class:`LoadFailed`: the backend's own reason and code from inside the
        worker; ``backend_crashed`` when the worker died or missed a deadline (it is
        killed); ``load_failed`` when no worker could be started.
        """
        if self._phase is not _Phase.NEW:
            raise LoadFailed("a worker backend loads once; make a new one to reload", code="load_failed")
        if self.service_nursery is None:
            raise LoadFailed("a worker backend needs the neuron's service nursery", code="load_failed")
        self._progress = progress
        self._phase = _Phase.STARTING
        started = trio.current_time()
        await self._spawn()
        await self._wait(self._ready, self.settings.start_timeout, "start")
        self.start_seconds = trio.current_time() - started
        self._phase = _Phase.LOADING
        log.info("model %s: worker pid %d started in %.2fs", self.config.model_id, self.pid, self.start_seconds)
        assert self._pipe is not None
        try:
            self._pipe.send(WorkerLoad(self.config))
        except ChannelClosed:
            pass  # it died: the wait below reports why
        await self._wait(self._loaded, self.settings.load_timeout, "load")
        if self._load_error is not None:
            raise self._load_error
        self._phase = _Phase.LOADED
        if self._liveness is not None:  # the deadline starts now: a load may hold off pongs
            self._liveness.heard(trio.current_time())

    async def _spawn(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        level = logging.getLevelName(logging.getLogger().getEffectiveLevel()).lower()
        argv = [self.settings.python, "-m", "helexa.runtime.worker", "--fd", str(theirs.fileno()),
                "--model", self.config.model_id, "--log-level", level]
        try:
            # Its output (its own log lines, and what native code such as llama.cpp writes
            # to stderr) comes back through the neuron's logger, JSON lines included.
            self._process = await trio.lowlevel.open_process(
                argv, pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
        except OSError as exc:
            ours.close()
            self._phase = _Phase.GONE
            raise LoadFailed(f"could not start a worker process for {self.config.model_id!r}: {exc}",
                             code="load_failed") from None
        finally:
            theirs.close()
        self._pipe = Pipe(ours)
        assert self.service_nursery is not None
        self.service_nursery.start_soon(self._supervise)

    def _log_output(self, line: str) -> None:
        logging.getLogger("helexa.worker").info("[%s] %s", self.config.model_id, line)

    async def _wait(self, event: trio.Event, timeout: float, what: str) -> None:
        """Wait for a step of the load; a worker that misses the deadline is killed."""
        with trio.move_on_after(timeout):
            await event.wait()
        if not event.is_set():
            self._kill(f"did not {what} within {timeout:g} s")
            with trio.CancelScope(shield=True):
                await self._exited.wait()
        if self._phase is _Phase.GONE:
            raise LoadFailed(self.crash_reason or f"the worker of {self.config.model_id!r} is gone",
                             code="backend_crashed")

    async def unload(self) -> None:
        """Ask the worker to unload and exit; kill it after ``unload_timeout``. Idempotent;
        returns once the process is reaped."""
        if self._process is None:
            self._phase = _Phase.GONE
            return
        if self._phase is not _Phase.GONE:
            self._phase = _Phase.UNLOADING
            with trio.CancelScope(shield=True):
                with trio.move_on_after(self.settings.unload_timeout):
                    try:
                        assert self._pipe is not None
                        self._pipe.send(WorkerUnload())
                    except ChannelClosed:
                        pass
                    await self._exited.wait()
                if not self._exited.is_set():
                    self._kill(f"did not unload within {self.settings.unload_timeout:g} s")
                    await self._exited.wait()
        self._scope.cancel()

    # --- the worker's side of things ------------------------------------------------------

    async def _supervise(self) -> None:
        assert self._process is not None and self._pipe is not None
        try:
            with self._scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._pipe.run)
                    nursery.start_soon(self._watch)
                    nursery.start_soon(relay_lines, self._process.stdout, self._log_output)
                    await self._read()
                    nursery.cancel_scope.cancel()
                await self._reap()
        finally:
            if self._process.returncode is None:  # cancelled from outside: never leave it behind
                self._process.kill()
            self._phase = _Phase.GONE
            with trio.CancelScope(shield=True):
                await self._pipe.aclose()
            self._ready.set()
            self._loaded.set()
            self._exited.set()

    async def _read(self) -> None:
        """Dispatch the worker's frames until its end of the socket closes."""
        assert self._pipe is not None
        while True:
            try:
                msgs = await self._pipe.receive_batch()
            except ChannelClosed:
                return
            except ProtocolError as exc:
                self._kill(f"broke the protocol ({exc})")
                return
            if self._liveness is not None:
                self._liveness.heard(trio.current_time())
            for msg in msgs:
                match msg:
                    case TokenChunk() | GenerateResult() | EmbedResult() | InferenceError() | WorkerStarted():
                        if (queue := self._requests.get(msg.request_id)) is not None:
                            queue.send_nowait(msg)
                    case Pong():
                        pass
                    case WorkerProgress(stage=stage, done=done, total=total, unit=unit):
                        if self._progress is not None:
                            self._progress(stage, done, total, unit)
                    case WorkerReady():
                        self._ready.set()
                    case WorkerLoaded(workloads=workloads, memory_bytes=memory, slots=slots):
                        self._workloads, self._memory, self._slots = frozenset(workloads), memory, slots
                        self._loaded.set()
                    case WorkerLoadFailed(code=code, message=message):
                        self._load_error = LoadFailed(message, code=code)
                        self._loaded.set()
                    case WorkerStatus(status=status):
                        if self.status_listener is not None:
                            self.status_listener(status)
                    case WorkerUnloaded():
                        pass
                    case _:
                        self._kill(f"sent an unexpected {type(msg).__name__}")
                        return

    async def _watch(self) -> None:
        s = self.settings
        live = self._liveness = Liveness(interval=s.ping_interval, timeout=s.ping_timeout, now=trio.current_time())
        while True:
            now = trio.current_time()
            if self._phase is _Phase.LOADED and live.hung(now):
                self._kill(f"did not answer for {live.silent_for(now):.1f} s (ping_timeout {s.ping_timeout:g} s)")
                return
            nonce = live.ping_due(now)
            if nonce is not None:
                try:
                    self._pipe.send(Ping(nonce))  # never blocks, even towards a frozen worker
                except ChannelClosed:
                    return
            await trio.sleep_until(live.next_check(now))

    def _kill(self, reason: str) -> None:
        if self._process is not None and self._process.returncode is None:
            if self._kill_reason is None:
                self._kill_reason = reason
            self._process.kill()

    async def _reap(self) -> None:
        """The worker closed its socket: wait for it to exit, and report a death nobody
        asked for."""
        assert self._process is not None
        with trio.move_on_after(self.settings.exit_grace):
            await self._process.wait()
        if self._process.returncode is None:
            self._kill(f"closed its socket but did not exit within {self.settings.exit_grace:g} s")
            await self._process.wait()
        was = self._phase
        self._phase = _Phase.GONE
        if was is not _Phase.UNLOADING:
            self._crashed(self._describe_exit(self._process.returncode), was_loaded=was is _Phase.LOADED)

    def _describe_exit(self, code: int) -> str:
        who = f"the backend process of model {self.config.model_id!r}"
        if self._kill_reason is not None:
            return f"{who} {self._kill_reason}; it was killed"
        if code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            if -code == signal.SIGKILL:
                return f"{who} was killed by SIGKILL (by hand, or by the kernel's out-of-memory killer)"
            return f"{who} crashed ({name})"
        return f"{who} exited unexpectedly with code {code}"

    def _crashed(self, reason: str, *, was_loaded: bool) -> None:
        self.crash_reason = reason
        log.error("%s (pid %s)", reason, self.pid)
        for queue in list(self._requests.values()):
            queue.send_nowait(_Crash(reason))
        if not self._loaded.is_set():
            self._load_error = LoadFailed(reason, code="backend_crashed")
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
        if self._phase is _Phase.GONE and self.crash_reason is not None:
            raise _crash_error(self.crash_reason)
        if self._phase is not _Phase.LOADED:
            raise BackendError(f"model {self.config.model_id!r} is not loaded", code="model_not_loaded")
        if rid in self._requests:
            raise InvalidRequest(f"request {rid!r} is already running on this model")
        send, receive = trio.open_memory_channel[Any](math.inf)
        self._requests[rid] = send
        return receive

    def _send(self, request: GenerateRequest | EmbedRequest) -> bool:
        """Send ``request``; True once it was written. A dead worker is reported through
        the request's queue, like a death later on."""
        assert self._pipe is not None
        if start_signal.listening():  # the worker reports the start of a request with a trace
            request = replace(request, trace=telemetry.traceparent() or request.trace)
        try:
            self._pipe.send(request)
        except ChannelClosed:
            return False
        return True

    async def _abandon(self, rid: str, receive: trio.MemoryReceiveChannel[Any]) -> None:
        """The caller left before the end: stop the request in the worker and wait until it
        has (its slot is then free)."""
        assert self._pipe is not None
        with trio.CancelScope(shield=True), trio.move_on_after(CANCEL_GRACE_S) as waited:
            try:
                self._pipe.send(Cancel(rid))
            except ChannelClosed:
                pass
            while type(await receive.receive()) in (TokenChunk, WorkerStarted):
                pass
        if waited.cancelled_caught:
            log.error("the worker of %s kept request %s past %ss after cancel",
                      self.config.model_id, rid, CANCEL_GRACE_S)


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
