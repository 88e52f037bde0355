"""One request on one neuron link, from the cortex's side (:class:`LinkStream`): what
:meth:`.neuron_link.NeuronLink.generate` returns, and what the link's reader feeds."""

from __future__ import annotations

import logging
import math
from dataclasses import replace
from typing import TYPE_CHECKING

import trio

from helexa.protocol import Cancel, EmbedRequest, EmbedResult, GenerateRequest, GenerateResult, ProtocolError, TokenChunk
from helexa.transport import ChannelClosed

from .errors import UpstreamTimeout
from .neuron_reports import UNBOUNDED_MAX_TOKENS, counted_chunk, cut_result

if TYPE_CHECKING:
    from .neuron_link import NeuronLink

log = logging.getLogger("helexa.roles.cortex.neuron_link")


class LinkStream:
    """One request on one neuron link: its buffer, its events, and its lifetime.

    ``async with link.generate(request) as events`` sends the request on entry; iterating
    yields the chunks, then the one result; leaving the context before the result sends
    ``Cancel`` to the neuron. The link's reader pushes into the buffer and never blocks on
    the consumer: text chunks that pile up while the consumer is slow are coalesced into
    one. What the neuron says is held to the request's bounds (:mod:`.neuron_reports`): a
    stream past ``max_tokens`` is cut (a ``"length"`` result, ``Cancel`` sent), the usage
    held to what was counted; nothing after the end reaches the consumer. A class rather
    than an async generator or ``@asynccontextmanager``: it is on every request's path, and
    a generator left suspended after the result must be finalised by trio's GC hook, which
    cost a system task per request. The consumer parks its own task and the reader
    reschedules it, rather than through a ``trio.Event`` made anew for every wait: that is
    once per streamed event.
    """

    __slots__ = ("link", "request", "chunks", "final", "error", "waiter", "woken", "started", "delivered",
                 "generating", "limit", "seen", "cut", "deadline", "timeout")

    def __init__(self, link: "NeuronLink", request: GenerateRequest | EmbedRequest) -> None:
        self.link = link
        self.request = request
        self.chunks: list[TokenChunk] = []
        self.final: GenerateResult | EmbedResult | None = None
        self.error: Exception | None = None
        self.waiter: trio.lowlevel.Task | None = None  # the consumer, parked in wait()
        self.woken = False  # something came while the consumer was not waiting
        self.started = False
        self.delivered = False
        self.generating = type(request) is GenerateRequest
        self.limit = (request.sampling.max_tokens or UNBOUNDED_MAX_TOKENS) if self.generating else 0
        self.seen = 0  # the tokens the chunks counted for, as held to their bounds
        self.cut = False  # ended here (at ``limit``, or past ``deadline``): the neuron is still generating
        self.deadline = math.inf
        """When the link's watch (:meth:`expire`) ends this stream with an :class:`UpstreamTimeout`
        if nothing ended it before: set by the dispatcher for a whole answer's one event
        (``first_token_timeout``) in place of a cancel scope of its own."""
        self.timeout = 0.0  # the timeout that set ``deadline`` (for the error's message)

    # --- the reader's side ----------------------------------------------------------------

    def push(self, chunk: TokenChunk) -> None:
        if not self.generating:
            raise ProtocolError(f"a token chunk for the embedding request {chunk.request_id}", code="unexpected")
        if self.final is not None or self.error is not None:
            return  # after its end (or the cut): nothing more reaches the consumer
        chunk = counted_chunk(chunk)
        if self.seen + chunk.tokens > self.limit:
            log.warning("neuron %s streamed past max_tokens %d: cut", self.link.node_id, self.limit)
            self.cut = True
            self.finish(cut_result(self.request, self.seen))  # type: ignore[arg-type]
            return
        self.seen += chunk.tokens
        self.started = True
        last = self.chunks[-1] if self.chunks else None
        if last is not None and last.tool_calls is None and chunk.tool_calls is None:
            self.chunks[-1] = replace(last, text=last.text + chunk.text, tokens=last.tokens + chunk.tokens)
        else:
            self.chunks.append(chunk)
        self._wake()

    def finish(self, final: GenerateResult | EmbedResult) -> None:
        if self.final is None and self.error is None:
            self.final = final
        self._wake()

    def fail(self, error: Exception) -> None:
        if self.final is None and self.error is None:
            self.error = error
        self._wake()

    def expire(self, now: float) -> None:
        """Past its ``deadline`` with no end: fail it with an :class:`UpstreamTimeout` (the
        neuron is told to stop when the consumer leaves, as for a cut)."""
        if now >= self.deadline and self.final is None and self.error is None:
            self.cut = True
            self.fail(UpstreamTimeout(f"neuron {self.link.node_id} did not start within {self.timeout:g}s"))

    def _wake(self) -> None:
        task = self.waiter
        if task is None:
            self.woken = True
        else:
            self.waiter = None
            trio.lowlevel.reschedule(task)

    # --- the consumer's side --------------------------------------------------------------

    async def __aenter__(self) -> "LinkStream":
        await self.link._open(self)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        link = self.link
        link._close(self)
        if (self.cut or self.final is None and self.error is None) and link.connected:
            with trio.move_on_after(2) as scope:
                scope.shield = True
                try:
                    await link.channel.send(Cancel(self.request.request_id))
                except ChannelClosed:
                    pass

    def __aiter__(self) -> "LinkStream":
        return self

    async def __anext__(self) -> TokenChunk | GenerateResult:
        while True:
            if self.chunks:
                return self.chunks.pop(0)
            if self.final is not None:
                if self.delivered:
                    raise StopAsyncIteration
                self.delivered = True
                assert isinstance(self.final, GenerateResult)
                return self.final
            if self.error is not None:
                raise self.error
            await self.wait()

    async def wait(self) -> None:
        """Until the reader pushed, finished or failed since the last wait (at once, after a
        checkpoint, if it did meanwhile). Cancellable."""
        if self.woken:
            self.woken = False
            await trio.lowlevel.checkpoint()
            return
        self.waiter = trio.lowlevel.current_task()
        await trio.lowlevel.wait_task_rescheduled(self._abort)

    def _abort(self, _: object) -> trio.lowlevel.Abort:
        self.waiter = None
        return trio.lowlevel.Abort.SUCCEEDED
