"""One worker process, supervised from the neuron: spawn, load, ping, kill, reap.

:class:`WorkerProcess` starts ``python -m helexa.runtime.worker`` (a fresh interpreter:
forking a process that runs trio and native threads is unsafe) with one end of a
socketpair, walks it through the load (:mod:`helexa.protocol.worker`), and watches it
until it exits:

* A worker that stops answering pings for ``ping_timeout`` seconds once loaded is killed
  (``SIGKILL``). A load has its own deadline (``load_timeout``), since an engine may hold
  the child's interpreter lock, and so its pongs, for a whole load; so has the start
  (``start_timeout``).
* A death nobody asked for (a segfault, an out-of-memory kill, ``kill -9``, a deadline
  missed) is described in one sentence (:attr:`~WorkerProcess.crash_reason`) and reported
  through ``on_crash``.
* Its output (its own log lines, and what native code such as llama.cpp writes to stderr)
  comes back through the neuron's logger, JSON lines included.

Which request a frame belongs to is not its business: every request's frame goes to
``deliver`` (:class:`~.proxy.WorkerBackend` routes them by request id).

Resource handling: the reader, the watchdog and the output relay run in the nursery given
to :meth:`~WorkerProcess.start`; :meth:`~WorkerProcess.stop` ends them and reaps the
process, and if that nursery is cancelled first the process is killed on the way out.
"""

from __future__ import annotations

import enum
import logging
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio

