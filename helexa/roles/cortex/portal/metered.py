"""One metered generation: what :meth:`.metering.Metering.generate` returns.

:class:`MeteredRun` is the ``async with`` context (admit, run on the orchestrator, book);
:class:`MeteredGeneration` is what it yields. Classes rather than ``@asynccontextmanager``:
this is on every request's path, where each generator-based layer was a measurable share
(docs/benchmarks.md, 2026-11-30, item 2).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import trio

from helexa.protocol import GenerateRequest, GenerateResult, TokenChunk

from ..errors import Unauthorized, UpstreamError, as_asked
from .quota import Account, Refusal, admit, beyond
from .routing import ASK_POLICY

_COUNT_TIMEOUT_S = 5.0
"""How long counting a cut generation's prompt may hold its record (a cold tokenizer loads in under a second)."""

if TYPE_CHECKING:
    from ..orchestrator import OnWait
    from .accounts import Admission
    from .metering import Caller, Metering, Plan


class MeteredGeneration:
    """What :meth:`Metering.generate` yields: iterate it for the :class:`TokenChunk`\\ s;
    after the ``async with`` block, :attr:`result` is the :class:`GenerateResult` (text
    and tool calls not sent as chunks, and the usage billed), on disk in the ledger."""

    __slots__ = ("_gen", "completion_tokens", "prompt_tokens", "final", "result", "node_id", "ttft", "stop", "_whole",
                 "_scope", "_waiting")

    def __init__(self, whole: bool = False) -> None:
        self._gen: Any = None
        self._whole = whole
        """A whole (non-streamed) answer: no event comes before its end, so :meth:`halt` cuts its wait."""
        self._scope: trio.CancelScope | None = None
        """Around the run (a keyed caller's), cancelled by :meth:`halt` while :attr:`_waiting`."""
        self._waiting = False
        self.completion_tokens = 0
        self.prompt_tokens: int | None = None
        """The prompt's exact count as the neuron's backend read it, from the first chunk
        (``TokenChunk.prompt_tokens``) where it says: what a generation cut short bills."""
        self.final: GenerateResult | None = None
        self.result: GenerateResult | None = None
        self.node_id = ""
        self.ttft: float | None = None
        self.stop: Exception | None = None
        """Set when the key was revoked (or expired) while this ran: raised at its next event."""

    def halt(self, error: Exception) -> None:
        """Stop this generation with ``error`` (its key was revoked or expired): a stream at its
        next event; a request still waiting for its first event (queued, or a whole answer
        generating, which has no event before its end) at once: its wait is cancelled, so the
        neuron is told to stop instead of generating, unbilled, what the client never gets."""
        self.stop = error
        if self._waiting and self._scope is not None:
            self._scope.cancel()

    def halting(self) -> trio.CancelScope:
        """A cancel scope for a wait with no event before its end (an embedding's answer),
        which :meth:`halt` cancels: enter it around that wait."""
        self._scope = trio.CancelScope()
        self._waiting = True
        return self._scope

    def halted(self, exc: BaseException) -> BaseException:
        """What a generation that ended with ``exc`` tells its client: the :meth:`halt` error
        where the halt cancelled it."""
        return self.stop if self.stop is not None and isinstance(exc, trio.Cancelled) else exc

    def __aiter__(self) -> "MeteredGeneration":
        return self

    async def __anext__(self) -> TokenChunk:
        if self.final is not None:
            raise StopAsyncIteration
        if self.stop is not None:
            raise self.stop
        if self._whole:
            self._waiting = True
            try:
                event = await self._gen.__anext__()
            finally:
                self._waiting = False
        else:
            event = await self._gen.__anext__()
        if self.stop is not None:
            raise self.stop
        if type(event) is TokenChunk:
            self.completion_tokens += event.tokens
            if event.prompt_tokens is not None:  # the first chunk's (a neuron of an earlier release: none)
                self.prompt_tokens = event.prompt_tokens
            return event
        self.final = event
        raise StopAsyncIteration


