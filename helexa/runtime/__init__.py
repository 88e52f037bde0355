"""Inference backends run by a neuron (see :mod:`helexa.runtime.base`)."""

from .base import (
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
    StatusListener,
    TextInference,
    Unsupported,
    VisionInference,
    embedder,
    events_of,
)
from .registry import BACKENDS, backend_class, create_backend

__all__ = [name for name in dir() if not name.startswith("_")]
