"""A route for a request's text straight from the engine's own thread to where it goes.

An engine that runs on a thread of its own (llama.cpp's) hands each token to the trio
thread, which turns it into a :class:`~helexa.protocol.TokenChunk` and passes it on. In a
worker process that trio thread does nothing else with it but write it to the neuron, so
each token wakes a sleeping thread for nothing but a hand-off (docs/benchmarks.md, "The
first token's milliseconds"). A consumer that can take chunks from any thread installs a
:class:`TokenTap` with :func:`tap`; a backend that produces on its own thread may then
send its :class:`~helexa.protocol.TokenChunk`\\ s through it from that thread instead of
yielding them. Everything else (the request's :class:`~helexa.protocol.GenerateResult`,
its errors) still comes out of the backend's generator on the trio thread, after every
chunk the tap was given. Backends that do not use a tap simply yield as before: a tap is
an offer, never a requirement.

Like :mod:`.start_signal`, the tap lives in a :mod:`contextvars` variable, so it belongs to
the one request's trio task and never leaks to another request.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Protocol

from helexa.protocol import TokenChunk


class TokenTap(Protocol):
    """Where a request's chunks go, callable from any thread (one at a time per request)."""

    def send(self, chunk: TokenChunk) -> bool:
        """Pass ``chunk`` on, after every chunk sent before it. False: nobody reads any more
        (the engine should stop the request)."""

    def started(self) -> None:
        """The engine started on the request (what :func:`.start_signal.report` says on the
        trio thread); called only while :func:`.start_signal.listening`."""


_TAP: ContextVar[TokenTap | None] = ContextVar("helexa_token_tap", default=None)


@contextmanager
def tap(route: TokenTap) -> Iterator[None]:
    """Offer ``route`` to the backend serving the request run inside this block."""
    token = _TAP.set(route)
    try:
        yield
    finally:
        _TAP.reset(token)


def current() -> TokenTap | None:
    """The tap offered to the current request, if any."""
    return _TAP.get()
