"""``n`` choices for one request: ``n`` generations run side by side, as one event stream.

OpenAI's ``n`` asks for several answers to one prompt. Every backend answers one, so the
edge runs ``n`` fabric requests (ids ``<id>-0`` ... ``<id>-<n-1>``; with a ``seed``, choice
``i`` samples with ``seed + i`` so that the choices differ yet repeat) through the metered
path at once (they may land on different neurons; each is reserved, billed and recorded
as the generation it is), and merges their token chunks, each tagged with its choice's
index. Each choice's :class:`GenerateResult` exists once its ledger record does, so the
results come after the block (:attr:`Choices.results`), as a single generation's does.

A failure of any choice fails the request (the others are cancelled), raised bare, as a
single generation's failure would be.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from dataclasses import replace
from typing import Any, Protocol

import trio

from helexa.protocol import GenerateRequest, GenerateResult, TokenChunk
from helexa.protocol.inference import SEED_MAX, SEED_MIN


class Generation(Protocol):
    """One metered generation (:class:`~.portal.metering.MeteredGeneration`): its chunks,
    then its ``result`` once its context has exited."""

    result: GenerateResult | None

    def __aiter__(self) -> AsyncIterator[TokenChunk]: ...


Run = Callable[..., AbstractAsyncContextManager[Generation]]
"""``run(request, **kwargs)`` is a context holding one generation (``Metering.generate``)."""


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


class Choices:
    """What :func:`generate` yields: iterate it for ``(index, chunk)`` pairs; after the
    block, :attr:`results` holds each choice's result, in index order."""

    def __init__(self, chunks: AsyncIterator[tuple[int, TokenChunk]]) -> None:
        self._chunks = chunks
        self.results: list[GenerateResult] = []

    def __aiter__(self) -> AsyncIterator[tuple[int, TokenChunk]]:
        return self._chunks


@asynccontextmanager
async def generate(run: Run, request: GenerateRequest, n: int = 1, **kwargs: Any) -> AsyncIterator[Choices]:
    """Run the ``n`` choices of ``request`` (see the module docstring).

    Args:
        run: starts one generation (``Metering.generate`` with its caller); ``kwargs`` go to it.
        request: the request as the client made it.
        n: choices wanted.

    Raises:
        what ``run`` raises, before the context is entered (routing, quotas) or from iteration.
    """
    if n == 1:
        async with run(request, **kwargs) as gen:
            choices = Choices(_tagged(gen))
            yield choices
        choices.results = [gen.result]
        return
    async with AsyncExitStack() as stack:
        gens = [await stack.enter_async_context(run(r, **kwargs)) for r in split(request, n)]
        send, receive = trio.open_memory_channel[tuple[int, Any]](math.inf)
        async with trio.open_nursery() as nursery:
            async def pump(index: int, gen: Generation, out: trio.MemorySendChannel) -> None:
                async with out:
                    try:
                        async for chunk in gen:
                            await out.send((index, chunk))
                    except Exception as exc:  # handed to the reader, raised there bare
                        await out.send((-1, exc))

            async with send:
                for i, gen in enumerate(gens):
                    nursery.start_soon(pump, i, gen, send.clone())
            choices = Choices(_merged(receive))
            yield choices
            nursery.cancel_scope.cancel()
    choices.results = [g.result for g in gens]  # every record is durable now


async def _tagged(gen: Generation) -> AsyncIterator[tuple[int, TokenChunk]]:
    async for chunk in gen:
        yield 0, chunk


async def _merged(receive: trio.MemoryReceiveChannel) -> AsyncIterator[tuple[int, TokenChunk]]:
    async with receive:
        async for index, item in receive:
            if index < 0:
                raise item
            yield index, item
