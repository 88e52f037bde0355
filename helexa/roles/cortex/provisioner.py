"""Getting models onto neurons: the thin shell that carries out :mod:`.placement`'s pure
decisions (placement, idle unloads, keep-warm and pinned loads) through
:meth:`NeuronLink.provision`; a model pinned on a neuron (``helexa models pin``) is never
evicted nor unloaded for idleness there. A cold load is single-flight: however many requests race for a model, one load runs (in the provisioner's
own nursery, so a client leaving does not abort it) and every request waits for it, each
with its own deadline.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from typing import TYPE_CHECKING

import trio
from opentelemetry.trace import Status, StatusCode

from helexa import telemetry
from helexa.protocol import (
    LoadModel,
    LoadProgress,
    ModelState,
    PullModel,
    UnloadModel,
    UpsertModelConfig,
)

from .catalogue import MB, Catalogue, CatalogueEntry, Priority
from .errors import BadRequest, GatewayError, ColdLoadFailed, ModelNotFound, NoCapacity, NotFound
from .fleet import Fleet, FleetError
from .metrics import Metrics
from .placement import (  # noqa: F401  (re-exported: the provisioner's tests use them from here)
    LoadPlan,
    NodeView,
    NoPlacement,
    Resident,
    Unload,
    idle_unloads,
    pinned_loads,
    place,
    warm_loads,
)
from .scheduler import LiveLoad

if TYPE_CHECKING:
    from .config import OrchestratorConfig

log = logging.getLogger(__name__)


# --- the shell ---------------------------------------------------------------------------


@dataclass
class _Flight:
    done: trio.Event = field(default_factory=trio.Event)
    node_id: str | None = None
    error: GatewayError | None = None


class Provisioner:
    """Loads and unloads catalogued models on the fleet (see the module docstring).

    Start :meth:`run` in a nursery before calling :meth:`ensure_loaded`.
    """

    def __init__(
        self,
        fleet: Fleet,
        catalogue: Catalogue,
        live: LiveLoad,
        settings: OrchestratorConfig,
        metrics: Metrics | None = None,
    ) -> None:
        self.fleet = fleet
        self.catalogue = catalogue
        self.live = live
        self.settings = settings
        self.metrics = metrics
        self._flights: dict[str, _Flight] = {}
        self.load_times: dict[str, float] = {}
        """The last measured cold-load time of each model, in seconds (announced to peers)."""
        self.load_progress: dict[str, tuple[str, float]] = {}
        """Models loading right now: (stage, fraction done), from the neuron's progress events."""
        self._unloading: set[tuple[str, str]] = set()
        self._warm_failed: dict[str, float] = {}
        self._warming: set[str] = set()
        self._pins: dict[str, frozenset[str]] = {}
        self._pin_failed: dict[tuple[str, str], float] = {}
        self._pinning: set[tuple[str, str]] = set()
        self._wake = trio.Event()
        self._woken_by_fleet = False
        self._nursery: trio.Nursery | None = None

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

    # --- operators (helexa models) -------------------------------------------------------

    def pins(self) -> dict[str, frozenset[str]]:
        """Model -> the neurons it is pinned on (until the cortex restarts)."""
        return dict(self._pins)

    def pin(self, model_id: str, node_id: str) -> None:
        """Keep ``model_id`` loaded on ``node_id``: loaded now (in the background) and again
        whenever it is lost, never evicted nor unloaded for idleness there. Raises
        :class:`ModelNotFound` for a model outside the catalogue."""
        if self.catalogue.get(model_id) is None:
            raise ModelNotFound(model_id)
        self._pins[model_id] = self._pins.get(model_id, frozenset()) | {node_id}
        self._pin_failed.pop((model_id, node_id), None)
        self._wake.set()

    def unpin(self, model_id: str, node_id: str) -> bool:
        """Drop a pin (the model stays loaded, as any other); False if there was none."""
        on = self._pins.get(model_id, frozenset())
        if node_id not in on:
            return False
        if on - {node_id}:
            self._pins[model_id] = on - {node_id}
        else:
            del self._pins[model_id]
        self._wake.set()
        return True

    async def load_on(self, model_id: str, node_id: str | None = None,
                      on_progress: Callable[[LoadProgress], None] | None = None) -> str:
        """Load ``model_id`` on ``node_id`` (evicting there as a cold load would), or where
        a cold load would put it; returns the node id. Raises :class:`ModelNotFound`,
        :class:`NoCapacity` (no room there, or no such neuron) or :class:`ColdLoadFailed`."""
        entry = self._entry(model_id)
        views = self._views()
        if node_id is not None:
            views = [v for v in views if v.node_id == node_id]
            if not views:
                raise NoCapacity(f"no usable neuron {node_id!r}", retry_after=self.settings.retry_after)
        try:
            plan = place(entry, views, headroom=self.settings.memory_headroom)
        except NoPlacement as exc:
            raise NoCapacity(str(exc), retry_after=self.settings.retry_after) from None
        try:
            await self._carry_out(entry, plan, on_progress)
        except (FleetError, _Refused) as exc:
            raise ColdLoadFailed(f"loading model {model_id!r} on {plan.node_id} failed: {exc}",
                                 retry_after=self.settings.retry_after) from None
        self.live.touch(plan.node_id, entry.id, trio.current_time())
        log.info("loaded %s on %s (asked by an operator; evicted %s)", model_id, plan.node_id, list(plan.evict))
        return plan.node_id

    async def unload_from(self, model_id: str, node_id: str) -> None:
        """Unload ``model_id`` from ``node_id`` (in-flight requests finish first, on the
        neuron). Raises :class:`NoCapacity` (no such neuron) or :class:`ColdLoadFailed`."""
        if self.fleet.get(node_id) is None:
            raise NoCapacity(f"no neuron {node_id!r}", retry_after=self.settings.retry_after)
        try:
            await self._unload(Unload(node_id, model_id))
        except (FleetError, _Refused) as exc:
            raise ColdLoadFailed(f"unloading {model_id!r} from {node_id} failed: {exc}",
                                 retry_after=self.settings.retry_after) from None

    async def pull_on(self, model_id: str, node_id: str,
                      on_progress: Callable[[LoadProgress], None] | None = None) -> None:
        """Fetch ``model_id``'s source into ``node_id``'s cache without loading it.
        Raises :class:`ModelNotFound`, :class:`NoCapacity` (no such neuron) or
        :class:`ColdLoadFailed` (the neuron refused: the disk is full, a wrong hash...)."""
        entry = self._entry(model_id)
        link = self.fleet.get(node_id)
        if link is None:
            raise NoCapacity(f"no neuron {node_id!r}", retry_after=self.settings.retry_after)
        try:
            config = entry.model_config_for_neuron()
            if link.configs.get(entry.id) != config:
                await self._command(link, UpsertModelConfig(_cid(), config), self.settings.command_timeout)
            await self._command(link, PullModel(_cid(), entry.id), self.settings.load_timeout, on_progress)
        except (FleetError, _Refused) as exc:
            raise ColdLoadFailed(f"pulling {model_id!r} onto {node_id} failed: {exc}",
                                 retry_after=self.settings.retry_after) from None

    def begin_load_on(self, model_id: str, node_id: str) -> None:
        """Start :meth:`load_on` ``node_id`` and return at once (the web console: the fleet's
        next updates show the load). Requests for the model meanwhile wait for this load,
        as for any cold load.

        Raises:
            ModelNotFound: not in the catalogue. NotFound: no usable neuron ``node_id``.
            BadRequest: already loading, or it cannot fit on that neuron.
        """
        entry = self._entry(model_id)
        views = [v for v in self._views() if v.node_id == node_id]
        if not views:
            raise NotFound(f"no usable neuron {node_id!r}", param="node")
        if model_id in self._flights:
            raise BadRequest(f"model {model_id!r} is already loading", param="model")
        try:
            place(entry, views, headroom=self.settings.memory_headroom)
        except NoPlacement as exc:
            raise BadRequest(f"{exc} (on {node_id})", param="node") from None
        if self._nursery is None:
            raise RuntimeError("Provisioner.run is not running")
        flight = self._flights[entry.id] = _Flight()
        self._nursery.start_soon(self._fly, entry, flight, node_id)

    def begin_unload_from(self, model_id: str, node_id: str) -> None:
        """Start unloading ``model_id`` from ``node_id`` (its pin goes too) and return at
        once. Raises NotFound when that neuron does not hold it."""
        link = self.fleet.get(node_id)
        if link is None or model_id not in link.models:
            raise NotFound(f"neuron {node_id!r} does not hold model {model_id!r}", param="model")
        self.unpin(model_id, node_id)
        if self._nursery is None:
            raise RuntimeError("Provisioner.run is not running")
        self._nursery.start_soon(self._unload_quietly, Unload(node_id, model_id))

    def _entry(self, model_id: str) -> CatalogueEntry:
        entry = self.catalogue.get(model_id)
        if entry is None:
            raise ModelNotFound(model_id)
        return entry

    def _start_flight(self, entry: CatalogueEntry) -> _Flight:
        flight = self._flights.get(entry.id)
        if flight is None:
            if self._nursery is None:
                raise RuntimeError("Provisioner.run is not running")
            flight = self._flights[entry.id] = _Flight()
            self._nursery.start_soon(self._fly, entry, flight)
        return flight

    async def _fly(self, entry: CatalogueEntry, flight: _Flight, node_id: str | None = None) -> None:
        try:
            flight.node_id = await (self._load(entry) if node_id is None else self.load_on(entry.id, node_id))
        except GatewayError as exc:
            flight.error = exc
        except Exception as exc:  # a bug; requests get a clean 503, the log gets the rest
            log.exception("loading %s failed unexpectedly", entry.id)
            flight.error = ColdLoadFailed(f"loading model {entry.id!r} failed", retry_after=self.settings.retry_after)
            del exc
        finally:
            del self._flights[entry.id]
            flight.done.set()
            self._wake.set()

    async def _load(self, entry: CatalogueEntry) -> str:
        failed: set[str] = set()
        last_error = ""
        while True:
            try:
                plan = place(entry, self._views(), headroom=self.settings.memory_headroom, exclude=frozenset(failed))
            except NoPlacement as exc:
                if failed:
                    raise ColdLoadFailed(f"loading model {entry.id!r} failed: {last_error}",
                                     retry_after=self.settings.retry_after) from None
                raise NoCapacity(str(exc), retry_after=self.settings.retry_after) from None
            started = trio.current_time()
            try:
                await self._carry_out(entry, plan)
            except (FleetError, _Refused) as exc:
                log.warning("loading %s on %s failed: %s", entry.id, plan.node_id, exc)
                failed.add(plan.node_id)
                last_error = str(exc)
                continue
            elapsed = trio.current_time() - started
            self.load_times[entry.id] = elapsed
            log.info("loaded %s on %s in %.2fs (evicted %s)", entry.id, plan.node_id, elapsed, list(plan.evict))
            if self.metrics is not None:
                self.metrics.cold_load(entry.id, plan.node_id, elapsed)
            self.live.touch(plan.node_id, entry.id, trio.current_time())
            return plan.node_id

    async def _carry_out(self, entry: CatalogueEntry, plan: LoadPlan,
                         on_progress: Callable[[LoadProgress], None] | None = None) -> None:
        link = self.fleet.get(plan.node_id)
        if link is None:
            raise _Refused(f"neuron {plan.node_id} left")
        for victim in plan.evict:
            await self._unload(Unload(plan.node_id, victim))
        config = entry.model_config_for_neuron()
        if link.configs.get(entry.id) != config:
            await self._command(link, UpsertModelConfig(_cid(), config), self.settings.command_timeout)
        def progress(event: LoadProgress) -> None:
            if event.total:
                self.load_progress[entry.id] = (event.stage, min(1.0, event.done / event.total))
            if on_progress is not None:
                on_progress(event)

        span = telemetry.tracer().start_span("provisioner.load", attributes={
            "helexa.model": entry.id, "helexa.neuron": plan.node_id,
            "helexa.evicted": list(plan.evict)}) if telemetry.enabled() else None
        try:
            await self._command(link, LoadModel(_cid(), entry.id, trace=telemetry.traceparent(span) if span else ""),
                                self.settings.load_timeout, progress)
        except BaseException as exc:
            if span is not None:
                span.set_status(Status(StatusCode.ERROR, str(exc)))
            raise
        finally:
            self.load_progress.pop(entry.id, None)
            if span is not None:
                span.end()

    async def _command(self, link, command, timeout: float, on_progress=None) -> None:  # type: ignore[no-untyped-def]
        response = await link.provision(command, timeout=timeout, on_progress=on_progress)
        if not response.ok:
            if response.code == "already_loaded":
                return
            raise _Refused(f"{type(command).__name__} refused by {link.node_id}: {response.error or response.code}")

    async def _unload(self, unload: Unload) -> None:
        key = (unload.node_id, unload.model_id)
        link = self.fleet.get(unload.node_id)
        if link is None or key in self._unloading:
            return
        self._unloading.add(key)
        try:
            await self._command(link, UnloadModel(_cid(), unload.model_id), self.settings.command_timeout)
            self.live.forget(*key)
            log.info("unloaded %s from %s", unload.model_id, unload.node_id)
        finally:
            self._unloading.discard(key)

    def wake(self) -> None:
        """Look at the fleet and the catalogue again now (a reload changed the catalogue)."""
        self._wake.set()

    # --- background ----------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the load tasks; keep keep-warm models resident; unload idle models on time."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            try:
                await self._housekeep(nursery)
            finally:
                self._nursery = None

    async def _housekeep(self, nursery: trio.Nursery) -> None:
        last_pass = -HOUSEKEEP_SPACING
        # After a restart, the neurons rejoin within seconds and report what they hold:
        # keep-warm loads wait for them, or a model would be loaded twice.
        warm_from = trio.current_time() + self.settings.warm_start_delay
        while True:
            # A pass looks at every neuron; a join storm (a restarted cortex: thousands of
            # rejoins in seconds) wakes it once per join, which made joins O(n^2): passes
            # woken by fleet changes are spaced, so a storm costs one pass per spacing.
            if self._woken_by_fleet and trio.current_time() - last_pass < HOUSEKEEP_SPACING:
                await trio.sleep(last_pass + HOUSEKEEP_SPACING - trio.current_time())
            self._woken_by_fleet = False
            now = last_pass = trio.current_time()
            views = self._views()
            for model_id in warm_loads(self.catalogue, views) if now >= warm_from else ():
                failed_at = self._warm_failed.get(model_id)
                if model_id in self._warming or (failed_at is not None and now - failed_at < self.settings.warm_retry):
                    continue
                entry = self.catalogue.get(model_id)
                if entry is not None and any(entry.is_feasible_on(v.hardware) for v in views):
                    self._warming.add(model_id)
                    nursery.start_soon(self._warm, model_id)
            for model_id, node_id in pinned_loads(self._pins, views):
                key = (model_id, node_id)
                failed_at = self._pin_failed.get(key)
                if key in self._pinning or (failed_at is not None and now - failed_at < self.settings.warm_retry):
                    continue
                self._pinning.add(key)
                nursery.start_soon(self._load_pinned, model_id, node_id)
            due, upcoming = idle_unloads(self.catalogue, views, now)
            for unload in due:
                nursery.start_soon(self._unload_quietly, unload)
            wake_at = upcoming if upcoming is not None else now + 3600.0
            if now < warm_from:
                wake_at = min(wake_at, warm_from)
            failures = [*self._warm_failed.values(), *self._pin_failed.values()]
            if any(t + self.settings.warm_retry > now for t in failures):
                wake_at = min(wake_at, min(failures) + self.settings.warm_retry)
            self._wake = trio.Event()
            with trio.move_on_at(max(wake_at, now)):
                async with trio.open_nursery() as waiters:
                    waiters.start_soon(_wait_then_cancel, self._wake.wait, waiters.cancel_scope)
                    waiters.start_soon(_wait_then_cancel, self._fleet_changed, waiters.cancel_scope)

    async def _fleet_changed(self) -> None:
        await self.fleet.wait_changed()
        self._woken_by_fleet = True

    async def _warm(self, model_id: str) -> None:
        try:
            await self.ensure_loaded(model_id, timeout=self.settings.load_timeout)
            self._warm_failed.pop(model_id, None)
        except GatewayError as exc:
            log.warning("keep-warm load of %s failed: %s", model_id, exc.message)
            self._warm_failed[model_id] = trio.current_time()
        finally:
            self._warming.discard(model_id)
            self._wake.set()

    async def _load_pinned(self, model_id: str, node_id: str) -> None:
        try:
            await self.load_on(model_id, node_id)
            self._pin_failed.pop((model_id, node_id), None)
        except GatewayError as exc:
            log.warning("loading %s pinned on %s failed: %s", model_id, node_id, exc.message)
            self._pin_failed[(model_id, node_id)] = trio.current_time()
        finally:
            self._pinning.discard((model_id, node_id))
            self._wake.set()

    async def _unload_quietly(self, unload: Unload) -> None:
        try:
            await self._unload(unload)
        except (FleetError, _Refused) as exc:
            log.warning("idle unload of %s from %s failed: %s", unload.model_id, unload.node_id, exc)

    def _views(self) -> list[NodeView]:
        """The fleet as the pure core sees it; first sight of a resident counts as a use."""
        now = trio.current_time()
        views = []
        for link in self.fleet.usable():
            residents = []
            for model_id, status in link.models.items():
                if status.state not in (ModelState.LOADED, ModelState.LOADING):
                    continue
                key = (link.node_id, model_id)
                if key in self._unloading:
                    continue
                last_used = self.live.last_used.setdefault(key, now)
                entry = self.catalogue.get(model_id)
                busy = self.live.model_in_flight.get(key, 0) > 0 or status.in_flight > 0
                residents.append(
                    Resident(
                        model_id=model_id,
                        memory_mb=entry.memory_mb if entry else status.memory_bytes // MB,
                        on_gpu=entry.on_gpu if entry else False,
                        priority=entry.priority if entry else Priority.CRITICAL,
                        last_used=last_used,
                        busy=busy,
                        evictable=entry is not None and status.state is ModelState.LOADED
                        and link.node_id not in self._pins.get(model_id, ()),
                    )
                )
            views.append(NodeView(link.node_id, link.descriptor.hardware, tuple(residents)))
        return views


HOUSEKEEP_SPACING = 0.25
"""Seconds between housekeeping passes woken by fleet changes (see ``_housekeep``)."""


class _Refused(Exception):
    """A neuron answered a provisioning command with ok=False."""


def _cid() -> str:
    return uuid.uuid4().hex


async def _wait_then_cancel(wait, scope: trio.CancelScope) -> None:  # type: ignore[no-untyped-def]
    await wait()
    scope.cancel()