from helexa import secret_files
from helexa.protocol import (
    EmbedResult,
    GenerateResult,
    InferenceError,
    ModelConfig,
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
from helexa.transport import ChannelClosed

from .. import cpu_policy
from ..base import BackendError, LoadFailed, ProgressFn
from ..process_output import relay_lines
from .pipe import Pipe

log = logging.getLogger(__name__)


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
    cancel_grace: float = 10.0
    """For a cancelled request (its caller left, or its deadline passed) to end in the
    worker. Past it the engine is wedged (llama.cpp cannot cancel some steps, such as its
    JSON-schema-to-grammar converter on a pathological schema, and the slot never comes
    back): the worker is killed, its other requests fail as in a crash, and the model is
    reloaded in a new one. Long enough for an engine to notice a cancel between two of its
    steps (a prompt batch on a slow CPU)."""
    python: str = sys.executable


class Phase(enum.Enum):
    NEW = "new"
    STARTING = "starting"
    LOADING = "loading"
    LOADED = "loaded"
    UNLOADING = "unloading"
    GONE = "gone"


class WorkerProcess:
    """The process that runs ``config``'s model (see the module docstring).

    Args:
        config: the model's config, sent to the worker to load.
        settings: the worker's deadlines.
        deliver: called on the trio thread with each frame of a request (its chunks, its
            start, its end).
        on_crash: called once with :attr:`crash_reason` and whether the model had loaded,
            when the worker died without being asked to.
        on_status: called with the loaded backend's own state changes (``WorkerStatus``).
    """

    def __init__(self, config: ModelConfig, settings: WorkerSettings, *, deliver: Callable[[Any], None],
                 on_crash: Callable[[str, bool], None], on_status: Callable[[ModelStatus], None]) -> None:
        self.config = config
        self.settings = settings
        self._deliver = deliver
        self._on_crash = on_crash
        self._on_status = on_status
        self.phase = Phase.NEW
        self._process: trio.Process | None = None
        self._pipe: Pipe | None = None
        self._scope = trio.CancelScope()
        self._ready = trio.Event()
        self._loaded = trio.Event()
        self._exited = trio.Event()
        self._load_error: BackendError | None = None
        self._progress: ProgressFn | None = None
        self._liveness: Liveness | None = None
        self._kill_reason: str | None = None
        self.workloads: frozenset[Workload] = frozenset()
        """What the loaded backend serves (as the worker said)."""
        self.memory = 0
        self.slots: int | None = None
        self.crash_reason: str | None = None
        """Why the worker died, when it did without being asked to."""
        self.start_seconds: float | None = None
        """Seconds from spawning the worker to its first frame."""

    @property
    def pid(self) -> int | None:
        """The worker process's id (``None`` before it started)."""
        return None if self._process is None else self._process.pid

    def send(self, msg: Any) -> None:
        """Send ``msg`` to the worker (never blocks). Raises :class:`ChannelClosed` once it is gone."""
        if self._pipe is None:
            raise ChannelClosed("the worker has not started")
        self._pipe.send(msg)

    # --- lifecycle ------------------------------------------------------------------------

    async def start(self, progress: ProgressFn, nursery: trio.Nursery) -> None:
        """Start the worker and load the model in it, forwarding its progress; its
        supervision runs in ``nursery``.

        Raises :class:`LoadFailed`: the backend's own reason and code from inside the
        worker; ``backend_crashed`` when the worker died or missed a deadline (it is
        killed); ``load_failed`` when no worker could be started.
        """
        self._progress = progress
        self.phase = Phase.STARTING
        started = trio.current_time()
        await self._spawn(nursery)
        await self._wait(self._ready, self.settings.start_timeout, "start")
        self.start_seconds = trio.current_time() - started
        self.phase = Phase.LOADING
        log.info("model %s: worker pid %d started in %.2fs", self.config.model_id, self.pid, self.start_seconds)
        try:
            self.send(WorkerLoad(self.config))
        except ChannelClosed:
            pass  # it died: the wait below reports why
        await self._wait(self._loaded, self.settings.load_timeout, "load")
        if self._load_error is not None:
            raise self._load_error
        self.phase = Phase.LOADED
        if self._liveness is not None:  # the deadline starts now: a load may hold off pongs
            self._liveness.heard(trio.current_time())

    async def _spawn(self, nursery: trio.Nursery) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        level = logging.getLevelName(logging.getLogger().getEffectiveLevel()).lower()
        argv = [self.settings.python, "-m", "helexa.runtime.worker", "--fd", str(theirs.fileno()),
                "--model", self.config.model_id, "--log-level", level, "--cpu-policy", cpu_policy.current()]
        try:
            self._process = await trio.lowlevel.open_process(
                argv, pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, env=secret_files.child_env(),
            )
        except OSError as exc:
            ours.close()
            self.phase = Phase.GONE
            raise LoadFailed(f"could not start a worker process for {self.config.model_id!r}: {exc}",
                             code="load_failed") from None
        finally:
            theirs.close()
        self._pipe = Pipe(ours)
        nursery.start_soon(self._supervise)

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
        if self.phase is Phase.GONE:
            raise LoadFailed(self.crash_reason or f"the worker of {self.config.model_id!r} is gone",
                             code="backend_crashed")

    async def stop(self) -> None:
        """Ask the worker to unload and exit; kill it after ``unload_timeout``. Idempotent;
        returns once the process is reaped."""
        if self._process is None:
            self.phase = Phase.GONE
            return
        if self.phase is not Phase.GONE:
            self.phase = Phase.UNLOADING
            with trio.CancelScope(shield=True):
                with trio.move_on_after(self.settings.unload_timeout):
                    try:
                        self.send(WorkerUnload())
                    except ChannelClosed:
                        pass
                    await self._exited.wait()
                if not self._exited.is_set():
                    self._kill(f"did not unload within {self.settings.unload_timeout:g} s")
                    await self._exited.wait()
        self._scope.cancel()

    def kill(self, reason: str) -> None:
        """SIGKILL the worker now (a hung one ignores everything else; SIGKILL ends even a
        stopped process); :meth:`stop` and the supervision reap it."""
        self._kill(reason)

    # --- supervision ----------------------------------------------------------------------

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
            self.phase = Phase.GONE
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
                        self._deliver(msg)
                    case Pong():
                        pass
                    case WorkerProgress(stage=stage, done=done, total=total, unit=unit):
                        if self._progress is not None:
                            self._progress(stage, done, total, unit)
                    case WorkerReady():
                        self._ready.set()
                    case WorkerLoaded(workloads=workloads, memory_bytes=memory, slots=slots):
                        self.workloads, self.memory, self.slots = frozenset(workloads), memory, slots
                        self._loaded.set()
                    case WorkerLoadFailed(code=code, message=message):
                        self._load_error = LoadFailed(message, code=code)
                        self._loaded.set()
                    case WorkerStatus(status=status):
                        self._on_status(status)
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
            live.checking(now)  # a stall of the neuron itself is not the worker's silence
            if self.phase is Phase.LOADED and live.hung(now):
                self._kill(f"did not answer for {live.silent_for(now):.1f} s (ping_timeout {s.ping_timeout:g} s)")
                return
            nonce = live.ping_due(now)
            if nonce is not None:
                try:
                    self.send(Ping(nonce))  # never blocks, even towards a frozen worker
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
        was = self.phase
        self.phase = Phase.GONE
        if was is not Phase.UNLOADING:
            self._crashed(self._describe_exit(self._process.returncode), was_loaded=was is Phase.LOADED)

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
        if not self._loaded.is_set():
            self._load_error = LoadFailed(reason, code="backend_crashed")
        self._on_crash(reason, was_loaded)
