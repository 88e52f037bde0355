"""The serving side of federated requests: an inbound stream carries one request after
another (hello, request, the answer, a signed receipt), each under policy, run by the
local handler the cortex provides. The asker reuses a stream whose last exchange ended
cleanly (a new libp2p stream costs ~10 ms, :mod:`.service`); the stream ends when the
asker closes it or leaves it idle for ``ServeTimeouts.idle``."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, replace

import trio
from opentelemetry import trace
from opentelemetry.trace import SpanKind

from helexa import telemetry
from helexa.identity import Identity
from helexa.mesh import MessageStream, StreamClosed, StreamTimeout
from helexa.protocol import (
    Cancel,
    EmbedRequest,
    EmbedResult,
    GenerateRequest,
    GenerateResult,
    InferenceError,
    ProtocolError,
    TokenChunk,
)
from helexa.protocol.compat import for_earlier
from helexa.protocol.federation import FEDERATION_VERSIONS, FederatedHello, OfferedModel, Receipt, Refusal
from helexa.protocol.model import MAX_NAME, bounded_text

from ..cache_scope import peer_scope
from ..shutdown import InFlight
from .announced_prices import AnnouncedPrices
from .ledger import SERVED, Ledger
from .policy import Admission, ServePolicy
from .receipts import sign_receipt
from .stream_reader import Exchange, StreamReader

log = logging.getLogger(__name__)

NEWEST = max(FEDERATION_VERSIONS.values())
"""An asker on the newest request-stream protocol is sent every field as it is."""

GenerateHandler = Callable[
    [GenerateRequest], AbstractAsyncContextManager[AsyncIterator[TokenChunk | GenerateResult | InferenceError]]
]
"""``serve_local(request)``: an async context manager yielding the local generation's
frames: ``TokenChunk``s then one ``GenerateResult`` (or an ``InferenceError``). Leaving
the context early (a ``Cancel`` from the asker) must stop the local generation. An
exception it raises is sent to the asker as an ``InferenceError`` (its ``code`` and
``retryable`` attributes are used when present)."""

EmbedHandler = Callable[[EmbedRequest], Awaitable[EmbedResult]]
"""``serve_embed(request) -> EmbedResult``; exceptions as for :data:`GenerateHandler`."""

OfferFn = Callable[[], Sequence[OfferedModel]]
"""What the local fleet can offer now (before the serve policy filters it)."""

OfferedFn = Callable[[str], OfferedModel | None]
"""``offered(model_id)``: the offer's entry for that one model now, or None; the same as
looking it up in ``offer_fn()`` (checked on every request a peer sends)."""


@dataclass(frozen=True, slots=True)
class ServeTimeouts:
    handshake: float = 5.0
    """For the hello and the request frames after a stream opens."""
    send: float = 10.0
    """For each frame sent back (a stalled asker is dropped)."""
    idle: float = 60.0
    """How long a stream may wait for its next request before it is closed."""


PromptCountFn = Callable[[GenerateRequest], Awaitable[int | None]]
"""``count_prompt(request)``: the exact token count of ``request``'s prompt, or None."""
_COUNT_TIMEOUT_S = 5.0
"""How long counting a cut generation's prompt may hold its receipt."""


