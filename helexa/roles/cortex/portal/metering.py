"""The one metered path: every request that runs a model passes through :class:`Metering`.

An API surface (OpenAI's now; Anthropic's, Responses and Ollama's as adapters later) turns
its request into the fabric's :class:`GenerateRequest` / :class:`EmbedRequest` under the
model name the client asked for, and calls :meth:`Metering.generate` or
:meth:`Metering.embed` with the :class:`Caller` (portal and key). In one place, that:

1. **authorises the model**: the portal's public name is resolved to the catalogue model
   (404 if the portal does not serve it or the key may not use it: one answer for both), and ``max_tokens``
   is checked against the model's limit;
2. **reserves the worst case** against every limit of the key and the portal
   (:mod:`.quota`): the prompt's upper bound (its UTF-8 bytes plus a per-message
   allowance for the chat template, capped by the model's ``max_context``; a tokenizer
   makes at most about one token per byte) plus the completion limit (``max_tokens``, else
   the model's ``max_output``, else the portal's ``default_max_tokens``, at most the room
   the context leaves the prompt, which then goes to the neuron as the request's limit so
   the bound holds). Over a limit: 429;
3. **runs** the request through the orchestrator with the portal's tenant, priority and
   routing preferences;
4. **settles** what was really used: the neuron's usage when the answer completed, else
   (the client left, or it failed) the tokens of the chunks it produced and, when any
   output came, the prompt's exact count: the neuron's, sent with its first chunk
   (``TokenChunk.prompt_tokens``), else the edge's (counted at admission, or then with the
   model's tokenizer), else its estimate at a quarter of its bytes;
5. **writes the ledger record**, durably (:mod:`.writer`), *before* the adapter gets the
   final result: a generation yields only its :class:`TokenChunk`\\ s, and its
   :attr:`MeteredGeneration.result` (with the usage that was billed) exists only once
   the record is on disk, so no surface can send an answer's end before its record.

The usage a client sees in an answer is the usage billed: the result's usage is replaced
by the billed one.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import sqlite3
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import trio

from helexa.protocol import EmbedRequest, EmbedResult, GenerateRequest, Usage

from ..errors import (BadRequest, ClientGone, GatewayError, InsufficientQuota, ModelNotFound, RateLimited,
                      UpstreamError, as_asked, to_gateway_error)
from ..metrics import Metrics
from ..prompt_size import prompt_bytes, prompt_upper_bound
from .accounts import AccountBook, Admission
from .keys import ApiKey
from .metered import MeteredGeneration, MeteredRun, neurons_count
from .portal import Portal
from .quota import Account, Refusal, Reservation, admit
from .routing import ASK_POLICY
from .usage import UsageRecord
from .writer import LedgerWriter, StoreUnavailable

if TYPE_CHECKING:
    from ..orchestrator import OnWait, Orchestrator
    from ..request_limits import RequestLimits
    from .store import Store

log = logging.getLogger(__name__)
T = TypeVar("T")

PEER_NODE_ID = "federation"

_NOTHING_RESERVED = Reservation(0, 0.0)
"""The reservation of a request that is neither limited nor recorded (frozen: one for all)."""

Receipts = Callable[[str], Awaitable[tuple[str, str] | None]]
"""``receipts(request_id)``: ``(peer id, receipt signature hex)`` of a federated request."""


@dataclass(frozen=True, slots=True)
class Caller:
    """Who asks: the portal the request came through, and its key (None on an open portal)."""

    portal: Portal
    key: ApiKey | None = None

    @property
    def key_id(self) -> str:
        return self.key.key_id if self.key is not None else ""


@dataclass(frozen=True, slots=True)
class Plan:
    """A request made ready to run: what goes to the orchestrator, its worst case, and the
    tariff it was admitted under (``prices``: input and output per million tokens, in
    ``currency``), and whether its portal recorded usage then (``recorded``). A live reload
    changes the portal, not an admitted request: it is billed at the prices its worst case
    was reserved at, and recorded in the ledger if it was admitted while the portal
    recorded usage (a reload that turns ``record_usage`` off does not lose its record)."""

    asked: str
    forward: GenerateRequest | EmbedRequest
    reservation: Reservation
    prompt_bytes: int
    prices: tuple[float, float] = (0.0, 0.0)
    currency: str = ""
    recorded: bool = False
    answer: Reservation = _NOTHING_RESERVED
    """The completion limit's share of ``reservation`` (its tokens and what they would cost)."""
    bills_prompt: bool = True
    """False for choices 1.. of OpenAI's ``n``: the prompt is reserved and billed once, with choice 0."""
    prompt_tokens: int | None = None
    """The prompt's exact token count, where the edge made one (at admission, or when the
    generation ended without the neuron's usage): what a generation cut short bills for
    its prompt when the neuron sent none with its first chunk; None (and none from the
    neuron) bills the estimate from its bytes."""

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        p_in, p_out = self.prices
        return (prompt_tokens * p_in + completion_tokens * p_out) / 1_000_000

    def whole(self, copies: int) -> Reservation:
        """The worst case of ``copies`` choices of this (choice 0's) plan: the prompt once
        and ``copies`` answers."""
        r, a = self.reservation, self.answer
        return Reservation(r.tokens + (copies - 1) * a.tokens, r.cost + (copies - 1) * a.cost)

    def choice(self, index: int) -> "Plan":
        """The plan of choice ``index`` of OpenAI's ``n`` (this one is choice 0's, which
        carries the prompt and the request's one ``rpm`` token): the others reserve and bill
        their answers only, as OpenAI counts the prompt and the request once per call."""
        if index == 0:
            return self
        return dataclasses.replace(self, reservation=dataclasses.replace(self.answer, requests=0), prompt_bytes=0,
                                   bills_prompt=False)


