"""Which threads may take a core from which: engines decode, the fabric relays.

Every token an engine produces wakes the fabric: the thread that reads it off the engine,
the neuron, the cortex. Under Linux's default policy a woken thread preempts what runs on
the core it is put on, and where every core is busy that is often the engine's decoding
thread (llama.cpp's loop, ExLlama's generator, ONNX Runtime's pool). On a host whose cores the engine and the
fabric share (one machine with cortex, neuron and llama.cpp; a GPU host whose engine
thread launches the kernels), the engine then loses a little of each step to every
token it sends out.

``cpu_policy = "batch"`` (the neuron's setting, off by default) puts a process under
``SCHED_BATCH``: its wake-ups do not preempt a running thread, they run when a core is
free or at the running thread's next tick, and its threads and child processes inherit
it. The threads an engine starts are put back under the normal policy (:func:`engine`,
:func:`engine_thread`): a relay never preempts them, and they still preempt the relays.

What it was worth (``docs/benchmarks.md``): on one core shared by a cortex and its neuron,
+23% requests/s at 16 connections with the neuron under batch (issue 17 item 2). With
SmolLM2 on two cores, the relays under batch and llama.cpp's loop under the normal policy,
switched round by round in the same processes, neither policy was ahead beyond the rounds'
spread in tokens/s, first token or inter-token latency (issue 17 item 4). Before the
engines' threads were put back, a neuron under batch ran llama.cpp's loop under it too.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from contextlib import suppress
from typing import Literal, ParamSpec, TypeVar

__all__ = ["Policy", "apply", "current", "engine", "engine_thread"]

log = logging.getLogger(__name__)

Policy = Literal["normal", "batch"]
P = ParamSpec("P")
T = TypeVar("T")

_BATCH = getattr(os, "SCHED_BATCH", None)
_OTHER = getattr(os, "SCHED_OTHER", None)


def apply(policy: str, *, who: str = "this process") -> bool:
    """Put the calling thread under ``policy`` (``normal``: out of ``SCHED_BATCH`` if it
    was there); the threads and processes it starts afterwards inherit it. Returns whether
    the policy holds: ``batch`` where Linux's ``SCHED_BATCH`` is missing or refused is
    logged and left."""
    if policy == "normal":
        engine_thread()  # out of batch where it was inherited; nothing otherwise
        return True
    try:
        os.sched_setscheduler(0, _BATCH, os.sched_param(0))  # type: ignore[arg-type]  # 0: this thread
    except (AttributeError, TypeError, OSError) as exc:
        log.warning("cpu_policy = %s is not available here (%s): %s runs as normal", policy, exc, who)
        return False
    return True


def current() -> Policy:
    """The calling thread's policy, as the neuron's setting names it (``normal`` for
    anything but ``SCHED_BATCH``): what a worker process it starts is told to run under."""
    try:
        return "batch" if _BATCH is not None and os.sched_getscheduler(0) == _BATCH else "normal"
    except (AttributeError, OSError):
        return "normal"


def engine_thread() -> None:
    """Put the calling thread, an engine's own, under the normal policy: it preempts the
    relays that it wakes, and they never preempt it. Nothing where the policy is normal
    already."""
    if current() == "batch":
        _to_normal()


def _to_normal() -> None:
    with suppress(OSError):
        os.sched_setscheduler(0, _OTHER, os.sched_param(0))  # type: ignore[arg-type]


def engine(fn: Callable[P, T]) -> Callable[P, T]:
    """``fn`` run with the calling thread under the normal policy, and its own policy
    back afterwards: what ``fn`` starts (an engine's loop thread, built by its
    constructor) runs under the normal policy for good."""

    @functools.wraps(fn)
    def run(*args: P.args, **kwargs: P.kwargs) -> T:
        was = current()
        if was == "batch":
            _to_normal()
        try:
            return fn(*args, **kwargs)
        finally:
            if was == "batch":
                apply("batch", who="the engine's loading thread")

    return run
