"""The orchestrator: where each request runs, and getting the model there.

It owns everything that decides: the scheduler's feedback record (:class:`LiveLoad`), the
:class:`~.provisioner.Provisioner` (cold loads, eviction, idle unloads, keep-warm), the
:class:`~.dispatch.Dispatcher` that runs a request on the targets chosen here (deadlines,
failover, feedback), and the one choice of target: a neuron of this fleet that has the
model, a neuron that must load it first, or a peer cortex over the mesh.

The choice is :func:`decide`, a pure function over plain data that returns the seed's
:class:`~.scheduler.RoutingDecision`; :class:`Orchestrator` is the thin shell that builds
its inputs from the fleet, acts on it and feeds back what happened. The gateway parses a
request, calls :meth:`Orchestrator.generate` or :meth:`Orchestrator.embed`, and streams.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import trio

from helexa import telemetry
from helexa.protocol import EmbedRequest, EmbedResult, GenerateRequest, ModelState, WorkloadClass

from .catalogue import Catalogue
from .dispatch import Dispatcher, Generation, RemoteRouter, Target
from .errors import ModelNotFound, NoCapacity
from .fleet import Fleet
from .metrics import Metrics
from .provisioner import Provisioner
from .scheduler import Hints, LiveLoad, RoutingDecision, SchedulerState, classify, prompt_size, schedule, snapshot

if TYPE_CHECKING:
    from .config import CortexConfig

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Tenant:
    """Who a request is for, as the orchestrator sees it: the portal and key it came
    through (for fairness between tenants), its priority class (``interactive`` before
    ``normal`` before ``bulk``) and its weight in fair sharing. Requests from peers and
    from open portals without keys use the defaults."""

    portal: str = "default"
    key: str = ""
    priority: str = "normal"
    weight: float = 1.0


@dataclass(frozen=True, slots=True)
class WaitStatus:
    """What a request that cannot start yet is waiting for, passed to ``on_wait`` on every
    keep-alive tick (the API surfaces turn it into a keep-alive their clients ignore and
    people can read).

    ``stage`` is ``loading`` (a cold load: ``load_stage`` such as ``download`` or ``load``,
    and ``progress`` 0..1 when the neuron reports it) or ``queued`` (``position`` in the
    model's queue, 1 = next, and ``eta`` seconds when an estimate exists).
    """

    model_id: str
    stage: str
    load_stage: str | None = None
    progress: float | None = None
    position: int | None = None
    eta: float | None = None

    def describe(self) -> str:
        """One line for people: ``loading m: download 42%`` or ``queued for m: 3rd, ~2s``."""
        if self.stage == "loading":
            done = f" {self.progress:.0%}" if self.progress is not None else ""
            return f"loading {self.model_id}: {self.load_stage or 'load'}{done}"
        where = f" position {self.position}" if self.position is not None else ""
        eta = f", ~{self.eta:.0f}s" if self.eta is not None else ""
        return f"queued for {self.model_id}:{where}{eta}"


OnWait = Callable[[WaitStatus], Awaitable[None]]
"""Awaited every ``keepalive_interval`` while a request waits (a cold load, a queue)."""


def decide(
    workload: WorkloadClass, hints: Hints, state: SchedulerState, *, catalogued: bool, feasible: bool,
    peers: bool, peer_offers: bool,
) -> RoutingDecision:
    """Where a request for ``hints.model_id`` goes. Pure.

    Args:
        workload: the request's class.
        hints: the model, and neurons to avoid (those that already failed this request).
        state: the usable neurons that have the model loaded, with their live load.
        catalogued: the operator's catalogue lists the model.
        feasible: some usable neuron here could hold it (all its memory free).
        peers: the request may go to a peer cortex (a mesh is joined and policy allows).
        peer_offers: a live peer offers the model and the ask policy allows it.

    Returns:
        A decision whose ``mode`` is ``local`` (``targets`` best first), ``cold_load`` (load
        it here first), ``peer``, or ``none`` (nothing can serve it: 404 for a model unknown
        here, 503 when it was known but every neuron failed).

    A request that already failed somewhere (``hints.exclude``) never leaves for a peer:
    failover stays in the fleet, and the federation tries its peers in turn itself.
    """
    local = schedule(workload, hints, state)
    if local.targets:
        return local
    retrying = bool(hints.exclude)
    if catalogued and (feasible or retrying or not (peers and peer_offers)):
        return RoutingDecision(hints.model_id, workload, (), mode="cold_load",
                               reason="not loaded on a usable neuron" if feasible else "no neuron here can hold it")
    if peers and not retrying:
        return RoutingDecision(hints.model_id, workload, (), mode="peer",
                               reason="offered by a peer" if peer_offers else "unknown here")
    return RoutingDecision(hints.model_id, workload, (), mode="none",
                           reason="every neuron with it failed" if retrying else "unknown here")


class Orchestrator:
    """Decides where requests run and runs them there (see the module docstring).

    Args:
        config: the cortex's config (its ``orchestrator`` table).
        fleet: the live fleet, kept current by the control server.
        catalogue: what the operator offers.
        metrics: shared metrics.
        remote_router: the mesh federation (optional; :meth:`set_remote_router`).

    :meth:`run` must be running (it owns the provisioner's loads and housekeeping) before
    requests are served.
    """

    def __init__(self, config: CortexConfig, fleet: Fleet, catalogue: Catalogue, metrics: Metrics | None = None, *,
                 remote_router: RemoteRouter | None = None) -> None:
        self.config = config.orchestrator
        self.fleet = fleet
        self.catalogue = catalogue
        self.metrics = metrics or Metrics()
        self.live = LiveLoad()
        self.provisioner = Provisioner(fleet, catalogue, self.live, self.config, self.metrics)
        self.dispatcher = Dispatcher(self.live, self.metrics, self.config)
        self.remote_router = remote_router
        self.waiting = 0
        """Requests waiting for a cold load right now (``/metrics``)."""

    def set_remote_router(self, router: RemoteRouter | None) -> None:
        """Wire (or unwire) the federation after construction."""
        self.remote_router = router

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own cold loads and housekeeping until cancelled."""
        await self.provisioner.run(task_status=task_status)

    # --- deciding -------------------------------------------------------------------------

    def decide(self, request: GenerateRequest | EmbedRequest, workload: WorkloadClass,
               exclude: frozenset[str] = frozenset(), *, allow_peers: bool = True) -> RoutingDecision:
        """:func:`decide` on the fleet as it is now."""
        model_id = request.model_id
        usable = self.fleet.usable()
        entry = self.catalogue.get(model_id)
        router = self.remote_router if allow_peers else None
        return decide(
            workload, Hints(model_id, exclude), snapshot(usable, self.live, model_id=model_id),
            catalogued=entry is not None,
            feasible=entry is not None and any(entry.is_feasible_on(link.descriptor.hardware) for link in usable),
            peers=router is not None,
            peer_offers=router is not None and router.can_route(model_id),
        )

    async def _target(self, request: GenerateRequest | EmbedRequest, workload: WorkloadClass,
                      exclude: frozenset[str], on_wait: OnWait | None,
                      allow_peers: bool) -> Target:
        decision = self.decide(request, workload, exclude, allow_peers=allow_peers)
        if telemetry.enabled():
            with telemetry.tracer().start_as_current_span("orchestrator.decide", attributes={
                    "helexa.model": request.model_id, "helexa.decision": decision.mode,
                    "helexa.targets": list(decision.targets), "helexa.excluded": sorted(exclude)}):
                pass
        match decision.mode:
            case "local":
                for node_id in decision.targets:
                    if (link := self.fleet.get(node_id)) is not None:
                        return link
            case "cold_load":
                waited = trio.current_time()
                def status() -> WaitStatus:
                    stage, progress = self.provisioner.load_progress.get(request.model_id, (None, None))
                    return WaitStatus(request.model_id, "loading", stage, progress)

                self.waiting += 1
                try:
                    with (telemetry.tracer().start_as_current_span("orchestrator.cold_load", attributes={
                            "helexa.model": request.model_id}) if telemetry.enabled() else contextlib.nullcontext()):
                        node_id = await _with_ticks(self.provisioner.ensure_loaded(request.model_id), on_wait,
                                                    status, self.config.keepalive_interval)
                finally:
                    self.waiting -= 1
                self.metrics.queued(request.model_id, trio.current_time() - waited)
                link = self.fleet.get(node_id)
                if link is not None and node_id not in exclude:
                    return link
            case "peer":
                assert self.remote_router is not None
                with trio.move_on_after(self.config.route_timeout):
                    handle = await self.remote_router.route(request)
                    if handle is not None:
                        return handle
                raise ModelNotFound(request.model_id)
            case _ if not exclude:
                raise ModelNotFound(request.model_id)
        raise NoCapacity(f"no usable neuron for model {request.model_id!r} right now",
                         retry_after=self.config.retry_after)

    # --- running --------------------------------------------------------------------------

    @asynccontextmanager
    async def generate(self, request: GenerateRequest, *, endpoint: str = "chat",
                       on_wait: OnWait | None = None, allow_peers: bool = True,
                       tenant: Tenant = Tenant()) -> AsyncIterator[Generation]:
        """Run ``request`` where :meth:`decide` says, cold-loading and failing over as needed.

        Args:
            request: the generation.
            endpoint: the metrics label of the API surface.
            on_wait: awaited with a :class:`WaitStatus` every ``keepalive_interval`` while the
                request waits for a cold load.
            allow_peers: False for requests that came from a peer (they never leave again),
                or from a portal whose routing preferences keep it on the local fleet.
            tenant: who the request is for (queueing order and fairness).

        Raises:
            the :mod:`.errors` tree for routing failures (before the context is entered);
            the fleet's and the federation's errors from iteration after the stream began.
        """
        workload = classify(request.task, prompt_chars=prompt_size(request), max_tokens=request.sampling.max_tokens)

        def pick(exclude: frozenset[str]) -> Awaitable[Target]:
            return self._target(request, workload, exclude, on_wait, allow_peers)

        async with self.dispatcher.generate(request, pick, endpoint=endpoint) as gen:
            yield gen

    async def embed(self, request: EmbedRequest, *, allow_peers: bool = True, tenant: Tenant = Tenant()) -> EmbedResult:
        """Embed where :meth:`decide` says; raises as :meth:`generate` does."""
        def pick(exclude: frozenset[str]) -> Awaitable[Target]:
            return self._target(request, WorkloadClass.EMBEDDING, exclude, None, allow_peers)

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
            feasible = sorted(l.node_id for l in usable if entry.is_feasible_on(l.descriptor.hardware))
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


def _listing(model_id: str, owned_by: str | None, feasible: list[str], locations: list[str]) -> dict[str, Any]:
    return {"id": model_id, "owned_by": owned_by, "loaded": bool(locations), "feasible_on": feasible,
            "locations": locations, "federated": False}


async def _with_ticks(awaitable: Awaitable[T], on_tick: OnWait | None, status: Callable[[], WaitStatus],
                      interval: float) -> T:
    """Await ``awaitable``, calling ``on_tick(status())`` every ``interval`` seconds meanwhile."""
    if on_tick is None:
        return await awaitable
    result: list[T] = []
    error: list[Exception] = []

    async def ticker() -> None:
        while True:
            await trio.sleep(interval)
            await on_tick(status())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ticker)
        try:
            result.append(await awaitable)
        except Exception as exc:  # re-raised bare below, not wrapped in an ExceptionGroup
            error.append(exc)
        nursery.cancel_scope.cancel()
    if error:
        raise error[0]
    return result[0]