class Metering(AccountBook):
    """The metered path (see the module docstring); its quota accounts: :class:`.accounts.AccountBook`.

    Args:
        orchestrator: runs requests.
        writer: makes ledger records durable.
        store: keys and the ledger (read at start to rebuild budgets, and for reports).
        metrics: the cortex's metrics (the ``portal`` label).
        clock: Unix time (budget periods, rate buckets, record times).

    Store reads run on a worker thread (:meth:`blocking`), or inline when the writer is
    (tests under the autojump clock, which would jump while a thread works).
    """

    def __init__(self, orchestrator: Orchestrator, writer: LedgerWriter, store: Store, metrics: Metrics, *,
                 limits: RequestLimits | None = None, clock: Callable[[], float] = time.time) -> None:
        self.orchestrator = orchestrator
        self.limits = limits
        """The edge's checks of a generation against its model (features, context, images)."""
        self.catalogue = orchestrator.catalogue
        self.writer = writer
        self.store = store
        self.metrics = metrics
        self.clock = clock
        self.receipts: Receipts | None = None
        """Set when the mesh is on: links a federated request's ledger row to its receipt."""
        super().__init__()
        self.live: dict[str, set[MeteredGeneration]] = {}
        """The generations running for each key (by id), stopped when it is revoked."""
        self.traffic: Any = None
        """Told of every settled request (the console's Traffic page; :mod:`..web.traffic`)."""

    async def blocking(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)``, a blocking store call, off the trio thread. Raises
        :class:`StoreUnavailable` (503) when SQLite refuses it (a full or failed disk, a lock
        held past its busy timeout), logged at ERROR without a traceback: before, each was a
        500 ``internal_error`` and a traceback."""
        try:
            if self.writer.inline:
                return fn(*args)
            return await trio.to_thread.run_sync(fn, *args)
        except sqlite3.OperationalError as exc:
            log.error("the usage store %s refused %s: %s", getattr(self.writer.store, "path", "?"),
                      getattr(fn, "__name__", "a call"), exc)
            raise StoreUnavailable(str(exc)) from None

    # --- planning --------------------------------------------------------------------------

    def _plan_generate(self, caller: Caller, request: GenerateRequest, served: str, *, bounded: bool,
                       counted: bool) -> Plan:
        """``served``: the catalogue model behind ``request.model_id`` (``Portal.resolve``);
        ``bounded``: quotas apply (the worst case is reserved, and ``max_tokens`` sent so
        it holds); ``counted``: the usage is recorded or reserved (an open portal with no
        limits and no ledger skips the prompt's measure)."""
        portal = caller.portal
        asked = request.model_id
        entry = self.catalogue.get(served)
        max_tokens = request.sampling.max_tokens
        scope = portal.cache_scope(caller.key)  # whose cached prefixes it may reuse
        if entry is not None and entry.max_output and max_tokens and max_tokens > entry.max_output:
            raise BadRequest(f"max_tokens {max_tokens} is over model {asked!r}'s limit of {entry.max_output}",
                             param="max_tokens")
        if not counted:
            forward = request
            if served != asked or request.cache_scope != scope:
                forward = dataclasses.replace(request, model_id=served, cache_scope=scope)
            return Plan(asked, forward, _NOTHING_RESERVED, 0, portal.price(asked), portal.currency,
                        portal.records_usage)
        size, _ = prompt_bytes(request)
        completion = max_tokens or (entry.max_output if entry is not None else None) or portal.config.default_max_tokens
        # An exact count (the edge's tokenizer) bounds the prompt; else its bytes do.
        prompt = prompt_upper_bound(request)
        context = entry.max_context if entry is not None else None
        implied = bounded and max_tokens is None  # the limit goes to the neuron, so the bound holds
        if context:
            prompt, completion = min(prompt, context), min(completion, context)
            if implied:
                # A limit the client did not ask for must leave the prompt its room (the
                # neuron refuses prompt + max_tokens over the context); with none left by the
                # prompt's bound, the context itself bounds the answer.
                room = context - prompt
                if room >= 1:
                    completion = min(completion, room)
                else:
                    implied = False
        p_in, p_out = portal.price(asked)
        cost = (prompt * p_in + completion * p_out) / 1_000_000
        tokens = min(prompt + completion, context) if context else prompt + completion
        forward = request
        if served != asked or implied or request.cache_scope != scope:
            sampling = request.sampling
            if implied:
                sampling = dataclasses.replace(sampling, max_tokens=completion)
            forward = dataclasses.replace(request, model_id=served, sampling=sampling, cache_scope=scope)
        return Plan(asked, forward, Reservation(tokens, cost), size, (p_in, p_out), portal.currency,
                    portal.records_usage, Reservation(completion, completion * p_out / 1_000_000))

    def _plan_embed(self, caller: Caller, request: EmbedRequest) -> Plan:
        portal = caller.portal
        asked = request.model_id
        served = portal.resolve(asked, caller.key)
        entry = self.catalogue.get(served)
        context = entry.max_context if entry is not None else None
        sizes = [len(text.encode()) + 2 for text in request.inputs]
        tokens = sum(min(s, context) for s in sizes) if context else sum(sizes)
        prices = portal.price(asked)
        forward = request if served == asked else dataclasses.replace(request, model_id=served)
        return Plan(asked, forward, Reservation(tokens, tokens * prices[0] / 1_000_000, lower="the input"),
                    sum(sizes), prices, portal.currency, portal.records_usage)

    def _admit(self, caller: Caller, plan: Plan, accounts: list[Account], now: float) -> list[Account]:
        if accounts:
            refusal = admit(accounts, plan.reservation, now)
            if refusal is not None:
                self._refuse(caller, refusal)
        return accounts

    def _refuse(self, caller: Caller, refusal: Refusal) -> NoReturn:
        self.metrics.portal_refused(caller.portal.id, refusal.code)
        log.info("portal %s: refused a request of %s: %s", caller.portal.id,
                 f"key {caller.key_id}" if caller.key else "an open client", refusal.message)
        if refusal.code == "budget":
            raise InsufficientQuota(refusal.message, retry_after=refusal.retry_after)
        raise RateLimited(refusal.message, retry_after=refusal.retry_after, code="rate_limit_exceeded",
                          retry=refusal.retry_after is not None)

    # --- running ---------------------------------------------------------------------------

    def generate(self, caller: Caller, request: GenerateRequest, *, endpoint: str,
                 on_wait: OnWait | None = None, image: str | None = None,
                 session: str | None = None, copies: int = 1, choice: int = 0,
                 group: Sequence[MeteredGeneration | None] = (), admitted: trio.Event | None = None) -> MeteredRun:
        """Run ``request`` (its ``model_id`` the public name the client asked for), metered.

        ``copies``: the request is choice ``choice`` of that many (OpenAI's ``n``) of one
        client request, whose generations are ``group`` (filled in as they start): the
        prompt is reserved and billed once, with choice 0 (:meth:`Plan.choice`), and the
        whole is refused, with no retry, where no wait could admit them all
        (:func:`.quota.beyond`). Choice 0 also takes the request's one ``rpm`` request,
        and sets ``admitted`` (shared by the choices) once admitted: the others wait for it
        before their own admission, so a call its ``rpm`` refuses runs no choice at all.

        ``async with`` it for a :class:`MeteredGeneration`; its ``result`` is set when the block ends
        normally, once the ledger record is durable. ``session`` (the client's session id)
        goes to the orchestrator, which routes the request back to where the session went.

        Raises:
            the :mod:`..errors` tree: ModelNotFound (404), BadRequest (what
            the model cannot take, :mod:`..request_limits`; ``image`` names the request's
            first image part, if any), RateLimited / InsufficientQuota (429) before anything ran; the orchestrator's
            errors (before or during the stream); UpstreamError when the stream ended
            without a result; ``LedgerError`` (500) when the record could not be written.
        """
        return MeteredRun(self, caller, request, endpoint, on_wait, image, session, copies, choice, group, admitted)

    async def embed(self, caller: Caller, request: EmbedRequest) -> EmbedResult:
        """Embed ``request`` (public model name), metered; raises as :meth:`generate`. A
        revoke (or expiry) of the key while it runs stops it at once with the 401, as a
        generation's (:meth:`MeteredGeneration.halt`); the neuron is told to cancel."""
        caller = self.current(caller, self.clock())
        portal = caller.portal
        plan = self._plan_embed(caller, request)
        if self.limits is not None:
            self.limits.check_workload(plan.forward.model_id, embedding=True, named=plan.asked)
        now = self.clock()
        accounts = self.accounts(caller, now)
        self._admit(caller, plan, accounts, now)
        admission = self.admitted(caller, plan.reservation, accounts)
        started = self.clock()
        t0 = trio.current_time()
        token = ASK_POLICY.set(portal.ask_policy) if portal.ask_policy is not None else None
        run = MeteredGeneration(whole=True)  # only its halt: an embedding has no event before its answer
        live = self.live.setdefault(caller.key.key_id, set()) if caller.key is not None else None
        if live is not None:
            live.add(run)
        try:
            with run.halting():
                result = await self.orchestrator.embed(plan.forward, allow_peers=portal.allow_peers,
                                                       tenant=portal.tenant(caller.key))
            if run.stop is not None:
                raise run.stop
        except BaseException as exc:
            told = run.halted(exc)
            await self._record(self._book(caller, plan, accounts, "embeddings", started, t0, prompt=0, completion=0,
                                          cached=0, error=told, admission=admission))
            if (public := as_asked(told, plan.asked, plan.forward.model_id)) is not None:
                raise public from None  # never name the model behind an alias
            if told is not exc:
                raise told from None
            raise
        finally:
            if token is not None:
                ASK_POLICY.reset(token)
            if live is not None and caller.key is not None:
                live.discard(run)
                if not live and self.live.get(caller.key.key_id) is live:
                    del self.live[caller.key.key_id]
        await self._record(self._book(caller, plan, accounts, "embeddings", started, t0,
                                      prompt=result.usage.prompt_tokens, completion=0, cached=0, error=None,
                                      admission=admission))
        return result

    async def preload(self, caller: Caller, request: GenerateRequest, *, on_wait: OnWait | None = None) -> None:
        """Load ``request``'s model (its public name) and run nothing (Ollama's empty prompt):
        checked and admitted by the caller's limits as a request (one of its rpm and
        concurrency, and one prompt token, the least any request of it could use: a key whose
        budget cannot pay for that loads nothing), then :meth:`Orchestrator.preload`, a
        request's cold load. It spends nothing."""
        caller = self.current(caller, self.clock())
        portal = caller.portal
        asked = request.model_id
        served = portal.resolve(asked, caller.key)
        if self.limits is not None:
            self.limits.check_workload(served, embedding=False, named=asked)
        now = self.clock()
        accounts = self.accounts(caller, now)
        reserved = Reservation(1, portal.price(asked)[0] / 1_000_000, lower="")
        if accounts and (refusal := admit(accounts, reserved, now)) is not None:
            self._refuse(caller, refusal)
        admission = self.admitted(caller, reserved, accounts)
        token = ASK_POLICY.set(portal.ask_policy) if portal.ask_policy is not None else None
        try:
            await self.orchestrator.preload(dataclasses.replace(request, model_id=served), on_wait=on_wait,
                                            allow_peers=portal.allow_peers, tenant=portal.tenant(caller.key))
        except GatewayError as exc:
            if (public := as_asked(exc, asked, served)) is not None:
                raise public from None  # never name the model behind an alias
            raise
        finally:
            if token is not None:
                ASK_POLICY.reset(token)
            self.settled(portal.id, admission)
            for account in accounts:
                account.settle(reserved, 0, 0.0, self.clock())

    # --- settling --------------------------------------------------------------------------

    def _book_generation(self, caller: Caller, plan: Plan, accounts: list[Account], run: MeteredGeneration,
                         endpoint: str, started: float, t0: float, error: BaseException | None,
                         group: Sequence[MeteredGeneration | None] = (),
                         admission: Admission | None = None) -> UsageRecord | None:
        """``group``: the generations of every choice of the request (OpenAI's ``n``)."""
        final = run.final
        if final is not None and error is None:
            u = final.usage
            # Billed: the neuron's usage, unless the chunks counted more completion tokens
            # (then a new Usage and result). Nearly always it is the neuron's own, used as it is.
            # A choice but the first bills its answer only (the first bills the prompt).
            if not plan.bills_prompt:
                billed = Usage(0, max(u.completion_tokens, run.completion_tokens), 0)
            else:
                billed = u if run.completion_tokens <= u.completion_tokens else Usage(
                    u.prompt_tokens, run.completion_tokens, u.cached_tokens)
            record = self._book(caller, plan, accounts, endpoint, started, t0, prompt=billed.prompt_tokens,
                                completion=billed.completion_tokens, cached=billed.cached_tokens, error=None,
                                node_id=run.node_id, ttft=run.ttft, admission=admission)
            run.result = final if billed is u else dataclasses.replace(final, usage=billed)
            return record
        completion = run.completion_tokens
        output = completion or any(g is not None and g.completion_tokens for g in group)  # by any choice
        prompt = 0
        if output and plan.bills_prompt:
            # Exact where the neuron said (its first chunk) or the edge counted it, else estimated from its bytes.
            prompt = neurons_count(run, group)
            if prompt is None:
                prompt = plan.prompt_tokens if plan.prompt_tokens is not None else math.ceil(plan.prompt_bytes / 4)
        return self._book(caller, plan, accounts, endpoint, started, t0, prompt=prompt, completion=completion,
                          cached=0, error=error if error is not None else UpstreamError("no result"),
                          node_id=run.node_id, ttft=run.ttft, admission=admission)

    def _book(self, caller: Caller, plan: Plan, accounts: list[Account], endpoint: str, started: float,
              t0: float, *, prompt: int, completion: int, cached: int, error: BaseException | None,
              node_id: str = "", ttft: float | None = None,
              admission: Admission | None = None) -> UsageRecord | None:
        """Settle the accounts and count the metrics, at once (nothing here awaits, so no
        cancellation can come between a reservation and its settling); returns the usage
        record to make durable (:meth:`_record`), None when the portal records no usage.
        ``admission``: the request's (:meth:`admitted`), settled with its accounts."""
        portal = caller.portal
        cost = plan.cost(prompt, completion)  # at the admitted prices, whatever a reload did since
        now = self.clock()
        if admission is not None:
            self.settled(portal.id, admission)
        for account in accounts:
            account.settle(plan.reservation, prompt + completion, cost, now, plan.currency)
        self.spend_unreserved(caller, accounts, prompt + completion, cost, plan.currency, now)
        if error is None:
            outcome, code = "ok", ""
        elif isinstance(error, (trio.Cancelled, ClientGone)):
            outcome, code = "client_gone", "client_gone"
        else:
            outcome = "error"
            code = (error.code if isinstance(error, GatewayError) else to_gateway_error(error).code
                    ) if isinstance(error, Exception) else "cancelled"
            code = code or "error"
        # A name nothing serves is the client's to choose: each would be a series of its own
        # (in /metrics, on the console's Traffic page), so they all count as "-".
        asked = plan.asked if not isinstance(error, ModelNotFound) else "-"
        self.metrics.portal_request(portal.id, asked, outcome, prompt_tokens=prompt, completion_tokens=completion,
                                    cost=cost, currency=plan.currency)
        if self.traffic is not None:
            self.traffic.observe(portal.id, asked, ok=outcome != "error", prompt_tokens=prompt,
                                 completion_tokens=completion, ttft=ttft, key_id=caller.key_id)
        if not plan.recorded:  # as at admission, whatever a reload did since
            return None
        return UsageRecord(
            request_id=plan.forward.request_id, portal=portal.id, key_id=caller.key_id, endpoint=endpoint,
            model_asked=plan.asked, model_served=plan.forward.model_id, started_at=started, ended_at=now,
            prompt_tokens=prompt, cached_tokens=cached, completion_tokens=completion, cost=cost,
            currency=plan.currency, latency=trio.current_time() - t0, ttft=ttft, node_id=node_id,
            outcome=outcome, error_code=code)

    async def _record(self, record: UsageRecord | None) -> None:
        """Make ``record`` durable (with the peer's receipt for a federated request),
        shielded from cancellation: a client that left still has its record written. No
        record (a portal that records no usage): nothing to wait for, and no cancel scope
        on the request's path."""
        if record is None:
            return
        with trio.CancelScope(shield=True):
            if record.node_id == PEER_NODE_ID and self.receipts is not None:
                linked = await self.receipts(record.request_id)
                if linked is not None:
                    record = dataclasses.replace(record, peer_id=linked[0], receipt_signature=linked[1])
            w0 = trio.current_time()
            await self.writer.write(record)
            self.metrics.ledger_written(record.portal, trio.current_time() - w0)


__all__ = ["Caller", "Metering", "MeteredGeneration", "ModelNotFound", "PEER_NODE_ID"]