class InboundServer:
    """Serves ``/helexa/federation/1`` streams. Used by :class:`.service.Federation`."""

    def __init__(self, *, identity: Identity, admission: Admission, ledger: Ledger, offer_fn: Callable[[], Sequence[OfferedModel]],
                 serve_generate: GenerateHandler | None, serve_embed: EmbedHandler | None,
                 timeouts: ServeTimeouts, clock: Callable[[], float], offered_fn: OfferedFn | None = None,
                 operator_of: Callable[[str], str | None] | None = None,
                 count_prompt: PromptCountFn | None = None) -> None:
        self._identity = identity
        self._count_prompt = count_prompt
        """``count_prompt(request)``: its prompt's exact token count, or None: what a
        receipt bills for a generation that ended with no usage of the neuron's (the asker
        left, or it failed) after its tokens were generated."""
        self._operator_of = operator_of
        """``operator_of(peer_id)``: the operator that peer's live signed announcement names
        (None if it has none): what the policy judges, rather than the hello's claim."""
        self._admission = admission
        self._ledger = ledger
        self._offer_fn = offer_fn
        self._offered_fn = offered_fn
        self._generate = serve_generate
        self._embed = serve_embed
        self._t = timeouts
        self._clock = clock
        self.in_flight = InFlight()
        """Requests admitted and not yet answered (with their receipts): what a stopping
        cortex lets finish within its ``shutdown_grace`` (:func:`..shutdown.drain`)."""
        self.announced = AnnouncedPrices()
        """The prices of the announcements peers may still hold: a request is billed at
        the lowest (a price raised here applies once none is live)."""
        self.stopping = False
        """Set by :meth:`stop`: new requests are refused ``busy`` (the asker tries another peer)."""

    def stop(self) -> None:
        """The cortex is stopping: refuse new requests; those admitted run on (their
        local generation is ended by the gateway's cut when the grace is over)."""
        self.stopping = True

    def set_policy(self, policy: ServePolicy) -> None:
        """Serve under ``policy`` from now on (a live reload)."""
        self._admission.set_policy(policy)

    async def handle(self, stream: MessageStream) -> None:
        """The stream handler (run under the mesh's catch-all wrapper): serves requests on
        ``stream`` until the asker closes it, leaves it idle, or an exchange ends unclean."""
        reader = StreamReader(stream)
        ended: StreamClosed | StreamTimeout | ProtocolError | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader.run)
            try:
                await self._serve_stream(stream, reader)
            except (StreamClosed, StreamTimeout, ProtocolError) as exc:
                ended = exc  # raised outside the nursery: not wrapped in an ExceptionGroup
            finally:
                nursery.cancel_scope.cancel()
        if ended is not None:
            raise ended

    async def _serve_stream(self, stream: MessageStream, reader: StreamReader) -> None:
        first = True
        while True:
            try:
                hello = await reader.next(self._t.handshake if first else self._t.idle)
            except (StreamClosed, StreamTimeout):
                if first:
                    raise  # a stream that never asked anything is an error; an idle one is not
                return
            if isinstance(hello, Cancel):
                continue  # a Cancel that crossed the end of the answer it was meant for
            if not await self._exchange(stream, reader, hello):
                return
            first = False

    async def _exchange(self, stream: MessageStream, reader: StreamReader, hello: object) -> bool:
        """Serve one request whose first frame was ``hello``; True if the stream is clean
        for the next one."""
        request = await reader.next(self._t.handshake)
        exchange = reader.begin(str(getattr(request, "request_id", "")))
        try:
            return await self._admit_and_serve(stream, reader, exchange, hello, request)
        finally:
            reader.end()

    async def _admit_and_serve(self, stream: MessageStream, reader: StreamReader, exchange: Exchange,
                               hello: object, request: object) -> bool:
        if not isinstance(hello, FederatedHello) or not isinstance(request, (GenerateRequest, EmbedRequest)):
            reader.end()
            await stream.send(Refusal(exchange.request_id, "bad_request", "expected FederatedHello then a request"),
                              timeout=self._t.send)
            return False
        peer = stream.remote_peer
        # The offer is read once: nothing awaits between this check and the serving.
        model = self._offered(request.model_id)
        if model is not None:
            model = self.announced.honour(model, self._clock())
        refusal = self._check(request, model)
        # The hello's operator is the asker's claim for this one request; its signed
        # announcement's is the one it gossips to everyone: the policy judges that one.
        # (held to a name's bounds, as an announcement's is: a refusal quotes it, the log too)
        operator = (self._operator_of(peer) if self._operator_of is not None else None) or bounded_text(
            hello.operator, MAX_NAME)
        if refusal is None and self.stopping:
            refusal = Refusal(request.request_id, "busy", "this cortex is shutting down", 1.0)
        if refusal is None:
            decision = self._admission.admit(peer, operator, request.model_id, trio.current_time())
            if not decision.admitted:
                refusal = Refusal(request.request_id, decision.code, decision.reason, decision.retry_after)
        if refusal is not None:
            log.info("federation: refused %s from %s (%s): %s", request.request_id, peer, refusal.code, refusal.message)
            reader.end()
            await stream.send(refusal, timeout=self._t.send)
            return True
        assert model is not None  # _check refused otherwise
        self.in_flight.enter()
        try:
            return await self._serve_admitted(stream, reader, exchange, request, model, peer, operator)
        finally:
            self.in_flight.exit()

    async def _serve_admitted(self, stream: MessageStream, reader: StreamReader, exchange: Exchange,
                              request: GenerateRequest | EmbedRequest, model: OfferedModel, peer: str,
                              operator: str) -> bool:
        span = None
        if telemetry.enabled():
            span = telemetry.tracer().start_span(
                "federation.serve", context=telemetry.parent_context(request.trace), kind=SpanKind.SERVER,
                attributes={"helexa.request_id": request.request_id, "helexa.model": request.model_id,
                            "helexa.peer": peer, "helexa.operator": operator})
        try:
            with trace.use_span(span, end_on_exit=True) if span is not None else contextlib.nullcontext():
                if isinstance(request, GenerateRequest):
                    # the asking cortex's tenants stay apart, from this cortex's and from another peer's
                    request = replace(request, cache_scope=peer_scope(peer, request.cache_scope))
                    return await self._serve_generate(stream, reader, exchange, request, model)
                return await self._serve_embed(stream, reader, exchange, request, model)
        finally:
            self._admission.release(peer)

    def _offered(self, model_id: str) -> OfferedModel | None:
        # What ``policy.filter_offer(offer)`` would keep of this one model, without
        # filtering (and copying) the whole offer on every request.
        policy = self._admission.policy
        if not policy.serve_peers or not policy.offers(model_id):
            return None
        if self._offered_fn is not None:
            return self._offered_fn(model_id)
        for m in self._offer_fn():
            if m.model_id == model_id:
                return m
        return None

    def _check(self, request: GenerateRequest | EmbedRequest, model: OfferedModel | None) -> Refusal | None:
        handler = self._generate if isinstance(request, GenerateRequest) else self._embed
        if handler is None or not self._admission.policy.serve_peers:
            return Refusal(request.request_id, "not_serving", "this cortex does not serve this kind of request to peers")
        if model is None:
            return Refusal(request.request_id, "model_not_offered", f"model {request.model_id!r} is not offered to peers")
        return None

    async def _serve_generate(self, stream: MessageStream, reader: StreamReader, exchange: Exchange,
                              request: GenerateRequest, model: OfferedModel) -> bool:
        assert self._generate is not None
        version = FEDERATION_VERSIONS.get(stream.protocol, 1)  # what the asker's release can decode
        started = self._clock()
        outcome = "ok"
        prompt = completion = 0
        receipt_sent: Receipt | None = None

        def receipt_now() -> Receipt:
            return sign_receipt(
                self._identity, request_id=request.request_id, model_id=request.model_id,
                prompt_tokens=prompt, completion_tokens=completion, price_input=model.price_input,
                price_output=model.price_output, started_at=started, ended_at=self._clock(),
                client_peer_id=stream.remote_peer, outcome="cancelled" if exchange.cancelled else outcome)

        # A Cancel from the asker, or the stream breaking, cancels this scope (the reader).
        with exchange.scope:
            try:
                async with self._generate(request) as frames:
                    async for frame in frames:
                        if isinstance(frame, GenerateResult):
                            # The answer and its receipt leave in one write: the asker
                            # waits for both, and a second frame costs it a muxer frame
                            # and a wake-up. After it the asker may send its next request,
                            # which the reader must queue, not take for this one's.
                            prompt = frame.usage.prompt_tokens
                            completion = frame.usage.completion_tokens
                            reader.end()
                            if exchange.cancelled:  # the asker left meanwhile
                                break
                            receipt = receipt_now()
                            if version < NEWEST:
                                frame = for_earlier(frame, version)  # an asker of an older release refuses newer fields
                            await stream.send(frame, receipt, timeout=self._t.send)
                            receipt_sent = receipt
                            break
                        if isinstance(frame, TokenChunk):
                            completion += frame.tokens
                            if frame.prompt_tokens is not None:  # the first chunk's: the neuron's exact count
                                prompt = frame.prompt_tokens
                                if version < NEWEST:
                                    frame = for_earlier(frame, version)  # an asker of an older release refuses it
                        elif isinstance(frame, InferenceError):
                            outcome = "error"
                        await stream.send(frame, timeout=self._t.send)
            except (StreamClosed, StreamTimeout):
                exchange.cancelled = exchange.asker_gone = True
            except Exception as exc:
                log.warning("federation: local generation of %s failed: %r", request.request_id, exc)
                outcome = "error"
                reader.end()
                await self._send_error(stream, request.request_id, exc)
        reader.end()
        if receipt_sent is not None:
            await self._ledger.arecord(SERVED, receipt_sent)
            return True
        if not prompt and completion and self._count_prompt is not None:
            # Cut short after its prompt was read and tokens made: bill its real prompt,
            # not none. Shielded (the asker leaving cancelled us) and bounded in time.
            with trio.CancelScope(shield=True), trio.move_on_after(_COUNT_TIMEOUT_S):
                prompt = await self._count_prompt(request) or 0
        receipt = receipt_now()
        if not exchange.asker_gone:  # the asker first: it is waiting, the disk is not
            try:
                await stream.send(receipt, timeout=self._t.send)
            except (StreamClosed, StreamTimeout):
                exchange.asker_gone = True
        await self._ledger.arecord(SERVED, receipt)
        return not exchange.asker_gone

    async def _serve_embed(self, stream: MessageStream, reader: StreamReader, exchange: Exchange,
                           request: EmbedRequest, model: OfferedModel) -> bool:
        """Serve an embedding under ``exchange``'s scope, as a generation is: a ``Cancel``
        from the asker (its client left, its key was revoked) or the stream breaking stops
        the local embedding, whose neuron is told to stop, and the receipt says
        ``cancelled``. True if the stream is clean for the next request."""
        assert self._embed is not None
        started = self._clock()
        prompt = 0
        outcome = "ok"
        with exchange.scope:
            try:
                result = await self._embed(request)
                prompt = result.usage.prompt_tokens
                reader.end()  # the answer goes: from here on frames are the next request's
                if not exchange.cancelled:
                    await stream.send(result, timeout=self._t.send)
            except (StreamClosed, StreamTimeout):
                exchange.cancelled = exchange.asker_gone = True
            except Exception as exc:
                outcome = "error"
                reader.end()
                await self._send_error(stream, request.request_id, exc)
        reader.end()
        receipt = sign_receipt(
            self._identity, request_id=request.request_id, model_id=request.model_id,
            prompt_tokens=0 if exchange.cancelled else prompt,  # a cut embedding gave nothing: billed nothing
            completion_tokens=0, price_input=model.price_input, price_output=model.price_output,
            started_at=started, ended_at=self._clock(), client_peer_id=stream.remote_peer,
            outcome="cancelled" if exchange.cancelled else outcome)
        try:
            if not exchange.asker_gone:
                await stream.send(receipt, timeout=self._t.send)
        except (StreamClosed, StreamTimeout):
            exchange.asker_gone = True
        finally:
            await self._ledger.arecord(SERVED, receipt)
        return not exchange.asker_gone

    async def _send_error(self, stream: MessageStream, request_id: str, exc: Exception) -> None:
        err = InferenceError(request_id, str(getattr(exc, "code", "internal_error")), str(exc) or type(exc).__name__,
                             bool(getattr(exc, "retryable", False)))
        try:
            await stream.send(err, timeout=self._t.send)
        except (StreamClosed, StreamTimeout):
            pass
