"""The :class:`Federation` service: announces this cortex's offer, keeps the table of
peers' offers from gossip, serves peers' requests, and routes requests out to peers.

Wiring (by the cortex)::

    fed = Federation(mesh=mesh, identity=ident, operator="acme", ledger=Ledger(dir / "ledger.sqlite"),
                     offer_fn=fleet_offer, spare_fn=fleet_spare_slots,
                     serve_generate=serve_local, serve_embed=embed_local,
                     serve_policy=ServePolicy(), ask_policy=AskPolicy())
    await nursery.start(mesh.run)
    await nursery.start(fed.run)
    ...
    async with fed.route(generate_request) as frames:   # gateway, local fleet cannot serve
        async for frame in frames: ...                   # TokenChunk..., GenerateResult
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from contextlib import aclosing
from typing import Any

import trio

from helexa.identity import Identity
from helexa.mesh import Mesh, MessageStream, StreamClosed, StreamTimeout
from helexa.protocol import (
    Cancel,
    EmbedRequest,
    EmbedResult,
    GenerateRequest,
    InferenceError,
    ProtocolError,
    Task,
    encode,
)
from helexa.protocol.federation import ANNOUNCE_TOPIC, FederatedHello, Refusal
from helexa.protocol.model import Workload

from .announcements import AnnouncementRejected, PeerOffer, PeerTable, check_announcement, sign_announcement
from .errors import FederationError, NoPeerOffers, OutboundRefused, PeerFailed, PeerRefused, PeerUnreachable, PeerVanished
from .inbound import EmbedHandler, GenerateHandler, InboundServer, OfferedFn, OfferFn, PromptCountFn
from .ledger import Ledger
from .outbound import Expectation, ReceiptKeeper, RemoteGeneration, refusal_error
from .peer_streams import PeerStreams
from .peer_usage import InvalidAnswer, bounded_embed
from .policy import Admission, AskPolicy, Outbound, ServePolicy
from .settings import FederationSettings

log = logging.getLogger(__name__)

__all__ = ["Federation", "FederationSettings"]

_ALLOWED_MEMO = 256
"""Candidate lists kept (per model, workload, exclusions and policies)."""

_RETRY_NEXT_PEER = {"busy", "rate_limited", "model_not_offered", "not_serving"}


class Federation:
    """Request-stream protocols are offered newest first: :attr:`protocols`.

    Args:
        mesh: a running (or about to run) :class:`helexa.mesh.Mesh`.
        identity: this cortex's identity (signs announcements and receipts).
        operator: this operator's name, as peers' policies see it.
        ledger: where served and consumed receipts are kept.
        offer_fn: what the local fleet could serve now (filtered by ``serve_policy``).
        spare_fn: how many more requests the local fleet could start now.
        serve_generate, serve_embed: run a peer's request locally (``None``: refuse).
        serve_policy, ask_policy: whom to serve; whether and where to ask.
        settings: intervals and deadlines.
        clock: Unix time (announcements and receipts carry wall-clock times).
        offered_fn: ``offered(model_id)``, ``offer_fn``'s entry for one model (optional: a
            faster lookup for the check of each peer's request; default: ``offer_fn``).
        count_prompt: a peer's request's exact prompt count (optional): what a receipt
            bills for a generation cut short before the neuron's usage came.
    """

    def __init__(
        self, *, mesh: Mesh, identity: Identity, operator: str, ledger: Ledger, offer_fn: OfferFn,
        spare_fn: Callable[[], int] = lambda: 1, serve_generate: GenerateHandler | None = None,
        serve_embed: EmbedHandler | None = None, serve_policy: ServePolicy = ServePolicy(),
        ask_policy: AskPolicy = AskPolicy(), settings: FederationSettings = FederationSettings(),
        clock: Callable[[], float] = time.time, offered_fn: OfferedFn | None = None,
        count_prompt: PromptCountFn | None = None,
    ) -> None:
        self.streams = PeerStreams(mesh, settings)
        """The request streams to peers: idle ones kept for reuse, each peer's protocol."""
        self.mesh = mesh
        self.identity = identity
        self.operator = operator
        self.ledger = ledger
        self.serve_policy = serve_policy
        self.ask_policy = ask_policy
        self.settings = settings
        self._offer_fn = offer_fn
        self._spare_fn = spare_fn
        self._clock = clock
        self.table = PeerTable(unavailable_grace=settings.grace)
        self._sequence = 0
        self.answering: set[RemoteGeneration] = set()
        self.first_waits: set[MessageStream] = set()
        """Peers' answers being read now, and streams waiting for one's first frame (an answer
        not streamed waits there whole): what the cortex's stop past its grace ends
        (``PeerRouter.fail_streams``, which sets ``cut_error``)."""
        self.cut_error: Exception | None = None
        self._allowed_memo: dict[tuple[Any, ...], tuple[PeerTable, int, float, list[PeerOffer]]] = {}
        self.inbound = InboundServer(
            identity=identity, admission=Admission(serve_policy), ledger=ledger, offer_fn=offer_fn,
            serve_generate=serve_generate, serve_embed=serve_embed, timeouts=settings.serve, clock=clock,
            offered_fn=offered_fn, operator_of=self._announced_operator, count_prompt=count_prompt)

    @property
    def protocols(self) -> tuple[str, ...]:
        """The request-stream protocols this cortex serves and asks with, newest first
        (:attr:`.PeerStreams.protocols`; a test may narrow them to an older release's)."""
        return self.streams.protocols

    @protocols.setter
    def protocols(self, protocols: tuple[str, ...]) -> None:
        self.streams.protocols = protocols

    def _announced_operator(self, peer_id: str) -> str | None:
        ann = self.table.get(peer_id)
        return ann.operator if ann is not None else None

    def set_policies(self, serve_policy: ServePolicy, ask_policy: AskPolicy) -> None:
        """New policies (a live reload); the next announcement carries the new offer."""
        self.serve_policy = serve_policy
        self.ask_policy = ask_policy
        self.inbound.set_policy(serve_policy)

    def stop_serving(self) -> None:
        """The cortex is stopping: peers' new requests are refused ``busy``; those being
        served run on (``self.inbound.in_flight`` counts them) until the stop's grace."""
        self.inbound.stop()

    # --- the service ----------------------------------------------------------------------

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Serve, listen and announce until cancelled. ``started()`` once subscribed."""
        self.table = PeerTable(self.mesh.peer_id, unavailable_grace=self.settings.grace)
        for protocol in self.protocols:
            self.mesh.serve(protocol, self.inbound.handle)
        async with trio.open_nursery() as nursery:
            await nursery.start(self._listen)
            nursery.start_soon(self._announce_loop)
            task_status.started()

    async def announce_now(self) -> None:
        """Sign and gossip our current offer (also done every ``announce_interval``)."""
        now = self._clock()
        self._sequence = max(self._sequence + 1, int(now * 1000))
        models = self.serve_policy.filter_offer(list(self._offer_fn()))
        self.inbound.announced.record(models, now + self.settings.announcement_ttl)
        ann = sign_announcement(
            self.identity, operator=self.operator,
            models=models,
            spare_slots=max(0, int(self._spare_fn())), policy=self.serve_policy.summary(),
            addrs=tuple(self.mesh.listen_addrs), issued_at=now, ttl=self.settings.announcement_ttl,
            sequence=self._sequence)
        with trio.move_on_after(self.settings.ask.send):
            await self.mesh.announce(ANNOUNCE_TOPIC, encode(ann))

    async def _announce_loop(self) -> None:
        while True:
            try:
                await self.announce_now()
            except Exception:
                log.exception("federation: announcing failed")
            for peer in self.table.expire(self._clock()):
                log.info("federation: offer of %s expired", peer)
            try:
                await self.ledger.acheckpoint()  # the receipts' fsync, off the answers' path
            except Exception:
                log.exception("federation: checkpointing the ledger failed")
            await trio.sleep(self.settings.announce_interval)

    def _validate(self, origin: str, data: bytes) -> bool:
        try:
            check_announcement(data, origin=origin, now=self._clock())
        except AnnouncementRejected as exc:
            log.info("federation: dropped an announcement from %s: %s", origin, exc)
            return False
        return True

    async def _listen(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        messages = self.mesh.subscribe(ANNOUNCE_TOPIC, self._validate)
        async with aclosing(messages):  # type: ignore[type-var]
            task_status.started()
            async for msg in messages:
                ann = self.table.ingest(msg.data, origin=msg.origin, now=self._clock())
                if ann is not None:
                    self.mesh.add_addrs(ann.peer_id, list(ann.addrs))

    # --- what the gateway asks ------------------------------------------------------------

    def remote_models(self) -> dict[str, list[PeerOffer]]:
        """Models live peers offer us (ask policy applied), best offer first; for
        ``/v1/models`` (served by ``offer.operator`` / ``offer.peer_id``)."""
        now = self._clock()
        out = {}
        for model_id in self.table.models(now):
            cands = self.table.candidates(model_id, now, self.ask_policy)
            if cands:
                out[model_id] = cands
        return out

    def _allowed(self, model_id: str, now: float, also: AskPolicy | None, *, workload: Workload | None = None,
                 exclude: frozenset[str] = frozenset()) -> list[PeerOffer]:
        """Candidates under the ask policy, narrowed by ``also`` (an asking portal's).
        The list is shared: callers must not change it.

        Kept until the peer table changes or one of them expires: a federated request
        asks three times (the orchestrator's decision, the router, the route), and the
        offers change every few seconds, not per request."""
        key = (model_id, workload, exclude, also, self.ask_policy)
        memo = self._allowed_memo.get(key)
        table = self.table
        if memo is not None and memo[0] is table and memo[1] == table.version and now < memo[2]:
            return memo[3]
        cands = table.candidates(model_id, now, self.ask_policy, workload=workload, exclude=exclude)
        if also is not None:
            cands = [o for o in cands if also.allows_peer(o.peer_id, o.operator) and also.allows_price(o.model)]
        if len(self._allowed_memo) >= _ALLOWED_MEMO:
            self._allowed_memo.clear()
        # Offers only leave the list by expiring (or by a table change) while the key holds.
        self._allowed_memo[key] = (table, table.version, min((o.expires_at for o in cands), default=math.inf), cands)
        return cands

    def can_route(self, model_id: str, workload: Workload | None = None, *, also: AskPolicy | None = None) -> bool:
        """Whether some live peer may be asked for ``model_id`` (under ``also`` too)."""
        return self.ask_policy.outbound is not Outbound.NEVER and bool(
            self._allowed(model_id, self._clock(), also, workload=workload))

    def unavailable(self, model_id: str, *, also: AskPolicy | None = None) -> float | None:
        """Seconds a client should wait before asking for ``model_id`` again when only peers
        served it, their offers expired less than ``unavailable_grace`` ago and none is live
        now (a partition: the next announcement may bring it back); None otherwise (the
        model is offered, or unknown here, or this cortex never asks peers).

        Raises:
            OutboundRefused: the peers whose offers expired lately are all ones the ask
                policy (narrowed by ``also``, an asking portal's) excludes: the request was
                refused while they announced it (403), and the next announcement would not
                change that, so it is no "temporarily unavailable"."""
        now = self._clock()
        if self.ask_policy.outbound is Outbound.NEVER or not self.table.unavailable(model_id, now):
            return None
        policies = (self.ask_policy,) if also is None else (self.ask_policy, also)
        if not any(all(p.allows_peer(peer_id, offer.operator) and p.allows_price(offer.model) for p in policies)
                   for peer_id, offer in self.table.recent.lately(model_id, now)):
            raise OutboundRefused(f"peers offered {model_id!r} until lately but the outbound policy excludes them "
                                  "(not listed, or over the price ceiling)")
        return float(max(1, math.ceil(self.settings.announce_interval)))

    def _candidates(self, model_id: str, workload: Workload, exclude: frozenset[str],
                    also: AskPolicy | None = None) -> list[PeerOffer]:
        if self.ask_policy.outbound is Outbound.NEVER:
            raise OutboundRefused("this cortex never sends requests to peers")
        now = self._clock()
        cands = self._allowed(model_id, now, also, workload=workload, exclude=exclude)
        if not cands:
            if self.table.offers(model_id, now, workload=workload):
                raise OutboundRefused(f"peers offer {model_id!r} but the outbound policy excludes them "
                                      "(not listed, or over the price ceiling)")
            raise NoPeerOffers(f"no peer offers {model_id!r}")
        return cands[: self.settings.max_attempts]

    async def _open(self, offer: PeerOffer, request: GenerateRequest | EmbedRequest) -> tuple[MessageStream, Any]:
        """Send hello and request on an idle stream to the peer, else a new one, and read
        the first answer frame. A reused stream the peer closed meanwhile (its idle
        timeout, or a peer that serves one request a stream) is dropped for the next."""
        t = self.settings.ask
        while True:
            stream = await self.streams.take(offer.peer_id)
            reused = stream is not None
            if stream is None:
                stream = await self.streams.new_stream(offer.peer_id)
            try:
                await stream.send(FederatedHello(self.operator, request.request_id), self.streams.for_peer(request, stream),
                                  timeout=t.send)
                self.first_waits.add(stream)
                try:
                    first = await stream.receive(timeout=t.first_frame)
                finally:
                    self.first_waits.discard(stream)
            except StreamClosed as exc:
                await stream.reset()
                if reused:
                    log.debug("federation: an idle stream to %s was closed (%s); another", offer.peer_id, exc)
                    continue
                raise PeerUnreachable(f"peer {offer.peer_id} did not answer: {exc}", peer_id=offer.peer_id) from None
            except (StreamTimeout, ProtocolError) as exc:
                if isinstance(exc, StreamTimeout):
                    await self._abandon(offer, request, stream)  # it may be running there
                    if self.cut_error is not None:  # interrupted: the cortex is stopping
                        raise self.cut_error from None
                else:
                    await stream.reset()
                raise PeerUnreachable(f"peer {offer.peer_id} did not answer: {exc}", peer_id=offer.peer_id) from None
            except BaseException:
                # Cancelled (the client left) after the request went out, before any
                # answer: the peer is told, and its receipt recorded as after an answer.
                await self._abandon(offer, request, stream)
                raise
            if isinstance(first, Refusal):
                await self.streams.release(offer.peer_id, stream, clean=True)
                raise refusal_error(first, offer.peer_id)
            return stream, first

    async def _abandon(self, offer: PeerOffer, request: GenerateRequest | EmbedRequest, stream: MessageStream) -> None:
        """Send ``Cancel`` for a request left before its first answer frame, record the
        peer's receipt (a flagged stand-in if none comes within the cancel budget), and
        reset the stream. Shielded and bounded, like :meth:`RemoteGeneration.finish`."""
        t = self.settings.ask
        keeper = self._keeper(offer, request)
        with trio.CancelScope(shield=True):
            with trio.move_on_after(t.cancel + 0.5):
                try:
                    await stream.send(Cancel(request.request_id), timeout=t.cancel)
                except (StreamClosed, StreamTimeout):
                    pass
                await keeper.collect(stream, t.cancel, tokens_seen=0, outcome="cancelled")
            if not keeper.done:
                await keeper.collect(None, 0, tokens_seen=0, outcome="cancelled")
            await stream.reset()

    async def _first_answer(self, request: GenerateRequest | EmbedRequest, workload: Workload,
                            exclude: frozenset[str], also: AskPolicy | None = None
                            ) -> tuple[PeerOffer, MessageStream, Any]:
        last: FederationError | None = None
        for offer in self._candidates(request.model_id, workload, exclude, also):
            try:
                stream, first = await self._open(offer, request)
                return offer, stream, first
            except PeerUnreachable as exc:
                last = exc
            except PeerRefused as exc:
                last = exc
                if exc.code not in _RETRY_NEXT_PEER:
                    raise
            log.info("federation: %s not served by %s: %s", request.request_id, offer.peer_id, last)
        assert last is not None
        raise last

    def _keeper(self, offer: PeerOffer, request: GenerateRequest | EmbedRequest) -> ReceiptKeeper:
        return ReceiptKeeper(self.ledger, Expectation(
            offer.peer_id, self.mesh.peer_id, request.request_id, request.model_id,
            offer.model.price_input, offer.model.price_output), self._clock,
            request if isinstance(request, GenerateRequest) else None)

    def route(self, request: GenerateRequest, *, exclude: frozenset[str] = frozenset(),
              also: AskPolicy | None = None) -> "_Route":
        """Run ``request`` on the best peer that offers its model, under the ask policy
        (narrowed by ``also``: the asking portal's routing preferences). Use as
        ``async with fed.route(request) as frames``.

        Yields an async iterator of ``TokenChunk``s then one ``GenerateResult`` (its
        ``peer_id`` says who serves it). Peers are tried in order (warm, price, load)
        while they are unreachable or busy, before any output. Leaving the block before
        the result (the client went away, or cancellation) sends ``Cancel`` to the peer.
        The receipt is verified and recorded in the ledger when the block exits.

        Raises:
            OutboundRefused, NoPeerOffers: nothing was sent.
            PeerRefused: the peer's policy said no (``code``, ``retry_after``).
            PeerUnreachable: no peer could be reached or none answered in time.
            PeerVanished, PeerFailed: from the iterator, mid-answer.

        ``request.cache_scope`` (its tenant's) crosses as an opaque scope of the peer's
        own, to a peer that speaks the scoped protocol only (:meth:`.PeerStreams.for_peer`).
        """
        return _Route(self, request, exclude, also)

    async def embed(self, request: EmbedRequest, *, exclude: frozenset[str] = frozenset(),
                    also: AskPolicy | None = None) -> EmbedResult:
        """Run an embedding request on the best peer; errors as for :meth:`route`."""
        offer, stream, first = await self._first_answer(request, Workload.EMBEDDING, exclude, also)
        keeper = self._keeper(offer, request)
        try:
            if isinstance(first, EmbedResult):
                try:
                    result = bounded_embed(first, request)
                except InvalidAnswer as exc:
                    await stream.reset()
                    await keeper.collect(None, 0, tokens_seen=0, outcome="error")
                    raise PeerVanished(f"peer {offer.peer_id} sent an invalid answer: {exc}",
                                       peer_id=offer.peer_id) from None
                await keeper.collect(stream, self.settings.ask.receipt, tokens_seen=0, outcome="ok")
                return result
            if isinstance(first, InferenceError):
                await keeper.collect(stream, self.settings.ask.receipt, tokens_seen=0, outcome="error")
                raise PeerFailed(f"peer {offer.peer_id}: {first.message}", code=first.code,
                                 retryable=first.retryable, peer_id=offer.peer_id)
            raise PeerVanished(f"peer {offer.peer_id} sent an unexpected {type(first).__name__}", peer_id=offer.peer_id)
        finally:
            with trio.CancelScope(shield=True):
                await keeper.collect(None, 0, tokens_seen=0, outcome="cancelled")
            await self.streams.release(offer.peer_id, stream, clean=keeper.received)


class _Route:
    """:meth:`Federation.route`'s context manager: a small class rather than an
    ``asynccontextmanager`` generator, which cost a generator and its frames on every
    federated request's path."""

    __slots__ = ("_fed", "_request", "_exclude", "_also", "_offer", "_stream", "_remote")

    def __init__(self, fed: Federation, request: GenerateRequest, exclude: frozenset[str],
                 also: AskPolicy | None) -> None:
        self._fed = fed
        self._request = request
        self._exclude = exclude
        self._also = also

    async def __aenter__(self) -> RemoteGeneration:
        fed, request = self._fed, self._request
        workload = Workload.CHAT if request.task is Task.CHAT else Workload.COMPLETION
        self._offer, self._stream, first = await fed._first_answer(request, workload, self._exclude, self._also)
        self._remote = RemoteGeneration(self._stream, first, fed._keeper(self._offer, request), fed.settings.ask,
                                        request)
        fed.answering.add(self._remote)
        return self._remote

    async def __aexit__(self, *exc: object) -> None:
        try:
            self._fed.answering.discard(self._remote)
            await self._remote.finish()
        finally:
            await self._fed.streams.release(self._offer.peer_id, self._stream, clean=self._remote.clean)
