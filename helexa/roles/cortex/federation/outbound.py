"""The asking side of a federated request: a remote generation read frame by frame, its
receipt verified and recorded when it ends."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import trio

from helexa.mesh import MessageStream, StreamClosed, StreamTimeout
from helexa.protocol import Cancel, GenerateRequest, GenerateResult, InferenceError, ProtocolError, TokenChunk
from helexa.protocol.federation import Receipt, Refusal, cost_of

from .errors import PeerFailed, PeerRefused, PeerVanished
from .ledger import CONSUMED, Ledger
from .peer_usage import (UNBOUNDED_MAX_TOKENS, InvalidAnswer, bounded_prompt, bounded_result, chunk_tokens, cut_usage,
                         estimated_prompt, result_tokens)
from .receipts import verify_receipt

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class AskTimeouts:
    open: float = 5.0
    """Opening the stream (dial included)."""
    first_frame: float = 120.0
    """From sending the request to the first answer frame (covers a cold load)."""
    idle: float = 60.0
    """Between two frames of an answer."""
    send: float = 10.0
    receipt: float = 5.0
    """For the receipt after the result."""
    cancel: float = 1.0
    """For sending Cancel and collecting the receipt when we stop early (shielded)."""


@dataclass(frozen=True, slots=True)
class Expectation:
    """What the receipt must agree with: the request and the announced prices."""

    server_peer_id: str
    client_peer_id: str
    request_id: str
    model_id: str
    price_input: float
    price_output: float


def refusal_error(refusal: Refusal, peer_id: str) -> PeerRefused:
    return PeerRefused(f"peer {peer_id} refused: {refusal.message}", code=refusal.code, peer_id=peer_id,
                       retry_after=refusal.retry_after)


class ReceiptKeeper:
    """Reads the receipt that ends a stream, verifies it, and records it (flagged if it
    fails, or as a flagged stand-in if none came).

    A stand-in bills what the asker itself counted: the tokens it saw, and, once any came,
    the prompt: the exact count the answer carried (its first chunk's, or its result's
    usage; held to the asker's bounds, :attr:`prompt_tokens`), else the asker's estimate
    (a quarter of the prompt's bytes, as a cut stream's); its flag says which."""

    def __init__(self, ledger: Ledger, expect: Expectation, clock,  # type: ignore[no-untyped-def]
                 request: GenerateRequest | None = None) -> None:
        self._ledger = ledger
        self._expect = expect
        self._clock = clock
        self._request = request
        self.prompt_tokens: int | None = None
        """The prompt's exact count as the answer carried it, held to the asker's bounds (set
        by :class:`RemoteGeneration`): what a stand-in receipt bills."""
        self.started_at = clock()
        self.receipt: Receipt | None = None
        self.problems: list[str] = []
        self.done = False
        self.received = False
        """The receipt came over the stream (the exchange ended where both sides agree)."""

    @property
    def request_id(self) -> str:
        return self._expect.request_id

    def collect_buffered(self, stream: MessageStream, *, tokens_seen: int, outcome: str) -> bool:
        """:meth:`collect` without waiting, when the receipt is here already (the peer
        sends it in the result's write, so nearly always): no await, hence no cancel
        scope or shield needed around it. False (nothing done) when it must be waited for."""
        if self.done:
            return True
        try:
            receipt = _buffered_receipt(stream)
        except trio.WouldBlock:
            return False
        except ProtocolError:
            receipt = None
        self.done = True
        self._keep(receipt, tokens_seen, outcome)
        return True

    async def collect(self, stream: MessageStream | None, timeout: float, *, tokens_seen: int, outcome: str) -> None:
        """Read (from ``stream``, unless None), verify and record the receipt; once."""
        if self.done:
            return
        if stream is not None and self.collect_buffered(stream, tokens_seen=tokens_seen, outcome=outcome):
            return
        self.done = True
        receipt: Receipt | None = None
        if stream is not None:
            try:
                with trio.CancelScope(deadline=trio.current_time() + timeout):
                    while receipt is None:
                        msg = await stream.receive(timeout=timeout)
                        if isinstance(msg, Receipt):
                            receipt = msg
            except (StreamClosed, StreamTimeout, ProtocolError):
                pass
        self._keep(receipt, tokens_seen, outcome)

    def _keep(self, receipt: Receipt | None, tokens_seen: int, outcome: str) -> None:
        """Verify and record ``receipt`` (a flagged stand-in for None). Never awaits: the
        ledger's append is made on this thread, so no cancellation can skip it."""
        e = self._expect
        self.received = receipt is not None
        if receipt is None:
            prompt, whose = self._own_prompt(tokens_seen)
            self.problems = [f"no receipt from the serving peer; the asker's own count (prompt: {whose})"]
            receipt = Receipt(e.request_id, e.model_id, prompt, tokens_seen, e.price_input, e.price_output,
                              cost_of(prompt, tokens_seen, e.price_input, e.price_output), self.started_at,
                              self._clock(), e.server_peer_id, e.client_peer_id, b"", outcome)
        else:
            self.problems = verify_receipt(
                receipt, server_peer_id=e.server_peer_id, client_peer_id=e.client_peer_id, request_id=e.request_id,
                model_id=e.model_id, completion_tokens_seen=tokens_seen, price_input=e.price_input,
                price_output=e.price_output, window=(self.started_at, self._clock()))
        self.receipt = receipt
        if self.problems:
            log.warning("federation: receipt for %s from %s flagged: %s", e.request_id, e.server_peer_id,
                        "; ".join(self.problems))
        self._ledger.keep(CONSUMED, receipt, flagged=bool(self.problems), flag_reason="; ".join(self.problems))


    def _own_prompt(self, tokens_seen: int) -> tuple[int, str]:
        """The prompt tokens a stand-in bills, and what they are: none before any output
        (as a portal bills a cut stream), else the exact count the answer carried, else the
        asker's estimate."""
        if self.prompt_tokens is not None:
            return self.prompt_tokens, "exact, as the answer carried it"
        if not tokens_seen or self._request is None:
            return 0, "none, no output came"
        return estimated_prompt(self._request), "estimated, a quarter of its bytes"


def _buffered_receipt(stream: MessageStream) -> Receipt:
    """The receipt among the frames buffered on ``stream`` (those before it skipped, as
    :meth:`ReceiptKeeper.collect` skips them). Raises ``trio.WouldBlock`` when it has not
    come whole yet, ``ProtocolError`` for a malformed frame."""
    while True:
        msg = stream.receive_nowait()
        if isinstance(msg, Receipt):
            return msg


class RemoteGeneration:
    """An async iterator of a peer's ``TokenChunk``s then its ``GenerateResult``.

    ``tokens_seen`` counts what the asker can account for (:mod:`.peer_usage`): each
    chunk's tokens, at most one a byte it carries, then the result's own text; the
    result's usage comes out held to those bounds and the request's. A peer that streams
    past the request's ``max_tokens`` (else :data:`.peer_usage.UNBOUNDED_MAX_TOKENS`) is
    cut there (a ``"length"`` result, ``Cancel`` sent).

    Raises (from ``__anext__``):
        PeerVanished: the stream broke, timed out or carried garbage mid-answer, or the
            answer claimed what none can (a negative token count).
        PeerFailed: the peer reported an ``InferenceError``.
    """

    def __init__(self, stream: MessageStream, first: object, keeper: ReceiptKeeper, timeouts: AskTimeouts,
                 request: GenerateRequest) -> None:
        self._stream = stream
        self._request = request
        self._pending: object | None = first
        self._keeper = keeper
        self._t = timeouts
        self.peer_id = stream.remote_peer
        self.tokens_seen = 0
        self.finished = False
        self.cancelled = False
        self.failed: Exception | None = None
        """Set by :meth:`fail`: the answer ends with it at its next frame."""

    def fail(self, error: Exception) -> None:
        """End the answer with ``error`` at its next frame (the cortex's stop, past its
        grace): the peer is sent ``Cancel`` and its receipt collected, then the consumer
        raises ``error``, so its surface ends the answer in its own shape before the
        connections close (a local neuron's stream is failed the same way)."""
        if not self.finished:
            self.failed = error
            interrupt = getattr(self._stream, "interrupt", None)
            if interrupt is not None:  # waiting for a frame (an answer not streamed, a slow one): now
                interrupt()

    @property
    def receipt(self) -> Receipt | None:
        """The receipt as the ledger recorded it (a flagged stand-in if none came), once
        the generation finished; None before."""
        return self._keeper.receipt

    @property
    def clean(self) -> bool:
        """The answer and its receipt were read whole: the stream may carry another request."""
        return self._keeper.received and not self.cancelled

    def __aiter__(self) -> "RemoteGeneration":
        return self

    async def __anext__(self) -> TokenChunk | GenerateResult:
        if self.failed is not None and not self.finished:
            await self.finish()
            raise self.failed
        if self.finished:
            await self._keeper.collect(self._stream, self._t.receipt, tokens_seen=self.tokens_seen, outcome="ok")
            raise StopAsyncIteration
        if self._pending is not None:
            msg, self._pending = self._pending, None
        else:
            try:
                msg = await self._stream.receive(timeout=self._t.idle)
            except (StreamClosed, StreamTimeout, ProtocolError) as exc:
                if self.failed is not None and isinstance(exc, StreamTimeout):
                    await self.finish()  # interrupted by fail(): Cancel, then the peer's receipt
                    raise self.failed from None
                self.finished = True
                with trio.CancelScope(shield=True):
                    await self._keeper.collect(None, 0, tokens_seen=self.tokens_seen, outcome="error")
                raise PeerVanished(f"peer {self.peer_id} went away mid-answer: {exc}", peer_id=self.peer_id) from None
        if self.failed is not None and isinstance(msg, TokenChunk):
            await self.finish()  # Cancel, then the peer's receipt (bounded, shielded)
            raise self.failed
        try:
            if isinstance(msg, TokenChunk):
                tokens = chunk_tokens(msg)
                limit = self._request.sampling.max_tokens or UNBOUNDED_MAX_TOKENS
                if msg.prompt_tokens is not None:  # the first chunk's: held to the asker's bounds
                    msg = self._prompt_counted(msg)
                if self.tokens_seen + tokens > limit:
                    return await self._cut(limit)
                self.tokens_seen += tokens
                return msg
            if isinstance(msg, GenerateResult):
                self.finished = True
                self.tokens_seen += result_tokens(msg)
                result = bounded_result(msg, self._request, self.tokens_seen)
                self._keeper.prompt_tokens = result.usage.prompt_tokens
                if self._request.wants_tools:
                    # A tool grammar's JSON cut short shows nothing, its tokens held to max_tokens
                    # alone (peer_usage.bounded_usage): what is billed is what the receipt may bill.
                    self.tokens_seen = max(self.tokens_seen, result.usage.completion_tokens)
                return result
        except InvalidAnswer as exc:
            await self._invalid(str(exc))
        self.finished = True
        if isinstance(msg, InferenceError):
            await self._keeper.collect(self._stream, self._t.receipt, tokens_seen=self.tokens_seen, outcome="error")
            raise PeerFailed(f"peer {self.peer_id}: {msg.message}", code=msg.code, retryable=msg.retryable,
                             peer_id=self.peer_id)
        if isinstance(msg, Refusal):
            raise refusal_error(msg, self.peer_id)
        await self._stream.reset()
        raise PeerVanished(f"peer {self.peer_id} sent an unexpected {type(msg).__name__}", peer_id=self.peer_id)

    def _prompt_counted(self, chunk: TokenChunk) -> TokenChunk:
        """``chunk`` (the first) with its prompt count held to the asker's bounds
        (:func:`.peer_usage.bounded_prompt`), which the receipt keeper and the cut keep."""
        assert chunk.prompt_tokens is not None
        prompt = self._keeper.prompt_tokens = bounded_prompt(chunk.prompt_tokens, self._request)
        return chunk if prompt == chunk.prompt_tokens else replace(chunk, prompt_tokens=prompt)

    async def _cut(self, limit: int) -> GenerateResult:
        """The peer streamed past the request's ``max_tokens`` (it ignored the limit): the
        answer ends here, as one that ran out of tokens, and the peer is sent ``Cancel``.
        Its usage is what the asker counted (the prompt as a cut stream's: the exact count
        the first chunk carried, else a quarter of its bytes); the peer's receipt is
        recorded as it comes, flagged if implausible."""
        log.warning("federation: peer %s streamed past max_tokens %d for %s: cut", self.peer_id, limit,
                    self._keeper.request_id)
        await self.finish()
        return GenerateResult(self._keeper.request_id, "length",
                              cut_usage(self._request, self.tokens_seen, self._keeper.prompt_tokens))

    async def _invalid(self, what: str) -> None:
        """The peer sent ``what`` (no answer can): its stream is reset, the exchange
        recorded as an error (the receipt a flagged stand-in), and the answer ends."""
        self.finished = True
        with trio.CancelScope(shield=True):
            await self._stream.reset()
            await self._keeper.collect(None, 0, tokens_seen=self.tokens_seen, outcome="error")
        log.warning("federation: peer %s sent %s for %s", self.peer_id, what, self._keeper.request_id)
        raise PeerVanished(f"peer {self.peer_id} sent an invalid answer: {what}", peer_id=self.peer_id)

    async def finish(self) -> None:
        """Called when the consumer leaves (done, failed or cancelled): if the answer did
        not end, send Cancel across the hop; then collect the receipt. Bounded, shielded."""
        if self._keeper.done:
            return  # the consumer read to the end: the receipt is in the ledger
        if self.finished and self._keeper.collect_buffered(self._stream, tokens_seen=self.tokens_seen, outcome="ok"):
            return  # it came with the result (nearly always): nothing to wait for, or shield
        budget = self._t.cancel if not self.finished else self._t.receipt
        with trio.move_on_after(budget + 0.5) as scope:
            scope.shield = True
            if not self.finished:
                self.finished = self.cancelled = True
                try:
                    await self._stream.send(Cancel(self._keeper.request_id), timeout=self._t.cancel)
                except (StreamClosed, StreamTimeout):
                    pass
                await self._keeper.collect(self._stream, self._t.cancel, tokens_seen=self.tokens_seen,
                                           outcome="cancelled")
            else:
                await self._keeper.collect(self._stream, self._t.receipt, tokens_seen=self.tokens_seen, outcome="ok")
        if not self._keeper.done:
            with trio.CancelScope(shield=True):
                await self._keeper.collect(None, 0, tokens_seen=self.tokens_seen, outcome="cancelled")
