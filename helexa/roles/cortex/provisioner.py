"""Getting models onto neurons and off them: the thin shell over :mod:`.placement`.

:class:`Provisioner` carries out what the pure core decides, through
:meth:`NeuronLink.provision`:

* **Loads for the queue.** Whenever the admission queue, the fleet or a load changes, it
  asks :func:`~.placement.plan_loads` which waiting models to load where (evicting what
  the :class:`~.placement.Policy` lets go), and when to look again if nothing can be
  placed yet (a resident's minimum residency, or the drain of its own queue, lapsing).
  A model whose every slot is busy while requests wait gets another copy on a neuron
  with memory to spare (never by evicting).
* **Single-flight loads.** However many requests race for a model, one load runs (in the
  provisioner's own nursery, so a client leaving does not abort it);
  :meth:`ensure_loaded` joins it with its own deadline.
* **Drain before evict.** No unload (an eviction, an idle TTL, :meth:`unload` for an
  operator) cuts a running request: the model is marked draining (the orchestrator stops
  admitting work to it), the requests it runs finish within ``drain_grace``, and only
  then is ``UnloadModel`` sent, carrying what is left of the grace for the neuron's own
  drain.
* **Backoff.** A load that failed on a neuron is not tried there again until its backoff
  ends (:mod:`.load_backoff`); requests meanwhile get ``load_failed`` at once.
* **Keep-warm** models are kept resident; **idle** ones unload at their TTL (the
  background pass that sees to it, and to the loads above, is :mod:`.housekeeping`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from typing import TYPE_CHECKING, Any

import trio
from opentelemetry.trace import Status, StatusCode

from helexa import telemetry
from helexa.protocol import LoadModel, LoadProgress, UnloadModel, UpsertModelConfig

from .catalogue import Catalogue, CatalogueEntry
from .errors import GatewayError, ColdLoadFailed, ModelNotFound, NoCapacity
from .fleet import Fleet, FleetError, NeuronGone
from .flights import Flight as _Flight, Refused as _Refused, command_id as _cid
from . import queue_loads
from .housekeeping import Housekeeping
from .load_backoff import LoadBackoff
from .metrics import Metrics, OrchestratorMetrics
from .operator_actions import OperatorActions
from .fleet_views import views as fleet_views
from .placement import LoadPlan, NodeView, NoPlacement, Policy, Unload, place
from .queue import Demand
from .scheduler import LiveLoad

if TYPE_CHECKING:
    from .config import OrchestratorConfig

__all__ = ["Provisioner"]

log = logging.getLogger(__name__)


# --- the shell ---------------------------------------------------------------------------


class Provisioner:
    """Loads and unloads catalogued models on the fleet (see the module docstring).

    Args:
        fleet, catalogue, live, settings, metrics: the cortex's own.
        demand: what the admission queue waits for, per model (no queue: nothing).
        in_use: requests of a model running or admitted on a neuron (default: the
            dispatcher's count in ``live``); an unload drains until it is 0.
        on_load_failed: told when a load for the queue failed on every neuron, so that the
            requests waiting for it fail at once instead of at their deadlines.
        on_unloaded: told after a model left a neuron (its cache went with it).

    Start :meth:`run` in a nursery before calling :meth:`ensure_loaded`; call :meth:`wake`
    when the queue changed and :meth:`released` when a request ended.
    """

    def __init__(
        self,
        fleet: Fleet,
        catalogue: Catalogue,
        live: LiveLoad,
        settings: OrchestratorConfig,
        metrics: Metrics | None = None,
        *,
        demand: Callable[[], dict[str, Demand]] = dict,
        in_use: Callable[[str, str], int] | None = None,
        on_load_failed: Callable[[str, GatewayError], None] = lambda model_id, error: None,
        on_unloaded: Callable[[str, str], None] = lambda node_id, model_id: None,
    ) -> None:
        self.fleet = fleet
        self.catalogue = catalogue
        self.live = live
        self.settings = settings
        self.metrics = metrics
        self._om = OrchestratorMetrics.of(metrics) if metrics is not None else None
        self._demand = demand
        self._in_use = in_use or (lambda node_id, model_id: live.model_in_flight.get((node_id, model_id), 0))
        self._on_load_failed = on_load_failed
        self._on_unloaded = on_unloaded
        self._flights: dict[str, _Flight] = {}
        self.load_times: dict[str, float] = {}
        """The last measured cold-load time of each model, in seconds (announced to peers,
        and what eviction weighs)."""
        self.load_progress: dict[str, tuple[str, float]] = {}
        """Models loading right now: (stage, fraction done), from the neuron's progress events."""
        self.loaded_at: dict[tuple[str, str], float] = {}
        """When each (neuron, model) became resident (first sight, for what was there before)."""
        self.provisioned: set[tuple[str, str]] = set()
        """(neuron, model) copies the cortex loaded of its own accord, not as an operator
        asked: unloaded once their model leaves the catalogue (:mod:`.retirement`)."""
        self.draining: set[tuple[str, str]] = set()
        """(neuron, model) pairs being unloaded: no new work goes there."""
        self._swapped: set[str] = set()  # models draining to make room for another
        self.evictions: dict[str, tuple[str, ...]] = {}
        """The evictions each model's last load caused."""
        self._pending: dict[str, str] = {}  # model -> neuron of a load under way
        self._idle: dict[tuple[str, str], trio.Event] = {}
        self._unloading: dict[tuple[str, str], _Flight] = {}  # (neuron, model) -> its unload under way
        self.trace_parents: dict[str, Any] = {}
        """Model -> the trace context of the first request waiting for its load (tracing on)."""
        self._nursery: trio.Nursery | None = None
        self.backoff = LoadBackoff()
        """The (model, neuron) loads that failed lately, not tried again until their backoff ends."""
        self.operator = OperatorActions(self)
        """The operator's commands: load here, unload there, pull, pin."""
        self.housekeeping = Housekeeping(self)
        """The background pass: keep-warm and pinned loads, idle unloads, the queue's loads."""

    @property
    def policy(self) -> Policy:
        s = self.settings
        return Policy(s.swap_policy, s.min_residency, s.swap_drain, s.swap_hold_loads)

    # --- requests ------------------------------------------------------------------------

    async def ensure_loaded(self, model_id: str, *, timeout: float | None = None) -> str:
        """Cold-load ``model_id`` (or join the load already running) and return the node id.

        Raises:
            ModelNotFound: not in the catalogue.
            NoCapacity: nowhere to put it, or not loaded within ``timeout`` (default
                ``cold_load_wait``); the load itself goes on.
            ColdLoadFailed: every feasible neuron refused or failed the load.
        """
        entry = self.catalogue.get(model_id)
        if entry is None:
            raise ModelNotFound(model_id)
        flight = self._start_flight(entry)
        with trio.move_on_after(self.settings.cold_load_wait if timeout is None else timeout):
            await flight.done.wait()
        if not flight.done.is_set():
            raise NoCapacity(f"model {model_id!r} is still loading", retry_after=self.settings.retry_after,
                             code="model_loading")
        if flight.error is not None:
            raise flight.error
        assert flight.node_id is not None
        return flight.node_id

    def loading(self, model_id: str) -> bool:
        return model_id in self._flights

    async def join_load(self, model_id: str) -> str | None:
        """Wait for the load of ``model_id`` under way, if any, and return the node it loaded
        on (None: none was under way). Raises that load's error."""
        flight = self._flights.get(model_id)
        if flight is None:
            return None
        await flight.done.wait()
        if flight.error is not None:
            raise flight.error
        return flight.node_id

    def wake(self) -> None:
        """Something the plans depend on changed (a request queued or ended): plan again."""
        self.housekeeping.wake()

    def demand(self) -> dict[str, Demand]:
        """What the admission queue waits for, per model."""
        return self._demand()

    def released(self, node_id: str, model_id: str) -> None:
        """A request of ``model_id`` on ``node_id`` ended: an unload draining it may go on."""
        key = (node_id, model_id)
        if (ev := self._idle.get(key)) is not None and self._in_use(node_id, model_id) <= 0:
            ev.set()

    async def unload(self, node_id: str, model_id: str, *, reason: str = "operator") -> None:
        """Unload ``model_id`` from ``node_id`` without cutting a running request (drained
        within ``drain_grace``). Raises :class:`FleetError` when the neuron cannot be told."""
        await self._unload(Unload(node_id, model_id), reason)

    def _start_flight(self, entry: CatalogueEntry, plan: LoadPlan | None = None) -> _Flight:
        flight = self._flights.get(entry.id)
        if flight is None:
            if self._nursery is None:
                raise RuntimeError("Provisioner.run is not running")
            flight = self._flights[entry.id] = _Flight()
            if plan is not None:
                self._pending[entry.id] = plan.node_id
            self._nursery.start_soon(self._fly, entry, flight, plan)
        return flight

    async def _fly(self, entry: CatalogueEntry, flight: _Flight, plan: LoadPlan | None,
                   operator: bool = False, on_progress: Callable[[LoadProgress], None] | None = None) -> None:
        try:
            flight.node_id = await (self._load_planned(entry, plan, on_progress) if operator and plan is not None
                                    else self._load(entry, plan))
        except GatewayError as exc:
            flight.error = exc
        except Exception as exc:  # a bug; requests get a clean 503, the log gets the rest
            log.exception("loading %s failed unexpectedly", entry.id)
            flight.error = ColdLoadFailed("failed unexpectedly", retry_after=self.settings.retry_after, model=entry.id)
            del exc
        finally:
            del self._flights[entry.id]
            self._pending.pop(entry.id, None)
            flight.done.set()
            self.wake()
        if flight.error is not None and plan is not None:
            self._on_load_failed(entry.id, flight.error)

    async def _load(self, entry: CatalogueEntry, plan: LoadPlan | None) -> str:
        failed: set[str] = set()
        last_error = ""
        left = True  # every neuron it failed on went away (draining, disconnected): no load failed
        while True:
            if plan is None:
                now = trio.current_time()
                barred = self.backoff.barred(entry.id, now)
                try:
                    plan = place(entry, self.views(), headroom=self.settings.memory_headroom,
                                 exclude=frozenset(failed) | barred, policy=self.policy, now=now)
                except NoPlacement as exc:
                    if failed and not left:
                        raise ColdLoadFailed(f"loading model {entry.id!r} failed: {last_error}",
                                             retry_after=self.settings.retry_after, model=entry.id) from None
                    if failed:
                        raise NoCapacity(f"the neuron loading model {entry.id!r} left ({', '.join(sorted(failed))})"
                                         " and no other can take it now", retry_after=self.settings.retry_after
                                         ) from None
                    if barred - failed:  # it failed there lately: not again before its backoff ends
                        raise self.backoff.error(entry.id, barred, now) from None
                    raise NoCapacity(str(exc), retry_after=self.settings.retry_after) from None
            self._pending[entry.id] = plan.node_id
            try:
                started = await self._carry_out(entry, plan)
            except (FleetError, _Refused) as exc:
                self._failed(entry.id, plan.node_id, exc)
                failed.add(plan.node_id)
                last_error = str(exc)
                left = left and isinstance(exc, NeuronGone)
                plan = None
                continue
            return self._loaded(entry, plan, started, "")

    async def _load_planned(self, entry: CatalogueEntry, plan: LoadPlan,
                            on_progress: Callable[[LoadProgress], None] | None = None) -> str:
        """The operator's load: on ``plan``'s neuron only (a failure there is the answer)."""
        self._pending[entry.id] = plan.node_id
        try:
            started = await self._carry_out(entry, plan, on_progress)
        except (FleetError, _Refused) as exc:
            self._failed(entry.id, plan.node_id, exc)
            raise ColdLoadFailed(f"loading model {entry.id!r} on {plan.node_id} failed: {exc}",
                                 retry_after=self.settings.retry_after, model=entry.id,
                                 reason=getattr(exc, "code", None)) from None
        return self._loaded(entry, plan, started, " as the operator asked")

    def _failed(self, model_id: str, node_id: str, exc: Exception) -> None:
        """A load of ``model_id`` on ``node_id`` failed: logged, and in its backoff unless the
        neuron was only going away (draining, or gone: nothing to learn of the model)."""
        if isinstance(exc, NeuronGone) or self.fleet.get(node_id) is None:
            log.warning("loading %s on %s failed: %s", model_id, node_id, exc)
            return
        s = self.settings
        f = self.backoff.failed(model_id, node_id, trio.current_time(), str(exc), base=s.load_backoff,
                                ceiling=s.load_backoff_max)
        log.warning("loading %s on %s failed (%d in a row; not tried there again for %gs): %s", model_id, node_id,
                    f.count, f.until - f.at, exc)

    def _loaded(self, entry: CatalogueEntry, plan: LoadPlan, started: float, how: str) -> str:
        """Record a load that succeeded (its time, from ``started``, is what eviction weighs);
        return the node."""
        now = trio.current_time()
        elapsed = now - started
        self.load_times[entry.id] = elapsed
        self.evictions[entry.id] = plan.evict
        key = (plan.node_id, entry.id)
        self.loaded_at[key] = now
        self.backoff.forget(entry.id, plan.node_id)
        (self.provisioned.discard if how else self.provisioned.add)(key)  # an operator's load stays the operator's
        log.info("loaded %s on %s%s in %.2fs (evicted %s)", entry.id, plan.node_id, how, elapsed, list(plan.evict))
        if self.metrics is not None:
            self.metrics.cold_load(entry.id, plan.node_id, elapsed)
        self.live.touch(plan.node_id, entry.id, now)
        return plan.node_id

    async def _carry_out(self, entry: CatalogueEntry, plan: LoadPlan,
                         on_progress: Callable[[LoadProgress], None] | None = None) -> float:
        """Evict (draining first), then load; returns when the load itself began (what it
        costs to bring the model back excludes the victims' drains)."""
        link = self.fleet.get(plan.node_id)
        if link is None:
            raise NeuronGone(f"neuron {plan.node_id} left")
        errors: list[Exception] = []

        async def evict(victim: str) -> None:
            try:
                await self._unload(Unload(plan.node_id, victim), "swap")
            except (FleetError, _Refused) as exc:
                errors.append(exc)

        async with trio.open_nursery() as nursery:  # victims drain side by side
            for victim in plan.evict:
                nursery.start_soon(evict, victim)
        if errors:
            raise errors[0]
        config = entry.model_config_for_neuron()
        if link.configs.get(entry.id) != config:
            await self.command(link, UpsertModelConfig(_cid(), config), self.settings.command_timeout)
        def progress(event: LoadProgress) -> None:
            if event.total:
                self.load_progress[entry.id] = (event.stage, min(1.0, event.done / event.total))
            if on_progress is not None:
                on_progress(event)

        started = trio.current_time()
        parent = self.trace_parents.pop(entry.id, None)
        span = telemetry.tracer().start_span("provisioner.load", context=parent, attributes={
            "helexa.model": entry.id, "helexa.neuron": plan.node_id,
            "helexa.evicted": list(plan.evict)}) if telemetry.enabled() else None
        try:
            await self.command(link, LoadModel(_cid(), entry.id, trace=telemetry.traceparent(span) if span else ""),
                                self.settings.load_timeout, progress)
        except BaseException as exc:
            if span is not None:
                span.set_status(Status(StatusCode.ERROR, str(exc)))
            raise
        finally:
            self.load_progress.pop(entry.id, None)
            if span is not None:
                span.end()
        return started

    async def command(self, link, command, timeout: float, on_progress=None) -> None:  # type: ignore[no-untyped-def]
        """Send a provisioning ``command``; raises a :class:`FleetError` when it failed or
        the neuron refused it."""
        response = await link.provision(command, timeout=timeout, on_progress=on_progress)
        if not response.ok:
            if response.code == "already_loaded":
                return
            raise _Refused(f"{type(command).__name__} refused by {link.node_id}: {response.error or response.code}",
                           response.code or None)

    async def _unload(self, unload: Unload, reason: str) -> None:
        key = (unload.node_id, unload.model_id)
        link = self.fleet.get(unload.node_id)
        if link is None:
            return
        if key in self.draining:  # unloading already: that unload's outcome is this one's
            if (under_way := self._unloading.get(key)) is not None:
                await under_way.done.wait()
                if under_way.failure is not None:
                    raise under_way.failure
            return
        self.draining.add(key)
        flight = self._unloading[key] = _Flight()
        if reason == "swap":
            self._swapped.add(unload.model_id)
        try:
            grace = self.settings.drain_grace
            began = trio.current_time()
            with trio.move_on_after(grace):
                while self._in_use(*key) > 0:
                    event = self._idle[key] = trio.Event()
                    await event.wait()
            self._idle.pop(key, None)
            left = max(0.0, grace - (trio.current_time() - began))
            if self._in_use(*key) > 0:
                log.warning("unloading %s from %s: requests still running after the %gs grace are cut",
                            unload.model_id, unload.node_id, grace)
            await self.command(link, UnloadModel(_cid(), unload.model_id, grace=left),
                                self.settings.command_timeout + left)
            self.live.forget(*key)
            self.loaded_at.pop(key, None)
            self.provisioned.discard(key)
            log.info("unloaded %s from %s (%s)", unload.model_id, unload.node_id, reason)
            if self._om is not None:
                self._om.evicted(unload.model_id, reason)
            self._on_unloaded(*key)
            flight.node_id = unload.node_id
        except FleetError as exc:
            flight.failure = exc
            raise
        finally:
            if flight.node_id is None and flight.failure is None:  # cancelled
                flight.failure = FleetError(f"the unload of {unload.model_id} from {unload.node_id} was cancelled")
            flight.done.set()
            self._unloading.pop(key, None)
            self.draining.discard(key)
            self._swapped.discard(unload.model_id)
            self._idle.pop(key, None)
            self.wake()

    # --- for the operator's paths (:mod:`.operator_actions`) -------------------------------

    async def load_planned(self, entry: CatalogueEntry, plan: LoadPlan,
                           on_progress: Callable[[LoadProgress], None] | None = None) -> str:
        """Carry out ``plan`` (on its neuron only) as the model's one load; return the node id.
        Raises ColdLoadFailed when that neuron failed."""
        flight = self._operator_flight(entry, plan)
        await self._fly(entry, flight, plan, True, on_progress)
        if flight.error is not None:
            raise flight.error
        assert flight.node_id is not None
        return flight.node_id

    def node_gone(self, node_id: str) -> None:
        """``node_id`` was removed from the fleet: what was kept of it goes too (its load,
        residency and provisioning records, its series in ``/metrics``). A fleet whose
        neurons come and go under new ids kept them all, for good."""
        self.live.forget_node(node_id)
        self.backoff.forget_node(node_id)
        for key in [k for k in self.loaded_at if k[0] == node_id]:
            del self.loaded_at[key]
        self.provisioned.difference_update([k for k in self.provisioned if k[0] == node_id])
        if self.metrics is not None:
            self.metrics.neuron_gone(node_id)

    def begin_load_planned(self, entry: CatalogueEntry, plan: LoadPlan) -> None:
        """:meth:`load_planned` in the background; returns at once."""
        flight = self._operator_flight(entry, plan)
        assert self._nursery is not None
        self._nursery.start_soon(self._fly, entry, flight, plan, True)

    def begin_unload(self, unload: Unload, reason: str) -> None:
        """:meth:`unload` in the background (a failure is logged)."""
        if self._nursery is None:
            raise RuntimeError("Provisioner.run is not running")
        self._nursery.start_soon(self._unload_quietly, unload, reason)

    def pin_changed(self, model_id: str, node_id: str) -> None:
        """A pin was added: load it at once, even if its last load failed."""
        self.backoff.forget(model_id, node_id)
        self.housekeeping.pin_changed(model_id, node_id)
        self.wake()

    def catalogue_changed(self, model_ids: list[str]) -> None:
        """A reload changed (or removed) these models' entries: their failed loads are
        forgotten, the next request tries the new config at once."""
        for model_id in model_ids:
            self.backoff.forget(model_id)

    def _operator_flight(self, entry: CatalogueEntry, plan: LoadPlan) -> _Flight:
        if self._nursery is None:
            raise RuntimeError("Provisioner.run is not running")
        flight = self._flights[entry.id] = _Flight()
        self._pending[entry.id] = plan.node_id
        return flight

    def entry(self, model_id: str) -> CatalogueEntry:
        """The catalogue's entry; raises ModelNotFound."""
        entry = self.catalogue.get(model_id)
        if entry is None:
            raise ModelNotFound(model_id)
        return entry

    # --- background ----------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the load tasks; load what the queue waits for; keep keep-warm models
        resident; unload idle models on time."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            try:
                await self.housekeeping.run(nursery)
            finally:
                self._nursery = None

    def start_queue_loads(self, demand: dict[str, Demand], views: list[NodeView], now: float) -> float | None:
        """Start the loads the queue needs now (``views``: :meth:`views` of ``demand``; each
        :mod:`.housekeeping` pass calls it); return when to plan again (None: on a change)."""
        return queue_loads.start(self, demand, views, now)

    async def _unload_quietly(self, unload: Unload, reason: str = "idle") -> None:
        try:
            await self._unload(unload, reason)
        except (FleetError, _Refused) as exc:
            log.warning("%s unload of %s from %s failed: %s", reason, unload.model_id, unload.node_id, exc)

    def views(self, demand: dict[str, Demand] | None = None) -> list[NodeView]:
        """The fleet as the pure core sees it (:func:`.fleet_views.views`)."""
        return fleet_views(self, demand)
