"""The orchestrator: where each request runs, when, and getting the model there.

It owns everything that decides: the scheduler's feedback record (:class:`LiveLoad`), the
admission queue (:class:`~.admission.Admission`: requests wait there for a slot, a swap or
a cold load, in priority order and fairly between tenants), the prefix index
(:class:`~.prefix.PrefixIndex`: which neuron likely holds a prompt's prefix in its cache),
the :class:`~.provisioner.Provisioner` (loads planned from the whole queue, evictions by
cost that drain before they unload, idle unloads, keep-warm), the
:class:`~.dispatch.Dispatcher` that runs a request on the targets chosen here (deadlines,
failover, feedback), and the one choice of target: a neuron of this fleet with the model
and a free slot, the queue, a load first, or a peer cortex over the mesh.

The choice is :func:`~.decision.decide`, a pure function over plain data that returns the
seed's :class:`~.scheduler.RoutingDecision`; :class:`Orchestrator` is the thin shell that builds
its inputs from the fleet, acts on it and feeds back what happened. The gateway parses a
request, calls :meth:`Orchestrator.generate` or :meth:`Orchestrator.embed`, and streams.
Each decision is logged at debug level and counted in ``/metrics``
(``helexa_routing_decisions``, ``helexa_prefix_blocks``, the queue's families), and the
:class:`~.dispatch.Generation` carries it (``gen.decision``).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import trio
from opentelemetry import context as otel_context

from helexa import telemetry
from helexa.protocol import EmbedRequest, EmbedResult, GenerateRequest, ModelState, WorkloadClass

from .admission import Admission, OnWait, Pending, Tenant, WaitStatus, excluded
from .catalogue import Catalogue
from .decision import decide
from .dispatch import Dispatcher, Generation, RemoteRouter, Target, model_not_found
from .errors import GatewayError, NoCapacity
from .fleet import Fleet
from .metrics import Metrics, OrchestratorMetrics
from .prefix import PrefixIndex, Prompt, answered_blocks
from .provisioner import Provisioner
from .queue import rank
from .routing_log import RoutingLog, shown
from .scheduler import Hints, LiveLoad, RoutingDecision, classify, prompt_size, schedule, slots_for, snapshot

if TYPE_CHECKING:
    from .config import CortexConfig

__all__ = ["OnWait", "Orchestrator", "Tenant", "WaitStatus", "decide"]

log = logging.getLogger(__name__)

BACKEND_SLOTS = {"llama_cpp": 2}
"""Slots of backends that have a default ``n_parallel`` (llama_cpp.py's own default)."""
MAX_PICKS = 8
"""Times one attempt may go back to the queue (its neuron left between admission and dispatch)."""


class Orchestrator:
    """Decides where and when requests run and runs them there (see the module docstring).

    Args:
        config: the cortex's config (its ``orchestrator`` table).
        fleet: the live fleet, kept current by the control server.
        catalogue: what the operator offers.
        metrics: shared metrics.
        remote_router: the mesh federation (optional; :meth:`set_remote_router`).

    :meth:`run` must be running (it owns the provisioner's loads and housekeeping, and
    admits queued requests as the fleet changes) before requests are served.
    """

    def __init__(self, config: CortexConfig, fleet: Fleet, catalogue: Catalogue, metrics: Metrics | None = None, *,
                 remote_router: RemoteRouter | None = None) -> None:
        self.config = c = config.orchestrator
        self.fleet = fleet
        self.catalogue = catalogue
        self.metrics = metrics or Metrics()
        self.om = OrchestratorMetrics.of(self.metrics)
        self.live = LiveLoad()
        self.prefix = PrefixIndex(c.prefix_cache_blocks, slots=self.slots)
        self.routing_log = RoutingLog()
        """The recent routing decisions (the console's Models page shows them)."""
        self._track = c.routing == "cache" and c.prefix_cache_blocks > 0
        self._max_skew = c.cache_max_skew if c.routing == "cache" else None
        self._slots: dict[str, int] = {}
        self.admission: Admission
        self.provisioner = Provisioner(fleet, catalogue, self.live, c, self.metrics,
                                       demand=lambda: self.admission.queue.demand(),
                                       in_use=lambda n, m: self.admission.in_use(n, m),
                                       on_load_failed=lambda m, e: self.admission.fail(m, e),
                                       on_unloaded=self.prefix.forget)
        self.admission = Admission(c, fleet, self.live, self.prefix, self.metrics,
                                   draining=self.provisioner.draining, slots=self.slots,
                                   loading=self._loading, max_skew=self._max_skew)
        self.dispatcher = Dispatcher(self.live, self.metrics, c, on_end=self._ended)
        self.remote_router = remote_router
        self.waiting = 0
        """Requests waiting for a cold load right now (``/metrics``)."""

    def set_remote_router(self, router: RemoteRouter | None) -> None:
        """Wire (or unwire) the federation after construction."""
        self.remote_router = router

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own cold loads and housekeeping, and admit queued requests as the fleet changes,
        until cancelled."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self.provisioner.run)
            task_status.started()
            known = {link.node_id for link in self.fleet}
            while True:
                await self.fleet.wait_changed()
                now = {link.node_id for link in self.fleet}
                for gone in known - now:
                    self.prefix.forget(gone)
                    self.provisioner.node_gone(gone)
                known = now
                self.admission.pump_all()

    async def unload(self, node_id: str, model_id: str) -> None:
        """An operator's unload: the model takes no new work there, the requests it runs
        finish within ``drain_grace``, then it unloads."""
        await self.provisioner.unload(node_id, model_id, reason="operator")

    def cut(self, error: GatewayError) -> None:
        """The cortex's stop, past its grace: every request waiting in the queue and every
        one running on a neuron ends with ``error`` now, so its surface answers it (a 503,
        or a stream's error event) before the connections close."""
        for model_id in self.admission.queue.models():
            self.admission.fail(model_id, error, "stopping")
        for link in [*self.fleet, self.remote_router]:  # the peers' answers too
            fail = getattr(link, "fail_streams", None)
            if fail is not None:
                fail(error)

    def slots(self, model_id: str) -> int:
        """Requests one neuron runs at once for ``model_id`` (0: no limit known): its
        config's ``n_parallel``, the backend's default, else ``default_slots``."""
        n = self._slots.get(model_id)
        if n is None:
            entry = self.catalogue.get(model_id)
            configured = entry.config.metadata.get("n_parallel") if entry is not None else None
            if isinstance(configured, int) and configured > 0:
                n = configured
            elif entry is not None and entry.backend in BACKEND_SLOTS:
                n = BACKEND_SLOTS[entry.backend]
            else:
                n = self.config.default_slots
            if entry is not None:  # a name nothing serves is the client's: never kept
                self._slots[model_id] = n
        return n

    def _arrived(self, model_id: str, now: float) -> None:
        """Count demand for ``model_id``, a catalogue model: a name nothing serves is the
        client's to choose, and each would stay in the demand table for good."""
        if model_id in self.catalogue:
            self.live.arrived(model_id, now)

    def _loading(self, model_id: str) -> tuple[str | None, float | None] | None:
        if not self.provisioner.loading(model_id):
            return None
        return self.provisioner.load_progress.get(model_id, (None, None))

    def _ended(self, node_id: str, model_id: str) -> None:
        """A request on ``node_id`` ended: its slot may go to the next waiter."""
        self.provisioner.released(node_id, model_id)
        if self.admission.queue.waiting():
            self.admission.pump(model_id)
            self.provisioner.wake()  # a victim may be idle now

    # --- deciding -------------------------------------------------------------------------

    def decide(self, request: GenerateRequest | EmbedRequest, workload: WorkloadClass,
               exclude: frozenset[str] = frozenset(), *, allow_peers: bool = True, blocks: tuple[bytes, ...] = (),
               session: str | None = None, priority: str = "normal") -> RoutingDecision:
        """:func:`decide` on the fleet as it is now, for a request of class ``priority``
        (a class below ``interactive`` leaves ``interactive_slots`` free)."""
        model_id = request.model_id
        usable = self.fleet.usable()
        nodes = [l.node_id for l in usable]
        matches = self.prefix.matches(model_id, blocks, nodes) if blocks else None
        rooms = self.prefix.room(model_id, blocks, nodes) if blocks else None
        slots = slots_for(self.slots(model_id), rank(priority), self.config.interactive_slots)
        state = snapshot(usable, self.live, model_id=model_id, slots=slots,
                         reserved=self.admission.reserved, matches=matches, rooms=rooms,
                         session_node=self.prefix.session_node(model_id, session), draining=self.provisioner.draining)
        hints = Hints(model_id, exclude, blocks=len(blocks))
        waiting = self.admission.queue.waiting(model_id)
        if not waiting:
            # The common case, a free slot here: what the fallbacks need (whether a neuron
            # could hold the model, whether a peer offers it) is not worked out.
            local = schedule(workload, hints, state, max_skew=self._max_skew)
            if local.targets:
                return local
        entry = self.catalogue.get(model_id)
        headroom = self.config.memory_headroom
        router = self.remote_router if allow_peers else None
        return decide(
            workload, hints, state,
            catalogued=entry is not None,
            feasible=entry is not None and any(entry.is_feasible_on(link.descriptor.hardware, headroom)
                                                for link in usable),
            peers=router is not None,
            peer_offers=router is not None and router.can_route(model_id),
            waiting=waiting, max_skew=self._max_skew,
        )

    async def _target(self, request: GenerateRequest | EmbedRequest, workload: WorkloadClass,
                      failed: dict[str, float], on_wait: OnWait | None, allow_peers: bool, tenant: Tenant,
                      arrived: float, deadline: float, blocks: tuple[bytes, ...], session: str | None,
                      chosen: list[RoutingDecision]) -> Target:
        model_id = request.model_id
        if failed:  # a request that failed somewhere stays in the fleet (see decide)
            allow_peers = False
        for _ in range(MAX_PICKS):
            exclude = excluded(failed.items(), model_id, self.fleet) if failed else frozenset()
            decision = self.decide(request, workload, exclude, allow_peers=allow_peers, blocks=blocks, session=session,
                                   priority=tenant.priority)
            if telemetry.enabled():
                with telemetry.tracer().start_as_current_span("orchestrator.decide", attributes={
                        "helexa.model": telemetry.text(model_id), "helexa.decision": decision.mode,
                        "helexa.targets": list(decision.targets), "helexa.excluded": sorted(exclude)}):
                    pass
            match decision.mode:
                case "local":
                    for node_id in decision.targets:
                        if (link := self.fleet.get(node_id)) is not None:
                            return self._chosen(decision, link, blocks, session, chosen)
                case "queue" | "cold_load":
                    if decision.mode == "cold_load":
                        entry = self.catalogue.get(model_id)
                        usable = self.fleet.usable()
                        room = self.config.memory_headroom
                        if entry is None or not any(entry.is_feasible_on(l.descriptor.hardware, room) for l in usable):
                            break  # no neuron here can ever hold it
                        if exclude and any((st := l.models.get(model_id)) is not None
                                           and st.state is ModelState.LOADED for l in usable):
                            break  # it is loaded only where this request already failed
                    pending = Pending(model_id, workload, tenant, arrived, deadline, tuple(failed.items()), blocks,
                                      session)
                    self.waiting += 1
                    try:
                        with (telemetry.tracer().start_as_current_span(f"orchestrator.{decision.mode}", attributes={
                                "helexa.model": model_id}) if telemetry.enabled() else contextlib.nullcontext()):
                            if telemetry.enabled():  # the load this wait starts is part of this trace
                                self.provisioner.trace_parents.setdefault(model_id, otel_context.get_current())
                            node_id, decision = await self.admission.wait(pending, on_wait, self.provisioner.wake)
                    finally:
                        self.waiting -= 1
                    self.admission.claim(node_id, model_id)
                    decision = replace(decision, evictions=self.provisioner.evictions.get(model_id, ())
                                       if self.provisioner.loaded_at.get((node_id, model_id), -1.0) >= arrived
                                       else ())
                    if (link := self.fleet.get(node_id)) is not None:
                        return self._chosen(decision, link, blocks, session, chosen)
                    continue  # it left in between: decide again
                case "peer":
                    assert self.remote_router is not None
                    with trio.move_on_after(self.config.route_timeout):
                        handle = await self.remote_router.route(request)
                        if handle is not None:
                            self._log(decision, handle.node_id)
                            chosen.append(decision)
                            return handle
                    raise model_not_found(model_id, self.remote_router if allow_peers else None)
                case _ if not failed:
                    self._log(decision, None)
                    raise model_not_found(model_id, self.remote_router if allow_peers else None)
            break
        self._log(decision, None)
        raise NoCapacity(f"no usable neuron for model {model_id!r} right now",
                         retry_after=self.config.retry_after)

    def _chosen(self, decision: RoutingDecision, link: Target, blocks: tuple[bytes, ...], session: str | None,
                chosen: list[RoutingDecision]) -> Target:
        if self._track:
            self.prefix.record(link.node_id, decision.model_id, blocks, session)
        self._log(decision, link.node_id)
        chosen.append(decision)
        return link

    def _log(self, d: RoutingDecision, node_id: str | None) -> None:
        # A name nothing serves is the client's to choose: as a label, each would be a new
        # series (a client could grow /metrics without bound), so they all count as "-".
        model = d.model_id if d.mode != "none" or d.model_id in self.catalogue else "-"
        self.om.decided(model, d.mode, d.cache, matched=d.matched, total=d.blocks)
        self.routing_log.record(d, node_id, time.time(), known=model != "-")
        if log.isEnabledFor(logging.DEBUG):
            waited = f" waited={d.waited:.3f}s" if d.waited is not None else ""
            log.debug("route %s mode=%s to=%s cache=%s %d/%d%s evicted=%s: %s",
                      d.model_id if model != "-" else shown(d.model_id), d.mode, node_id,
                      d.cache, d.matched, d.blocks, waited, list(d.evictions), d.reason)

    # --- running --------------------------------------------------------------------------

    def generate(self, request: GenerateRequest, *, endpoint: str = "chat",
                 on_wait: OnWait | None = None, allow_peers: bool = True,
                 tenant: Tenant = Tenant(), session: str | None = None,
                 queue_timeout: float | None = None) -> "Running":
        """``async with orchestrator.generate(request) as gen``: run ``request`` where
        :meth:`decide` says, waiting in the queue, cold-loading and failing over as needed;
        ``gen`` is the dispatcher's :class:`~.dispatch.Generation`.

        Args:
            request: the generation.
            endpoint: the metrics label of the API surface.
            on_wait: awaited with a :class:`WaitStatus` every ``keepalive_interval`` while the
                request waits (its place in the queue, or its model's load).
            allow_peers: False for requests that came from a peer (they never leave again),
                or from a portal whose routing preferences keep it on the local fleet.
            tenant: who the request is for (queueing order and fairness).
            session: the client's session id (``x-session-id`` or ``user``): the request
                goes back where the session went before, cache permitting.
            queue_timeout: the most this request may wait (at most the config's).

        Raises:
            the :mod:`.errors` tree for routing failures (before the context is entered):
            :class:`NoCapacity` with ``Retry-After`` when the queue is full or the wait
            outlasts its deadline; the fleet's and the federation's errors from iteration
            after the stream began.
        """
        workload = classify(request.task, prompt_chars=prompt_size(request), max_tokens=request.sampling.max_tokens)
        arrived = trio.current_time()
        self._arrived(request.model_id, arrived)
        deadline = arrived + min(queue_timeout or self.config.queue_timeout, self.config.queue_timeout)
        prompt = Prompt(request, self.config.prefix_block_chars) if self._track else None
        if session is not None and request.cache_scope:  # one tenant's session id is not another's
            session = f"{request.cache_scope}:{session}"
        blocks = prompt.blocks if prompt is not None else ()
        chosen: list[RoutingDecision] = []

        failed = failures()

        def pick(exclude: frozenset[str]) -> Awaitable[Target]:
            return self._target(request, workload, failed(exclude), on_wait, allow_peers, tenant, arrived, deadline,
                                blocks, session, chosen)

        return Running(self, request, self.dispatcher.generate(request, pick, endpoint=endpoint,
                                                               keep_text=self._track), chosen, prompt)

    async def preload(self, request: GenerateRequest, *, on_wait: OnWait | None = None, allow_peers: bool = True,
                      tenant: Tenant = Tenant()) -> None:
        """Have ``request``'s model loaded, as a request of it would (the same decision,
        queue and cold load, raising the same errors), and run nothing: Ollama's preload
        (an empty prompt). Returns at once where it is loaded already (and not being unloaded),
        or a peer offers it."""
        workload = classify(request.task, prompt_chars=0, max_tokens=request.sampling.max_tokens)
        arrived = trio.current_time()
        self._arrived(request.model_id, arrived)
        model_id = request.model_id
        if any((st := link.models.get(model_id)) is not None and st.state is ModelState.LOADED
               and (link.node_id, model_id) not in self.provisioner.draining  # being unloaded: not for long
               for link in self.fleet.usable()):
            return
        if self.decide(request, workload, allow_peers=allow_peers, priority=tenant.priority).mode == "peer":
            return
        target = await self._target(request, workload, {}, on_wait, False, tenant, arrived,
                                    arrived + self.config.queue_timeout, (), None, [])
        self._ended(target.node_id, model_id)  # the slot it was handed goes to the next waiter

    async def embed(self, request: EmbedRequest, *, allow_peers: bool = True, tenant: Tenant = Tenant(),
                    queue_timeout: float | None = None) -> EmbedResult:
        """Embed where :meth:`decide` says; raises as :meth:`generate` does."""
        arrived = trio.current_time()
        self._arrived(request.model_id, arrived)
        deadline = arrived + min(queue_timeout or self.config.queue_timeout, self.config.queue_timeout)

        failed = failures()

        def pick(exclude: frozenset[str]) -> Awaitable[Target]:
            return self._target(request, WorkloadClass.EMBEDDING, failed(exclude), None, allow_peers, tenant,
                                arrived, deadline, (), None, [])

        return await self.dispatcher.embed(request, pick)

    # --- reading --------------------------------------------------------------------------

    def models(self) -> list[dict[str, Any]]:
        """What ``/v1/models`` lists: catalogue models some usable neuron could hold or has
        loaded, models loaded outside the catalogue, then models only peers offer. Each
        entry: ``id``, ``owned_by``, ``loaded``, ``feasible_on``, ``locations``,
        ``federated`` (and, for peers' models, ``operators`` and ``peers``)."""
        usable = self.fleet.usable()
        loaded: dict[str, list[str]] = {}
        for link in usable:
            for model_id, status in link.models.items():
                if status.state is ModelState.LOADED:
                    loaded.setdefault(model_id, []).append(link.node_id)
        entries = []
        for entry in self.catalogue:
            feasible = sorted(l.node_id for l in usable
                              if entry.is_feasible_on(l.descriptor.hardware, self.config.memory_headroom))
            locations = sorted(loaded.get(entry.id, ()))
            if feasible or locations:
                entries.append(_listing(entry.id, entry.owned_by, feasible, locations))
        for model_id in sorted(set(loaded) - {e.id for e in self.catalogue}):
            entries.append(_listing(model_id, None, [], sorted(loaded[model_id])))
        if self.remote_router is not None:
            listed = {e["id"] for e in entries}
            for model_id, fields in sorted(self.remote_router.listing().items()):
                if model_id not in listed:
                    entries.append({**_listing(model_id, None, [], []), **fields})
        return entries


class Running:
    """:meth:`Orchestrator.generate`'s context: the dispatcher's, plus what the orchestrator
    does around it (the decision on the generation; the answer into the prefix index). A
    class rather than ``@asynccontextmanager``: it is on every request's path, where each
    generator-based layer was a measurable share (docs/benchmarks.md, 2026-11-30, item 2)."""

    __slots__ = ("_orchestrator", "_request", "_context", "_chosen", "_gen", "_prompt")

    def __init__(self, orchestrator: Orchestrator, request: GenerateRequest,
                 context: AbstractAsyncContextManager[Generation], chosen: list[RoutingDecision],
                 prompt: Prompt | None = None) -> None:
        self._orchestrator = orchestrator
        self._request = request
        self._context = context
        self._chosen = chosen
        self._gen: Generation | None = None
        self._prompt = prompt

    async def __aenter__(self) -> Generation:
        gen = self._gen = await self._context.__aenter__()
        gen.decision = self._chosen[-1] if self._chosen else None
        return gen

    async def __aexit__(self, *exc_info: Any) -> bool | None:
        suppressed = await self._context.__aexit__(*exc_info)
        gen, o = self._gen, self._orchestrator
        if exc_info[0] is None and o._track and gen is not None and gen.text is not None and gen.result is not None:
            o.prefix.record(gen.node_id, self._request.model_id,
                            answered_blocks(self._request, "".join(gen.text), o.config.prefix_block_chars,
                                            prompt=self._prompt))
        return suppressed


def failures() -> Callable[[frozenset[str]], dict[str, float]]:
    """The neurons a request failed on, each with when it first failed there, from the
    dispatcher's growing ``exclude`` (a retry is asked for right after the failure)."""
    failed: dict[str, float] = {}

    def update(exclude: frozenset[str]) -> dict[str, float]:
        if len(exclude) != len(failed):
            now = trio.current_time()
            for node_id in exclude:
                failed.setdefault(node_id, now)
        return failed

    return update


def _listing(model_id: str, owned_by: str | None, feasible: list[str], locations: list[str]) -> dict[str, Any]:
    return {"id": model_id, "owned_by": owned_by, "loaded": bool(locations), "feasible_on": feasible,
            "locations": locations, "federated": False}
