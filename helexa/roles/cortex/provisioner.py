"""Getting models onto neurons: pure placement decisions and the thin shell that acts on them.

The pure core works on :class:`NodeView` snapshots:

* :func:`place` picks the neuron for a cold load (pinned neurons first, then those with
  room, then the fewest evictions) and the models to evict there: only models of the same
  or a lower priority class, idle ones, least recently used first.
* :func:`idle_unloads` lists models idle past their TTL, and when the next one falls due.
* :func:`warm_loads` lists keep-warm models resident nowhere.

:class:`Provisioner` carries these out through :meth:`NeuronLink.provision`. A cold load is
single-flight: however many requests race for a model, one load runs (in the provisioner's
own nursery, so a client leaving does not abort it) and every request waits for it, each
with its own deadline.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field

from typing import TYPE_CHECKING

import trio

from helexa.protocol import Hardware, LoadModel, LoadProgress, ModelState, UnloadModel, UpsertModelConfig

from .catalogue import MB, Catalogue, CatalogueEntry, Priority
from .errors import GatewayError, ColdLoadFailed, ModelNotFound, NoCapacity
from .fleet import Fleet, FleetError
from .metrics import Metrics
from .scheduler import LiveLoad

if TYPE_CHECKING:
    from .orchestrator import OrchestratorConfig

log = logging.getLogger(__name__)


# --- the pure core -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Resident:
    """A model loaded (or loading) on a neuron."""

    model_id: str
    memory_mb: int
    on_gpu: bool
    priority: Priority
    last_used: float
    busy: bool = False
    evictable: bool = True  # False for loading models and models outside the catalogue


@dataclass(frozen=True, slots=True)
class NodeView:
    node_id: str
    hardware: Hardware
    residents: tuple[Resident, ...] = ()


@dataclass(frozen=True, slots=True)
class LoadPlan:
    model_id: str
    node_id: str
    evict: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Unload:
    node_id: str
    model_id: str


class NoPlacement(Exception):
    """No neuron can take the model now; ``ever`` says whether any could with memory free."""

    def __init__(self, message: str, *, ever: bool) -> None:
        super().__init__(message)
        self.ever = ever


def _evictions(entry: CatalogueEntry, node: NodeView, headroom: float) -> tuple[str, ...] | None:
    """Models to unload from ``node`` so ``entry`` fits; None if it cannot fit."""
    pool = [r for r in node.residents if r.on_gpu == entry.on_gpu]
    free = entry.capacity_mb(node.hardware) * headroom - sum(r.memory_mb for r in pool)
    if free >= entry.memory_mb:
        return ()
    victims = sorted(
        (r for r in pool if r.evictable and not r.busy and r.priority <= entry.priority),
        key=lambda r: (r.last_used, r.model_id),
    )
    chosen: list[str] = []
    for r in victims:
        chosen.append(r.model_id)
        free += r.memory_mb
        if free >= entry.memory_mb:
            return tuple(chosen)
    return None


def place(
    entry: CatalogueEntry, nodes: list[NodeView], *, headroom: float = 1.0, exclude: frozenset[str] = frozenset()
) -> LoadPlan:
    """Choose the neuron for a cold load of ``entry``. Raises :class:`NoPlacement`."""
    feasible = [n for n in nodes if n.node_id not in exclude and entry.is_feasible_on(n.hardware)]
    if not feasible:
        raise NoPlacement(f"no connected neuron has the hardware for model {entry.id!r}", ever=False)
    ranked = []
    for n in feasible:
        evict = _evictions(entry, n, headroom)
        if evict is None:
            continue
        evicted_mb = sum(r.memory_mb for r in n.residents if r.model_id in evict)
        ranked.append(((n.node_id not in entry.pinned_on, len(evict) > 0, evicted_mb, n.node_id), n.node_id, evict))
    if not ranked:
        raise NoPlacement(
            f"no neuron has room for model {entry.id!r}: memory is held by busy or higher-priority models",
            ever=True,
        )
    _, node_id, evict = min(ranked)
    return LoadPlan(entry.id, node_id, evict)


def idle_unloads(catalogue: Catalogue, nodes: list[NodeView], now: float) -> tuple[list[Unload], float | None]:
    """Models idle past their ``idle_ttl`` (keep-warm and busy ones never), and the time
    to look again (None: nothing to wait for)."""
    due: list[Unload] = []
    upcoming: float | None = None
    for node in nodes:
        for r in node.residents:
            entry = catalogue.get(r.model_id)
            if entry is None or entry.keep_warm or entry.idle_ttl <= 0 or not r.evictable:
                continue
            # A busy model is looked at again a TTL from now: by then its last use is known.
            deadline = now + entry.idle_ttl if r.busy else r.last_used + entry.idle_ttl
            if deadline <= now:
                due.append(Unload(node.node_id, r.model_id))
            elif upcoming is None or deadline < upcoming:
                upcoming = deadline
    return due, upcoming


def warm_loads(catalogue: Catalogue, nodes: list[NodeView]) -> list[str]:
    """Keep-warm models resident on no neuron (loading counts as resident)."""
    resident = {r.model_id for n in nodes for r in n.residents}
    return [e.id for e in catalogue if e.keep_warm and e.id not in resident]


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
        self._wake = trio.Event()
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

    def _start_flight(self, entry: CatalogueEntry) -> _Flight:
        flight = self._flights.get(entry.id)
        if flight is None:
            if self._nursery is None:
                raise RuntimeError("Provisioner.run is not running")
            flight = self._flights[entry.id] = _Flight()
            self._nursery.start_soon(self._fly, entry, flight)
        return flight

    async def _fly(self, entry: CatalogueEntry, flight: _Flight) -> None:
        try:
            flight.node_id = await self._load(entry)
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

    async def _carry_out(self, entry: CatalogueEntry, plan: LoadPlan) -> None:
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

        try:
            await self._command(link, LoadModel(_cid(), entry.id), self.settings.load_timeout, progress)
        finally:
            self.load_progress.pop(entry.id, None)

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
        while True:
            now = trio.current_time()
            views = self._views()
            for model_id in warm_loads(self.catalogue, views):
                failed_at = self._warm_failed.get(model_id)
                if model_id in self._warming or (failed_at is not None and now - failed_at < self.settings.warm_retry):
                    continue
                entry = self.catalogue.get(model_id)
                if entry is not None and any(entry.is_feasible_on(v.hardware) for v in views):
                    self._warming.add(model_id)
                    nursery.start_soon(self._warm, model_id)
            due, upcoming = idle_unloads(self.catalogue, views, now)
            for unload in due:
                nursery.start_soon(self._unload_quietly, unload)
            wake_at = upcoming if upcoming is not None else now + 3600.0
            if any(t + self.settings.warm_retry > now for t in self._warm_failed.values()):
                wake_at = min(wake_at, min(t for t in self._warm_failed.values()) + self.settings.warm_retry)
            self._wake = trio.Event()
            with trio.move_on_at(max(wake_at, now)):
                async with trio.open_nursery() as waiters:
                    waiters.start_soon(_wait_then_cancel, self._wake.wait, waiters.cancel_scope)
                    waiters.start_soon(_wait_then_cancel, self.fleet.wait_changed, waiters.cancel_scope)

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
                        evictable=entry is not None and status.state is ModelState.LOADED,
                    )
                )
            views.append(NodeView(link.node_id, link.descriptor.hardware, tuple(residents)))
        return views


class _Refused(Exception):
    """A neuron answered a provisioning command with ok=False."""


def _cid() -> str:
    return uuid.uuid4().hex


async def _wait_then_cancel(wait, scope: trio.CancelScope) -> None:  # type: ignore[no-untyped-def]
    await wait()
    scope.cancel()
