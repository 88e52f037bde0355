"""The runtime interface every inference backend meets.

A backend is created from a :class:`~helexa.protocol.ModelConfig`, loaded once, serves any
number of concurrent requests, and is unloaded. What it can serve is declared by the
capability interfaces it implements: :class:`ChatInference`, :class:`TextInference`,
:class:`EmbeddingInference`, :class:`VisionInference` (the seed's ``model-runtime`` traits).

Streaming: :meth:`ChatInference.chat` and :meth:`TextInference.complete` return an async
iterator of :class:`~helexa.protocol.TokenChunk` items ending with exactly one
:class:`~helexa.protocol.GenerateResult`. Callers iterate it inside
``contextlib.aclosing(...)``; leaving the loop early, or cancelling the task that iterates,
must stop generation in the backend and free its slot before ``aclose`` returns.

Queue wait: a backend whose requests can wait before the engine starts on them (for a
slot, a batch, a worker) calls :func:`helexa.runtime.start_signal.report` when that wait
ends, and says how many it runs at once in :meth:`Backend.slots`.

Blocking backend calls run off the trio thread (``trio.to_thread.run_sync``) so that one
model's work never stalls the control plane.

Exception tree::

    BackendError                    anything a backend reports; ``code`` is machine-readable
    ├── LoadFailed                  load did not succeed (model_not_found, corrupt_model,
    │                               out_of_memory, missing_extra, load_failed)
    ├── InvalidRequest              bad parameters for this backend (invalid_request)
    │   └── ContextLengthExceeded   the prompt does not fit (context_length_exceeded)
    ├── Unsupported                 the model cannot do this workload (unsupported)
    ├── Overloaded                  no free slot right now; retryable (overloaded)
    └── BackendCrashed              the engine or its process died (backend_crashed)
"""

from __future__ import annotations

import abc
import math
from collections.abc import AsyncIterator, Callable
from typing import ClassVar

import trio

from helexa.protocol import (
    EmbedRequest,
    EmbedResult,
    GenerateRequest,
    GenerateResult,
    Feature,
    ModelConfig,
    ModelStatus,
    Task,
    TokenChunk,
    Workload,
)

ProgressFn = Callable[[str, int, "int | None", str], None]
"""``progress(stage, done, total, unit)``: called on the trio thread during a load."""

GenerationEvent = TokenChunk | GenerateResult

StatusListener = Callable[[ModelStatus], None]
"""Called on the trio thread when a loaded backend changes state by itself."""


class BackendError(Exception):
    code: str = "backend_error"
    retryable: bool = False

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class LoadFailed(BackendError):
    code = "load_failed"


class InvalidRequest(BackendError):
    code = "invalid_request"


class ContextLengthExceeded(InvalidRequest):
    """The prompt (with ``max_tokens``) does not fit the context one request gets."""

    code = "context_length_exceeded"


class Unsupported(BackendError):
    code = "unsupported"


class Overloaded(BackendError):
    code = "overloaded"
    retryable = True


class BackendCrashed(BackendError):
    code = "backend_crashed"


DEFAULT_CANCEL_GRACE = 10.0
"""Seconds a cancelled request (its caller left, or its deadline passed) may take to end
before its engine counts as wedged: long enough for an engine to notice a cancel between
two of its steps (a prompt batch on a slow CPU)."""


def cancel_grace(config: ModelConfig, default: float = DEFAULT_CANCEL_GRACE) -> float:
    """``config``'s ``metadata.cancel_grace`` (seconds), else ``default``. Raises
    :class:`LoadFailed` (``invalid_config``) when it is not a positive number."""
    grace = config.metadata.get("cancel_grace")
    if grace is None:
        return default
    if isinstance(grace, bool) or not isinstance(grace, int | float) or not 0 < grace < math.inf:
        raise LoadFailed(f"metadata.cancel_grace must be a positive number of seconds, got {grace!r}",
                         code="invalid_config")
    return float(grace)


