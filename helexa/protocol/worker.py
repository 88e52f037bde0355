"""Between a neuron and the worker processes that run its models.

Each loaded model runs in a child process of the neuron (see :mod:`helexa.runtime.worker`),
which speaks this protocol over a local stream socket. The frames are the same msgpack
messages as on the control plane, each prefixed by its length (4 bytes, big-endian), since
a stream socket, unlike a websocket, has no message boundaries of its own.

The session, in order::

    neuron                                   worker
                                          <- WorkerReady(pid)
      WorkerLoad(config)                  ->
                                          <- WorkerProgress ... then WorkerLoaded | WorkerLoadFailed
      GenerateRequest / EmbedRequest      ->
                                          <- WorkerStarted (only for a request with a ``trace``)
                                          <- TokenChunk ... then exactly one of GenerateResult,
                                             EmbedResult, InferenceError per request
      Cancel(request_id)                  ->  (the request still ends with its one last frame)
      Ping(nonce)                         ->
                                          <- Pong(nonce)
                                          <- WorkerStatus (the backend changed state by itself)
      WorkerUnload                        ->
                                          <- WorkerUnloaded, then the worker exits

The inference frames are the control plane's own (:mod:`.inference`), so a generation's
chunks cross both hops unchanged.

:class:`FrameReader` is the sans-IO framing: bytes in, messages out. :class:`Liveness` is
the neuron's pure ping bookkeeping: when a ping is due, and whether a worker has been
silent past its deadline.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from ..watchdog import excuse_stall
from .codec import DEFAULT_MAX_FRAME, added_field, decode, encode, message
from .errors import DecodeError
from .inference import Cancel, EmbedRequest, EmbedResult, GenerateRequest, GenerateResult, InferenceError, TokenChunk
from .messages import Ping, Pong
from .model import ModelConfig, ModelStatus, Workload

# --- messages ----------------------------------------------------------------------------


@message("worker_ready")
@dataclass(frozen=True, slots=True)
class WorkerReady:
    """The worker's first frame: it runs and reads its socket."""

    pid: int


@message("worker_load")
@dataclass(frozen=True, slots=True)
class WorkerLoad:
    """Build the backend for ``config`` and load it (once per worker)."""

    config: ModelConfig


@message("worker_progress")
@dataclass(frozen=True, slots=True)
class WorkerProgress:
    """Progress of the load: ``done`` of ``total`` ``unit`` in ``stage``."""

    stage: str
    done: int
    total: int | None = None
    unit: str = "bytes"


@message("worker_loaded")
@dataclass(frozen=True, slots=True)
class WorkerLoaded:
    """The model is loaded and serves ``workloads``."""

    workloads: tuple[Workload, ...]
    memory_bytes: int = 0
    slots: int | None = added_field()
    """Requests the backend works on at once (:meth:`helexa.runtime.Backend.slots`)."""


@message("worker_load_failed")
@dataclass(frozen=True, slots=True)
class WorkerLoadFailed:
    """The load failed (``code`` as :class:`helexa.runtime.LoadFailed` has it); the worker
    exits after this frame."""

    code: str
    message: str


@message("worker_started")
@dataclass(frozen=True, slots=True)
class WorkerStarted:
    """The backend started on request ``request_id``: its wait in the backend's queue is over
    (:mod:`helexa.runtime.start_signal`). Sent only for a request whose ``trace`` is set,
    i.e. while the neuron traces, and always before the request's last frame."""

    request_id: str


@message("worker_status")
@dataclass(frozen=True, slots=True)
class WorkerStatus:
    """The loaded backend changed state by itself (a supervised server restarting, say)."""

    status: ModelStatus


@message("worker_unload")
@dataclass(frozen=True, slots=True)
class WorkerUnload:
    """Stop every request, free the model and exit."""


@message("worker_unloaded")
@dataclass(frozen=True, slots=True)
class WorkerUnloaded:
    """The model is freed; the worker exits next."""


TO_WORKER = (WorkerLoad, WorkerUnload, GenerateRequest, EmbedRequest, Cancel, Ping)
"""What a neuron sends its worker."""

