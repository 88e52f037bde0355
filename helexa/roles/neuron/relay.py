"""Relaying a generation's events to the cortex, in fewer frames when they pile up.

Every frame costs a websocket send on the neuron and a receive, decode and dispatch on the
cortex (what that costs: docs/benchmarks.md, "Relaying tokens in fewer frames").
A backend that produces tokens faster than they can be sent one per frame (the
``synthetic`` backend, a proxied server's burst of chunks, llama.cpp's thread handing over
several tokens at once) would pay that per token. :func:`relay` reads the backend in its
own task and, each time the previous send is done, sends whatever is waiting as one
:class:`TokenChunk` (texts joined, token counts summed). After the first frame it also
waits while the backend keeps producing, tick after tick, for at most :data:`BATCH_TICKS`
scheduler ticks (fewer frames per stream, more streams/s; figures in docs/benchmarks.md).
The first token goes out as soon as it exists, sent by the task that read it before it reads
the backend again: the caller's own task, which reads the first event itself and starts the
producer task only once it is sent (so a request reaches its backend, a worker's pipe or a
proxied server, with no task start and no scheduler pass before it). So does a later token
that comes more than :data:`FAST_S` after the relay was last ready for it (every real
model's), while the sender is idle and the last send did not have to wait for the link: one
wake-up of the sender task and one pass of the scheduler less per token. A slow token that
finds the sender busy, or a link that made the last send wait, goes to the sender as
before, at once and alone, so tokens still queue up (and join) behind a slow send rather
than in front of it.

:func:`collect` is the non-streaming case: the client sees nothing before the end, so the
whole generation goes out as one :class:`GenerateResult` (one frame instead of one per
token; a failure before it is still retryable elsewhere). An answer longer than
:data:`COLLECT_FLUSH_CHARS` goes out in pieces, so no frame nears the frame limit.

:func:`merge` is the pure part: it joins runs of plain text chunks and leaves everything
else (tool-call chunks, the final result) in order.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace

import trio

from helexa.protocol import GenerateResult, TokenChunk
from helexa.runtime import GenerationEvent

BATCH_TICKS = 8
"""Scheduler ticks a frame waits for more tokens while the backend keeps producing them."""

FAST_S = 0.001
"""An event that follows the one before it within this time comes from a backend faster than
a send: the sender waits for more (:func:`_while_producing`). One that comes later (every real
model's tokens) goes out at once, without idle scheduler ticks of its own, from the task that
read it when it can (see the module docstring). A send that took this long or longer had to
wait for the link."""


def merge(events: list[GenerationEvent]) -> list[GenerationEvent]:
    """Join consecutive plain-text :class:`TokenChunk`\\ s (same request, no tool calls;
    their logprobs joined too)."""
    out: list[GenerationEvent] = []
    for event in events:
        prev = out[-1] if out else None
        if (isinstance(event, TokenChunk) and isinstance(prev, TokenChunk) and not event.tool_calls
                and not prev.tool_calls and prev.request_id == event.request_id):
            out[-1] = TokenChunk(prev.request_id, prev.text + event.text, prev.tokens + event.tokens,
                                 logprobs=_joined(prev.logprobs, event.logprobs), prompt_tokens=prev.prompt_tokens)
        else:
            out.append(event)
    return out


def _joined(a: tuple | None, b: tuple | None) -> tuple | None:
    return a + b if a and b else a or b


async def relay(events: AsyncIterator[GenerationEvent], send: Callable[[GenerationEvent], Awaitable[None]],
                on_first: Callable[[], None] = lambda: None) -> None:
    """Send every event of ``events`` through ``send``, merging what queued up meanwhile.

    ``on_first`` is called just before the first event is sent (the generation has then
    started, so a failure after it cannot be retried elsewhere). An exception from the
    backend is raised once every event produced before it has been sent; one from ``send``
    stops the backend and is raised at once. Both come out bare, never in a group.
    Cancellation stops both sides. The caller closes ``events``. ``events`` is read by
    two tasks in turn (the caller's for the first event, then the producer's), so it
    must not hold a cancel scope or a nursery across its yields (trio's rule for async
    generators anyway; no backend does).
    """
    try:
        first = await events.__anext__()
    except StopAsyncIteration:
        return
    on_first()
    began = trio.current_time()
    await send(first)  # (an exception from it, or from the backend so far, is raised as it is)
    ready = trio.current_time()  # when the producer goes back to the backend
    pending: list[GenerationEvent] = []
    failure: list[BaseException] = []
    error: list[BaseException] = []
    # "sending": the sender task is sending a batch; "direct": the last send did not wait
    # for the link (so the producer may send a slow event itself).
    state = {"done": False, "wake": trio.Event(), "slow": False, "sending": False, "direct": ready - began < FAST_S}

    async def produce() -> None:
        nonlocal ready
        try:
            async for event in events:
                now = trio.current_time()
                slow = now - ready >= FAST_S
                if slow and state["direct"] and not pending and not state["sending"]:
                    # Sent from here, before the backend is read again (for a proxied
                    # server: a read that finds nothing and registers with the poller) and
                    # without waking the sender for it.
                    try:
                        await send(event)
                    except Exception as exc:  # raised bare below, not wrapped in an ExceptionGroup
                        error.append(exc)
                        nursery.cancel_scope.cancel()
                        return
                    ready = trio.current_time()
                    state["direct"] = ready - now < FAST_S
                    continue
                state["slow"], ready = slow, now
                pending.append(event)
                state["wake"].set()  # type: ignore[union-attr]
        except Exception as exc:  # re-raised bare by the sender, after what came before it
            failure.append(exc)
        finally:
            state["done"] = True
            state["wake"].set()  # type: ignore[union-attr]

    async with trio.open_nursery() as nursery:
        nursery.start_soon(produce)
        try:
            while True:
                await state["wake"].wait()  # type: ignore[union-attr]
                if pending and not state["slow"]:
                    await _while_producing(pending, lambda: bool(state["done"]))
                state["wake"] = trio.Event()
                batch = pending[:]
                pending.clear()
                if batch:
                    state["sending"] = True
                    began = trio.current_time()
                    for event in merge(batch):
                        await send(event)
                    state["sending"] = False
                    state["direct"] = trio.current_time() - began < FAST_S
                if state["done"] and not pending:
                    break
        except Exception as exc:  # raised bare below, not wrapped in an ExceptionGroup
            error.append(exc)
            nursery.cancel_scope.cancel()
    if error:
        raise error[0]
    if failure:
        raise failure[0]


async def _while_producing(pending: list[GenerationEvent], done: Callable[[], bool]) -> None:
    """Yield while the backend keeps adding to ``pending``, for at most
    :data:`BATCH_TICKS` scheduler ticks (~20 us each). Two idle ticks in a row end the
    wait: trio runs a tick's tasks in a random order, so one tick may run this task before
    the producer."""
    idle = 0
    for _ in range(BATCH_TICKS):
        if done() or idle == 2:
            return
        ready = len(pending)
        await trio.lowlevel.checkpoint()
        idle = idle + 1 if len(pending) == ready else 0


COLLECT_FLUSH_CHARS = 256 * 1024
"""A non-streaming answer longer than this goes out in pieces of about this size, so no
frame nears the control plane's frame limit however long the answer."""


async def collect(events: AsyncIterator[GenerationEvent], send: Callable[[GenerationEvent], Awaitable[None]],
                  on_first: Callable[[], None] = lambda: None) -> None:
    """Send a non-streaming generation as one :class:`GenerateResult` holding all its
    text and tool calls (or, past :data:`COLLECT_FLUSH_CHARS`, text chunks and then the
    result; ``on_first`` is called before the first of those goes out). The result says
    when the first text came, from this call (``first_token_s``).

    Raises what the backend raises, or :class:`ValueError` if it ended without a result.
    """
    parts: list[str] = []
    size = 0
    tokens = 0  # in the parts not yet sent (a cut answer is billed for what was sent)
    calls: list = []
    logprobs: list = []
    rid = ""
    prompt = None  # the first chunk's count of the prompt, for the first piece sent
    started, first = trio.current_time(), None
    async for event in events:
        if isinstance(event, GenerateResult):
            if not parts and not calls and not logprobs and first is None:
                await send(event)
                return
            parts.append(event.text)
            calls.extend(event.tool_calls or ())
            logprobs.extend(event.logprobs or ())
            await send(replace(event, text="".join(parts), tool_calls=tuple(calls) or None,
                               logprobs=tuple(logprobs) or None,
                               first_token_s=None if first is None else first - started))
            return
        if first is None:
            first = trio.current_time()
            prompt = event.prompt_tokens
        rid = event.request_id
        parts.append(event.text)
        size += len(event.text)
        tokens += event.tokens
        calls.extend(event.tool_calls or ())
        logprobs.extend(event.logprobs or ())
        if size >= COLLECT_FLUSH_CHARS:
            on_first()
            await send(TokenChunk(rid, "".join(parts), tokens, logprobs=tuple(logprobs) or None, prompt_tokens=prompt))
            parts, size, tokens, logprobs, prompt = [], 0, 0, [], None
    raise ValueError("the backend ended without a result")
