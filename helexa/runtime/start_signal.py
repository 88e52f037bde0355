"""The signal a backend gives when a request leaves its queue and the engine starts on it.

A request can wait inside a backend before any work is done for it: for a free llama.cpp
slot, for the one ONNX batch at a time, for a worker process to pick it up. The neuron
measures that wait (the ``neuron.queue`` span, :mod:`helexa.roles.neuron.queue_wait`), and
only the backend knows when it ends. So a backend calls :func:`report` at that moment, in
the task that iterates (or awaits) the request: from the body of ``chat``/``complete``'s
async generator, or from ``embed``. The caller installs what to do with
:func:`listen`; nothing is installed unless tracing is on, and :func:`listening` lets a
backend skip any extra work it would take to know (llama.cpp's ``return_progress``).

The listener lives in a :mod:`contextvars` variable, so it belongs to the one request's trio
task (each task runs in a copy of its parent's context) and never leaks to another request.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

_LISTENER: ContextVar[Callable[[], None] | None] = ContextVar("helexa_start_listener", default=None)


@contextmanager
def listen(callback: Callable[[], None]) -> Iterator[None]:
    """Call ``callback`` (at most once per :func:`report`, on the trio thread) when the backend
    serving the request run inside this block starts on it."""
    token = _LISTENER.set(callback)
    try:
        yield
    finally:
        _LISTENER.reset(token)


def listening() -> bool:
    """Whether anyone waits for :func:`report` in this request."""
    return _LISTENER.get() is not None


def report() -> None:
    """The engine starts on the current request now (nothing when nobody listens)."""
    callback = _LISTENER.get()
    if callback is not None:
        callback()
