"""``n`` choices for one request: ``n`` generations run side by side, as one event stream.

OpenAI's ``n`` asks for several answers to one prompt. Every backend answers one, so the
edge runs ``n`` fabric requests (ids ``<id>-0`` ... ``<id>-<n-1>``; with a ``seed``, choice
``i`` samples with ``seed + i`` so that the choices differ yet repeat) through the
orchestrator at once (they may land on different neurons), and merges their events,
each tagged with its choice's index. Usage is summed by whoever renders the answer.

A failure of any choice fails the request (the others are cancelled), raised bare, as a
single generation's failure would be.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from dataclasses import replace
from typing import Any

import trio

from helexa.protocol import GenerateRequest, GenerateResult, TokenChunk
from helexa.protocol.inference import SEED_MAX, SEED_MIN

Event = TokenChunk | GenerateResult
Run = Callable[..., AbstractAsyncContextManager[AsyncIterator[Event]]]
"""``Orchestrator.generate``: ``run(request, **kwargs)`` is a context holding its events."""


def split(request: GenerateRequest, n: int) -> list[GenerateRequest]:
    """The ``n`` fabric requests for ``request`` (itself when ``n`` is 1). Pure."""
    if n == 1:
        return [request]
    out = []
    for i in range(n):
        seed = request.sampling.seed
        if seed is not None:
            seed = seed + i if seed + i <= SEED_MAX else SEED_MIN + (seed + i - SEED_MAX - 1)
        out.append(replace(request, request_id=f"{request.request_id}-{i}",
                           sampling=replace(request.sampling, seed=seed)))
    return out


@asynccontextmanager
async def generate(run: Run, request: GenerateRequest, n: int = 1,
                   **kwargs: Any) -> AsyncIterator[AsyncIterator[tuple[int, Event]]]:
    """Run the ``n`` choices of ``request``; the context holds ``(index, event)`` pairs.

    Args:
        run: starts one generation (``Orchestrator.generate``); ``kwargs`` go to it.
        request: the request as the client made it.
        n: choices wanted.

    Raises:
        what ``run`` raises, before the context is entered (routing) or from iteration.
    """
    if n == 1:
        async with run(request, **kwargs) as gen:
            yield _tagged(gen)
        return
    async with AsyncExitStack() as stack:
        gens = [await stack.enter_async_context(run(r, **kwargs)) for r in split(request, n)]
        send, receive = trio.open_memory_channel[tuple[int, Any]](math.inf)
        async with trio.open_nursery() as nursery:
            async def pump(index: int, gen: AsyncIterator[Event], out: trio.MemorySendChannel) -> None:
                async with out:
                    try:
                        async for event in gen:
                            await out.send((index, event))
                    except Exception as exc:  # handed to the reader, raised there bare
                        await out.send((-1, exc))

            async with send:
                for i, gen in enumerate(gens):
                    nursery.start_soon(pump, i, gen, send.clone())
            yield _merged(receive)
            nursery.cancel_scope.cancel()


async def _tagged(gen: AsyncIterator[Event]) -> AsyncIterator[tuple[int, Event]]:
    async for event in gen:
        yield 0, event


async def _merged(receive: trio.MemoryReceiveChannel) -> AsyncIterator[tuple[int, Event]]:
    async with receive:
        async for index, item in receive:
            if index < 0:
                raise item
            yield index, item