FROM_WORKER = (
    WorkerReady, WorkerProgress, WorkerLoaded, WorkerLoadFailed, WorkerStatus, WorkerUnloaded, WorkerStarted,
    TokenChunk, GenerateResult, EmbedResult, InferenceError, Pong,
)
"""What a worker sends its neuron."""

END_OF_REQUEST = (GenerateResult, EmbedResult, InferenceError)
"""The frames that end a request: exactly one per request."""

# --- framing -----------------------------------------------------------------------------

_HEADER = struct.Struct(">I")


def frame(msg: Any) -> bytes:
    """``msg`` encoded, with its length in front."""
    body = encode(msg)
    return _HEADER.pack(len(body)) + body


class FrameReader:
    """Cuts a byte stream into frames and decodes them.

    Args:
        max_frame: the largest frame accepted; a longer one is refused from its header,
            before its bytes are buffered.
    """

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self._max = max_frame
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[Any]:
        """Add ``data`` and return every message now complete, in order.

        Raises:
            DecodeError: a frame is oversized or malformed (the stream cannot be trusted
                after it; the caller closes it).
        """
        buf = self._buf
        buf += data
        out = []
        pos, end = 0, len(buf)
        size = _HEADER.size
        while end - pos >= size:
            (length,) = _HEADER.unpack_from(buf, pos)
            if length > self._max:
                raise DecodeError(f"frame of {length} bytes exceeds the limit of {self._max}", code="oversized")
            if end - pos - size < length:
                break
            start = pos + size
            out.append(decode(bytes(buf[start : start + length]), max_size=self._max))
            pos = start + length
        if pos:
            del buf[:pos]
        return out

    @property
    def buffered(self) -> int:
        """Bytes received that do not yet make a whole frame."""
        return len(self._buf)


# --- liveness ----------------------------------------------------------------------------


class Liveness:
    """When to ping a worker, and when its silence means it is hung.

    Pure bookkeeping over times the caller passes in. A worker is alive while its last
    answer (or, before any, its start) is at most ``timeout`` seconds old; a ping is due
    every ``interval`` seconds. Any frame from the worker counts as an answer. Time the
    watchdog itself did not run (see :meth:`checking`) is not silence.

    Args:
        interval: seconds between pings.
        timeout: seconds of silence after which the worker is hung.
        now: when the worker started.
    """

    def __init__(self, *, interval: float, timeout: float, now: float) -> None:
        if interval <= 0 or timeout <= 0:
            raise ValueError("interval and timeout must be positive")
        self.interval = interval
        self.timeout = timeout
        self._heard = now
        self._pinged = now
        self._checked = now
        self._nonce = 0

    def checking(self, now: float) -> None:
        """The watchdog checks at ``now``: silence while it did not run (its own process
        stopped or starved longer than ``interval``, the most it waits between checks) does
        not count against the worker, whose answers sat unread meanwhile."""
        self._heard = excuse_stall(self._heard, now, self._checked, self.interval)
        self._checked = max(self._checked, now)

    def heard(self, now: float) -> None:
        """The worker sent something at ``now``."""
        self._heard = max(self._heard, now)

    def ping_due(self, now: float) -> int | None:
        """The nonce of a ping to send now, or ``None`` if none is due yet."""
        if now - self._pinged < self.interval:
            return None
        self._pinged = now
        self._nonce += 1
        return self._nonce

    def silent_for(self, now: float) -> float:
        return now - self._heard

    def hung(self, now: float) -> bool:
        """True once the worker has been silent for longer than ``timeout``."""
        return now - self._heard > self.timeout

    def next_check(self, now: float) -> float:
        """When something changes next: a ping falls due, or the deadline passes."""
        return min(self._pinged + self.interval, self._heard + self.timeout + 1e-6)


__all__ = [
    "END_OF_REQUEST",
    "FROM_WORKER",
    "TO_WORKER",
    "FrameReader",
    "Liveness",
    "WorkerLoad",
    "WorkerLoadFailed",
    "WorkerLoaded",
    "WorkerProgress",
    "WorkerReady",
    "WorkerStatus",
    "WorkerUnload",
    "WorkerUnloaded",
    "frame",
]
