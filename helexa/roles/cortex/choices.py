"""``n`` choices for one request: ``n`` generations run side by side, as one event stream.

OpenAI's ``n`` asks for several answers to one prompt. Every backend answers one, so the
edge runs ``n`` fabric requests (ids ``<id>-0`` ... ``<id>-<n-1>``; with a ``seed``, choice
``i`` samples with ``seed + i`` so that the choices differ yet repeat) through the metered
path at once (they may land on different neurons; each has its ledger record), and
merges their token chunks, each tagged with its choice's index. As OpenAI counts it, the
prompt and the request are counted once per call: choice 0 reserves and bills the prompt
and its answer and takes the call's one ``rpm`` request, every other choice its answer
only (its result's usage has no prompt tokens), so the sum of the choices' usage is the
request's. Each choice still holds a ``max_concurrent`` slot while it runs (it is a
generation on a neuron). Each choice's :class:`GenerateResult`
exists once its ledger record does, so the results come after the block
(:attr:`Choices.results`), as a single generation's does.

Each choice runs whole in its own task, so that ``n`` over the model's slots queues the
later choices behind the earlier ones rather than deadlocking; the block is entered once
every choice has started (so a refusal of any one is still raised before a response
begins). A failure of any choice fails the request (the others are cancelled), raised
bare, as a single generation's failure would be.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
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


def generate(run: Run, request: GenerateRequest, n: int = 1,
             **kwargs: Any) -> AbstractAsyncContextManager[Choices | "_One"]:
    """Run the ``n`` choices of ``request`` (see the module docstring): ``async with
    generate(...) as choices``, then iterate ``choices`` for ``(index, chunk)`` pairs; after
    the block ``choices.results`` holds each choice's result.

    Args:
        run: starts one generation (``Metering.generate`` with its caller); ``kwargs`` go to it.
        request: the request as the client made it.
        n: choices wanted.

    Raises:
        what ``run`` raises, before the context is entered (routing, quotas) or from iteration.
    """
    if n == 1:
        return _One(run(request, **kwargs))
    return _several(run, request, n, **kwargs)


class _One:
    """One choice (nearly every request): the generation itself, its chunks tagged with
    index 0. A class rather than a generator-based context and an async generator around
    the generation: it is on every request's path, and each generator layer cost a
    measurable share of a short request (docs/benchmarks.md, 2026-11-30, item 2)."""

    __slots__ = ("_context", "_gen", "results")

    def __init__(self, context: AbstractAsyncContextManager[Generation]) -> None:
        self._context = context
        self._gen: Generation | None = None
        self.results: list[GenerateResult] = []

    async def __aenter__(self) -> "_One":
        self._gen = await self._context.__aenter__()
        return self

    async def __aexit__(self, *exc_info: Any) -> bool | None:
        suppressed = await self._context.__aexit__(*exc_info)
        if exc_info[0] is None:
            assert self._gen is not None
            self.results = [self._gen.result]  # type: ignore[list-item]
        return suppressed

    def __aiter__(self) -> "_One":
        return self

    async def __anext__(self) -> tuple[int, TokenChunk]:
        assert self._gen is not None
        return 0, await self._gen.__anext__()  # type: ignore[attr-defined]


@asynccontextmanager
async def _several(run: Run, request: GenerateRequest, n: int, **kwargs: Any) -> AsyncIterator[Choices]:
    """``n`` > 1 choices, each whole in its own task (see the module docstring)."""
    # Each choice runs whole in its own task: the orchestrator queues a request until a slot
    # is free, so a choice that holds its slot until every other one has started would
    # deadlock wherever n is over the model's slots (n=3 on a 2-slot llama.cpp). A choice
    # that starts early runs on; its chunks wait in the channel.
    send, receive = trio.open_memory_channel[tuple[int, Any]](math.inf)
    gens: list[Generation | None] = [None] * n
    early: list[BaseException] = []
    started = 0
    decided = trio.Event()  # every choice started, or one failed before it could
    if kwargs.get("on_wait") is not None:
        kwargs["on_wait"] = _one_at_a_time(kwargs["on_wait"])  # choices may wait at once
    kwargs["copies"] = n  # quotas refuse the whole where no wait could admit every choice
    kwargs["group"] = gens  # choice 0 bills the prompt when any choice produced output
    kwargs["admitted"] = trio.Event()  # choice 0, which takes the call's rpm request, admitted first

    async def one(index: int, fabric: GenerateRequest, out: trio.MemorySendChannel) -> None:
        nonlocal started
        async with out:
            try:
                async with run(fabric, choice=index, **kwargs) as gen:
                    gens[index] = gen
                    started += 1
                    if started == n:
                        decided.set()
                    async for chunk in gen:
                        await out.send((index, chunk))
            except Exception as exc:  # handed to the reader (or raised before the block), bare
                if gens[index] is None:
                    early.append(exc)
                    decided.set()
                else:
                    await out.send((-1, exc))

    failed: BaseException | None = None
    choices = Choices(_merged(receive))
    async with trio.open_nursery() as nursery:
        async with send:
            for i, fabric in enumerate(split(request, n)):
                nursery.start_soon(one, i, fabric, send.clone())
        await decided.wait()
        if early:
            failed = early[0]
            nursery.cancel_scope.cancel()
        else:
            try:
                yield choices
            except Exception as exc:  # re-raised bare below, not wrapped in the nursery's group
                failed = exc
                nursery.cancel_scope.cancel()
    if failed is not None:
        raise failed
    choices.results = [g.result for g in gens if g is not None]  # every record is durable now


def _one_at_a_time(on_wait: Any) -> Any:
    lock = trio.Lock()

    async def serialised(status: Any) -> None:
        async with lock:
            await on_wait(status)

    return serialised


async def _merged(receive: trio.MemoryReceiveChannel) -> AsyncIterator[tuple[int, TokenChunk]]:
    async with receive:
        async for index, item in receive:
            if index < 0:
                raise item
            yield index, item