class MeteredRun:
    """``async with metering.generate(...) as run`` (see :meth:`Metering.generate`)."""

    __slots__ = ("_metering", "_caller", "_request", "_endpoint", "_on_wait", "_image", "_session",
                 "_plan", "_accounts", "_run", "_context", "_gen", "_started", "_t0", "_token", "_copies",
                 "_choice", "_group", "_admitted", "_admission")

    def __init__(self, metering: Metering, caller: Caller, request: GenerateRequest, endpoint: str,
                 on_wait: OnWait | None, image: str | None, session: str | None, copies: int = 1, choice: int = 0,
                 group: Sequence[MeteredGeneration | None] = (), admitted: trio.Event | None = None) -> None:
        self._metering = metering
        self._admitted = admitted
        self._copies = copies
        self._choice = choice
        self._group = group
        self._caller = caller
        self._request = request
        self._endpoint = endpoint
        self._on_wait = on_wait
        self._image = image
        self._session = session
        self._token: Any = None
        self._admission: Admission | None = None

    async def __aenter__(self) -> MeteredGeneration:
        m, request = self._metering, self._request
        caller = self._caller = m.current(self._caller, m.clock())  # its key as it is now, not at its head
        portal = caller.portal
        asked = request.model_id
        served = portal.resolve(asked, caller.key)  # once: the model checked is the model planned
        if m.limits is not None:
            # Checked as the model behind the portal's name, answered under the name asked.
            checked = await m.limits.check(request if served == asked else dataclasses.replace(request, model_id=served),
                                           image=self._image, named=asked)
            request = checked if served == asked else dataclasses.replace(checked, model_id=asked)
        now = m.clock()
        accounts = self._accounts = m.accounts(caller, now)
        plan = self._plan = m._plan_generate(caller, request, served, bounded=bool(accounts),
                                             counted=bool(accounts) or portal.records_usage)
        if self._copies > 1:
            # The prompt is reserved (and billed) once, with choice 0; the whole request is
            # judged from its exact count at once, so it is not counted again below.
            if accounts:
                plan = await self._exact(request, plan, served)
                if (refusal := beyond(accounts, plan.whole(self._copies), self._copies)) is not None:
                    m._refuse(caller, refusal)
            plan = self._plan = plan.choice(self._choice)
            if accounts and self._choice and self._admitted is not None:
                # Choice 0 takes the call's one rpm request: none other runs before it is admitted
                # (its refusal cancels the rest while they wait here, holding nothing).
                await self._admitted.wait()
                now = m.clock()
                accounts[:] = m.accounts(caller, now)  # a reload may have given it limits meanwhile
            if accounts and (refusal := admit(accounts, plan.reservation, now)) is not None:
                m._refuse(caller, refusal)
            if self._choice == 0 and self._admitted is not None:
                self._admitted.set()
        elif accounts and (refusal := admit(accounts, plan.reservation, now)) is not None:
            plan = self._plan = await self._recounted(request, plan, refusal, served, accounts, now)
        self._admission = m.admitted(caller, plan.reservation, accounts)  # settled by _book
        run = self._run = MeteredGeneration(whole=not request.stream)
        if caller.key is not None:
            m.live.setdefault(caller.key.key_id, set()).add(run)
            try:  # revoked while it was checked and admitted (awaits, before a revoke could find it here)
                m.current(caller, m.clock())
            except Unauthorized as exc:
                run.stop = exc
        self._started, self._t0 = now, trio.current_time()
        if portal.ask_policy is not None:
            self._token = ASK_POLICY.set(portal.ask_policy)
        context = m.orchestrator.generate(plan.forward, endpoint=self._endpoint, on_wait=self._on_wait,
                                          allow_peers=portal.allow_peers, tenant=portal.tenant(caller.key),
                                          session=self._session)
        try:
            if caller.key is not None:  # a revoke of the key cuts the wait for the first event
                run._scope = trio.CancelScope()
                run._scope.__enter__()
                run._waiting = True
                if run.stop is not None:
                    run._scope.cancel()
            try:
                gen = self._gen = await context.__aenter__()
            finally:
                run._waiting = False
        except BaseException as exc:
            told = run.halted(exc)
            try:
                await self._failed(told)
            finally:
                self._leave()
            if told is exc:
                raise
            raise told from None
        self._context = context
        run._gen = gen
        run.node_id = gen.node_id
        return run

    async def _exact(self, request: GenerateRequest, plan: Plan, served: str) -> Plan:
        """``plan`` again from the prompt's exact token count, where that is smaller; either
        way with the count (:attr:`Plan.prompt_tokens`, what a generation cut short bills)."""
        m = self._metering
        if m.limits is None:
            return plan
        count = await m.limits.counter.count(request if served == request.model_id
                                             else dataclasses.replace(request, model_id=served))
        if count is not None and count.exact and count.tokens < plan.reservation.tokens:
            exact = m._plan_generate(self._caller, dataclasses.replace(request, prompt_tokens=count.tokens), served,
                                     bounded=True, counted=True)
            if exact.reservation.tokens < plan.reservation.tokens:
                return dataclasses.replace(exact, prompt_tokens=count.tokens)
            return dataclasses.replace(plan, prompt_tokens=count.tokens)  # exact, though its bound held
        return plan

    async def _recounted(self, request: GenerateRequest, plan: Plan, refusal: Refusal, served: str,
                         accounts: list[Account], now: float) -> Plan:
        """A refused request's plan again, from its prompt's exact token count, when that
        count admits it; else the refusal, raised. The edge bounds a short prompt's tokens
        by its bytes (:mod:`..request_limits`), which is several times the count for a
        short chat (a template's own text): enough for a small ``tpm`` or budget to refuse
        what it can take."""
        m, caller = self._metering, self._caller
        if refusal.code in ("too_large", "tokens", "budget"):
            exact = await self._exact(request, plan, served)
            if exact.reservation.tokens < plan.reservation.tokens:  # (else it carries only the count)
                now = m.clock()
                accounts[:] = m.accounts(caller, now)  # a reload may have given it limits meanwhile
                again = admit(accounts, exact.reservation, now)
                if again is None:
                    return exact
                refusal = again
        m._refuse(caller, refusal)

    async def __aexit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        try:
            return await self._exit(exc_type, exc, tb)
        finally:
            self._leave()

    def _leave(self) -> None:
        """Leave the run's cancel scope (see :meth:`MeteredGeneration.halt`), if it has one."""
        run = self._run
        scope, run._scope = run._scope, None
        if scope is not None:
            scope.__exit__(None, None, None)

    async def _exit(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        run = self._run
        try:
            # Its first event came (the generation began), however it ended: a stream its
            # neuron cut, or its client left, is booked with its time to first token too.
            run.ttft = getattr(self._gen, "ttft", None)
            suppressed = await self._context.__aexit__(exc_type, exc, tb)
        except BaseException as raised:
            told = run.halted(raised)
            await self._failed(told)
            if told is raised:
                raise
            raise told from None
        if exc is not None and not suppressed:
            told = run.halted(exc)
            await self._failed(told)
            if told is not exc:
                raise told from None
            return False
        self._reset()
        m = self._metering
        await m._record(m._book_generation(self._caller, self._plan, self._accounts, run, self._endpoint,
                                           self._started, self._t0, None, self._group, self._admission))
        if run.result is None:
            raise UpstreamError("the generation ended without a result", code="empty_stream")
        return bool(suppressed)

    async def _failed(self, exc: BaseException) -> None:
        """Book a generation that failed with ``exc``; the caller raises it, unless this
        raises what the client must see instead (an alias's model is never named)."""
        m, plan = self._metering, self._plan
        try:
            if plan.prompt_tokens is None and plan.prompt_bytes and neurons_count(self._run, self._group) is None:
                # a prompt billed here, with no exact count yet (neither the edge's nor the neuron's)
                plan = self._plan = await self._counted_prompt(plan)
            await m._record(m._book_generation(self._caller, plan, self._accounts, self._run, self._endpoint,
                                               self._started, self._t0, exc, self._group, self._admission))
            if (public := as_asked(exc, plan.asked, plan.forward.model_id)) is not None:
                raise public from None  # never name the model behind an alias
        finally:
            self._reset()

    async def _counted_prompt(self, plan: Plan) -> Plan:
        """``plan`` with its prompt's exact count (the edge's tokenizer), for a generation that
        ends without the neuron's usage (the client left, or it failed) once it produced
        output: so it is billed for its real prompt, not an estimate from its bytes. Shielded
        (a client that left cancels the request) and bounded in time; no exact count (a model
        the edge cannot tokenize, a tool syntax it does not render): ``plan`` as it was."""
        m, run = self._metering, self._run
        output = run is not None and (run.completion_tokens or any(g is not None and g.completion_tokens
                                                                   for g in self._group))
        if not output or m.limits is None or not isinstance(plan.forward, GenerateRequest):
            return plan
        with trio.CancelScope(shield=True), trio.move_on_after(_COUNT_TIMEOUT_S):
            count = await m.limits.counter.count(plan.forward)
            if count is not None and count.exact:
                return dataclasses.replace(plan, prompt_tokens=count.tokens)
        return plan

    def _reset(self) -> None:
        key = self._caller.key
        if key is not None and (live := self._metering.live.get(key.key_id)) is not None:
            live.discard(self._run)
            if not live:
                del self._metering.live[key.key_id]
        if self._token is not None:
            ASK_POLICY.reset(self._token)
            self._token = None


def neurons_count(run: MeteredGeneration | None, group: Sequence[MeteredGeneration | None] = ()) -> int | None:
    """The prompt's exact count a neuron sent with the first chunk of ``run``, else of
    another choice of its request (OpenAI's ``n``: one prompt for all); None if none did."""
    if run is not None and run.prompt_tokens is not None:
        return run.prompt_tokens
    for g in group:
        if g is not None and g.prompt_tokens is not None:
            return g.prompt_tokens
    return None