class Backend(abc.ABC):
    """Lifecycle of one model in one backend.

    Args:
        config: the model's config as pushed by the cortex.

    Subclasses set ``kind`` (the registry key) and implement the capability interfaces
    they support.

    Two optional attributes, set by the owner (the neuron) before :meth:`load`:

    ``service_nursery``
        A nursery that outlives the load, for backends with background work (the
        ``openai_proxy`` supervisor and its log pumps). Backends that need one say so with
        ``needs_service_nursery = True`` and fail to load without it; the backend cancels
        its own tasks there on :meth:`unload`, so the nursery is never cancelled for it.
    ``status_listener``
        Told when a loaded backend changes state by itself: its process died and is
        restarting (``LOADING`` with ``error`` saying why), came back (``LOADED``), or gave
        up (``FAILED``). The neuron forwards these to the cortex.
    """

    kind: ClassVar[str]
    features: ClassVar[frozenset[Feature]] = frozenset()
    """What this backend can do beyond plain text (structured output, tools, logprobs). A
    request asking for a feature its backend lacks is refused (:class:`Unsupported`); the
    cortex's catalogue defaults match these (a test keeps them equal)."""
    needs_service_nursery: ClassVar[bool] = False
    kills_wedged: ClassVar[bool] = False
    """True when the backend itself ends a request its engine cannot (a worker process is
    killed past ``cancel_grace``). Otherwise the neuron marks the model failed instead
    (:meth:`helexa.roles.neuron.registry.ModelRegistry.wedged`): a thread cannot be killed."""
    service_nursery: trio.Nursery | None = None
    status_listener: StatusListener | None = None

    def __init__(self, config: ModelConfig) -> None:
        self.config = config

    @abc.abstractmethod
    async def load(self, progress: ProgressFn) -> None:
        """Load the model, reporting progress. Raises :class:`LoadFailed` with a precise
        reason; on failure nothing stays allocated."""

    @abc.abstractmethod
    async def unload(self) -> None:
        """Free everything the load took (memory, VRAM, processes). Idempotent."""

    def kill(self) -> None:
        """The neuron is stopping and an :meth:`unload` under way took too long: end the
        processes it waits for now (SIGKILL), so that the unload returns at once. Nothing
        for a backend without processes of its own."""

    def memory_bytes(self) -> int:
        """Approximate resident memory of the loaded model (0 if unknown)."""
        return 0

    def slots(self) -> int | None:
        """Requests the loaded backend works on at once (more wait in its queue); None when
        it has no such limit or does not say."""
        return None

    def context_length(self) -> int | None:
        """The context one request gets (prompt and answer together), once loaded; by
        default what the model's config says (``capability.max_context``)."""
        return self.config.capability.max_context

    @property
    def workloads(self) -> frozenset[Workload]:
        found = set()
        if isinstance(self, ChatInference):
            found.add(Workload.CHAT)
        if isinstance(self, TextInference):
            found.add(Workload.COMPLETION)
        if isinstance(self, EmbeddingInference):
            found.add(Workload.EMBEDDING)
        if isinstance(self, VisionInference):
            found.add(Workload.VISION)
        return frozenset(found)


class ChatInference(abc.ABC):
    @abc.abstractmethod
    def chat(self, request: GenerateRequest) -> AsyncIterator[GenerationEvent]:
        """Stream a chat completion (chat template from the model's own metadata)."""


class TextInference(abc.ABC):
    @abc.abstractmethod
    def complete(self, request: GenerateRequest) -> AsyncIterator[GenerationEvent]:
        """Stream a raw-prompt completion."""


class EmbeddingInference(abc.ABC):
    @abc.abstractmethod
    async def embed(self, request: EmbedRequest) -> EmbedResult:
        """Embed a batch of inputs; vectors are L2-normalised float32."""


class VisionInference(ChatInference):
    """A chat model that accepts image parts in its messages."""


def events_of(backend: Backend, request: GenerateRequest) -> AsyncIterator[GenerationEvent]:
    """``request``'s stream on ``backend``: its chat or its completion, as the request's task
    says. Raises :class:`Unsupported` when the backend does not serve that task."""
    if request.task is Task.CHAT and isinstance(backend, ChatInference):
        return backend.chat(request)
    if request.task is Task.COMPLETION and isinstance(backend, TextInference):
        return backend.complete(request)
    raise Unsupported(f"model {request.model_id!r} does not do {request.task.value} requests")


def embedder(backend: Backend, request: EmbedRequest) -> EmbeddingInference:
    """``backend`` as the embedder of ``request``. Raises :class:`Unsupported` when it does
    not do embeddings."""
    if not isinstance(backend, EmbeddingInference):
        raise Unsupported(f"model {request.model_id!r} does not do embeddings")
    return backend
