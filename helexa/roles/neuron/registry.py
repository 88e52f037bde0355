"""The neuron's models: configs learned from the cortex, backends, and their states.

Nothing here comes from disk: configs arrive by ``UpsertModelConfig``. Each model moves
through configured -> loading -> loaded -> unloading -> configured, or to failed with a
reason. Loads are single-flight: a second load of a model that is loading waits for the
first and shares its outcome. A config with a ``source`` is fetched first
(:mod:`.sources`: progress stage ``download``), and the backend is built from the config
with the local path in ``metadata.path``; the fetched files stay in use until the model is
unloaded.

Backends run in worker processes by default (:mod:`helexa.runtime.worker`): a load never
blocks the neuron, and a worker that dies takes only its own model down. Such a model goes
to ``failed`` with the reason (reported to the cortex like any state change), its requests
fail with ``backend_crashed``, and the next load starts a new worker. A model run in the
neuron's own process (``metadata.isolate = false``) whose engine does not end a stopped
request (cancelled, its connection dropped, the neuron draining, its unload's drain over)
within ``cancel_grace`` cannot be killed: it goes to ``failed`` as well
(:meth:`ModelRegistry.wedged`), so that nothing more is routed to it, and an unload waiting
on it returns then, leaving the backend to the next load.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio

from helexa.protocol import MAX_CACHE_REPORT, ModelConfig, ModelState, ModelStatus
from helexa.runtime import Backend, BackendError, LoadFailed, ProgressFn
from helexa.runtime.worker import backend_for

from .sources import Fetched, ModelSources

log = logging.getLogger(__name__)


class ModelNotReady(BackendError):
    """The model is not configured, or not loaded, on this neuron (retryable elsewhere)."""

    code = "model_not_loaded"
    retryable = True


@dataclass
class _Entry:
    config: ModelConfig
    state: ModelState = ModelState.CONFIGURED
    backend: Backend | None = None
    fetched: Fetched | None = None
    progress: float | None = None
    error: str | None = None
    in_flight: int = 0
    wedged: bool = False  # its backend's engine did not end a stopped request (ModelRegistry.wedged)
    settled: trio.Event = field(default_factory=trio.Event)
    idle: trio.Event = field(default_factory=trio.Event)


class ModelRegistry:
    """Models on this neuron.

    Args:
        on_status: called with a model's new status whenever its state changes.
        factory: builds a backend from a config (by default a worker process's, or an
            in-process one for the kinds that gain nothing from a process of their own:
            :func:`helexa.runtime.worker.backend_for`).
        sources: fetches configs' sources (built from the default ``[sources]`` config on
            first use when not given).
    """

    def __init__(
        self,
        *,
        on_status: Callable[[ModelStatus], None] = lambda status: None,
        factory: Callable[[ModelConfig], Backend] = backend_for,
        sources: ModelSources | None = None,
    ) -> None:
        self._entries: dict[str, _Entry] = {}
        self._on_status = on_status
        self._factory = factory
        self._sources = sources
        self.service_nursery: trio.Nursery | None = None
        """A nursery that outlives connections, for backends with background work."""
        self._unloading: dict[str, Backend] = {}  # backends whose unload is under way
        self._loading: dict[str, Backend] = {}  # backends whose load is under way
        self._killing = False  # for good: the neuron is stopping, past its kill timer (:meth:`unload_all`)
        self.cut: Callable[[str, str], Awaitable[None]] | None = None
        """Stops the requests still running on a model whose unload's drain is over, and
        returns once each ended or was judged wedged (:meth:`.Serving.cut`: set by the
        neuron). Used for models run in this process, whose unload cannot cut them."""

    def set_listener(self, on_status: Callable[[ModelStatus], None]) -> None:
        """Call ``on_status`` with a model's new status whenever its state changes, instead
        of the listener given before (a neuron rejoining through a new agent takes over
        the registry of the one before)."""
        self._on_status = on_status

    # --- views ----------------------------------------------------------------------------

    def status(self, model_id: str) -> ModelStatus:
        e = self._entries.get(model_id)
        if e is None:
            raise ModelNotReady(f"model {model_id!r} is not configured on this neuron")
        return ModelStatus(
            model_id=model_id,
            state=e.state,
            backend_kind=e.config.backend_kind,
            progress=e.progress,
            error=e.error,
            in_flight=e.in_flight,
            memory_bytes=e.backend.memory_bytes() if e.backend is not None and e.state is ModelState.LOADED else 0,
            context_length=e.backend.context_length() if e.backend is not None and e.state is ModelState.LOADED
            else None,
            cached=self.sources.is_cached(e.config) if e.config.source is not None else None,
        )

    def statuses(self) -> tuple[ModelStatus, ...]:
        return tuple(self.status(mid) for mid in sorted(self._entries))

    def configs(self) -> tuple[ModelConfig, ...]:
        return tuple(e.config for _, e in sorted(self._entries.items()))

    def cache_generation(self) -> int:
        """Moves whenever what the model cache holds changes (:meth:`cached_sources`)."""
        return self.sources.cache.generation

    def cached_sources(self) -> tuple[str, ...]:
        """The sources in the model cache, as the cortex is told (``Join.cached``)."""
        return self.sources.cache.held(MAX_CACHE_REPORT)

    @property
    def sources(self) -> ModelSources:
        """Where sourced models are fetched from and cached."""
        if self._sources is None:
            self._sources = ModelSources()
        return self._sources

    @property
    def in_flight(self) -> int:
        return sum(e.in_flight for e in self._entries.values())

    def in_flight_of(self, model_id: str) -> int:
        """Requests running on ``model_id`` now (0 for a model not configured)."""
        e = self._entries.get(model_id)
        return 0 if e is None else e.in_flight

    def _set(self, model_id: str, state: ModelState, *, error: str | None = None) -> None:
        e = self._entries[model_id]
        e.state = state
        e.error = error
        if state is not ModelState.LOADING:
            e.progress = None
        self._on_status(self.status(model_id))

    # --- provisioning ---------------------------------------------------------------------

    def upsert(self, config: ModelConfig) -> ModelStatus:
        """Add or replace a model's config. A loaded model keeps running on its old config
        until it is reloaded."""
        e = self._entries.get(config.model_id)
        if e is None:
            self._entries[config.model_id] = _Entry(config)
        else:
            e.config = config
            if e.state is ModelState.FAILED:
                e.state, e.error = ModelState.CONFIGURED, None
        return self.status(config.model_id)

    async def pull(self, model_id: str, progress: ProgressFn) -> ModelStatus:
        """Fetch a configured model's source into the cache without loading it (a model
        without a source, or with a local path, has nothing to fetch). Raises
        :class:`LoadFailed` as a load's fetch would."""
        e = self._entries.get(model_id)
        if e is None:
            raise LoadFailed(f"model {model_id!r} has no config on this neuron", code="not_configured")
        if e.config.source is not None:
            fetched = await self.sources.fetch(e.config, progress)
            self.sources.release(fetched)
        return self.status(model_id)

    async def load(self, model_id: str, progress: ProgressFn) -> ModelStatus:
        """Load a configured model (single-flight). Raises :class:`LoadFailed` with the
        backend's precise reason, leaving the model in ``failed`` and the neuron healthy."""
        e = self._entries.get(model_id)
        if e is None:
            raise LoadFailed(f"model {model_id!r} has no config on this neuron", code="not_configured")
        if e.state is ModelState.LOADED:
            return self.status(model_id)
        if e.state in (ModelState.LOADING, ModelState.UNLOADING):
            await e.settled.wait()
            if e.state is ModelState.LOADED:
                return self.status(model_id)
            if e.state is ModelState.FAILED:
                raise LoadFailed(e.error or "load failed")
        if self._killing:
            raise LoadFailed("this neuron is stopping", code="draining")
        e.settled = trio.Event()
        e.progress = 0.0
        self._set(model_id, ModelState.LOADING)
        await self._discard(e)  # what a crashed (or wedged: abandoned) backend left behind
        backend: Backend | None = None
        fetched: Fetched | None = None

        def report(stage: str, done: int, total: int | None, unit: str) -> None:
            if total:
                e.progress = min(1.0, done / total)
            progress(stage, done, total, unit)

        try:
            config = e.config
            if config.source is not None:
                fetched = await self.sources.fetch(config, report)
                config = fetched.apply(config)
            backend = self._factory(config)
            backend.service_nursery = self.service_nursery
            backend.status_listener = lambda status: self._backend_changed(model_id, backend, status)
            self._loading[model_id] = backend  # the stop's kill timer ends it (:meth:`unload_all`)
            try:
                await backend.load(report)
            finally:
                self._loading.pop(model_id, None)
        except BaseException as exc:
            reason = str(exc) if isinstance(exc, BackendError) else f"{type(exc).__name__}: {exc}"
            code = exc.code if isinstance(exc, BackendError) else "load_failed"
            if backend is not None:
                with trio.CancelScope(shield=True):
                    try:
                        await backend.unload()
                    except Exception:
                        log.exception("cleanup after a failed load of %s failed", model_id)
            if fetched is not None:
                self.sources.release(fetched)
            if isinstance(exc, trio.Cancelled):
                self._set(model_id, ModelState.CONFIGURED)
                e.settled.set()
                raise
            log.warning("loading %s failed: %s", model_id, reason)
            self._set(model_id, ModelState.FAILED, error=reason)
            e.settled.set()
            if isinstance(exc, Exception):
                raise LoadFailed(reason, code=code) from None
            raise
        e.backend, e.fetched = backend, fetched
        self._set(model_id, ModelState.LOADED)
        e.settled.set()
        return self.status(model_id)

    async def unload(self, model_id: str, *, drain_timeout: float = 30.0) -> ModelStatus:
        """Stop new work for the model (new requests are refused as retryable elsewhere), let
        the requests it runs finish for up to ``drain_timeout`` seconds, then unload it (the
        backend's unload cuts what is still running; for a model in this process the
        requests still running are stopped first (:attr:`cut`), and one that does not end
        within its ``cancel_grace`` leaves the model ``failed``, its backend not freed under a
        thread still in it). A second unload meanwhile waits for the first."""
        e = self._entries.get(model_id)
        if e is None:
            raise ModelNotReady(f"model {model_id!r} is not configured on this neuron")
        if e.state in (ModelState.LOADING, ModelState.UNLOADING):
            await e.settled.wait()
        if e.state is ModelState.FAILED and e.backend is not None:  # its worker died, or its engine wedged
            await self._discard(e)  # a wedged one is abandoned, not unloaded
            self._set(model_id, ModelState.CONFIGURED)
            return self.status(model_id)
        if e.state is not ModelState.LOADED or e.backend is None:
            return self.status(model_id)
        e.settled = trio.Event()
        self._set(model_id, ModelState.UNLOADING)
        try:
            with trio.move_on_after(drain_timeout):
                while e.in_flight and not e.wedged:
                    e.idle = trio.Event()
                    await e.idle.wait()
        except BaseException:
            # Cancelled from outside while its requests drained (the neuron's drain ran out of
            # time at the instant this wait did, a connection closing under an operator's
            # unload): nothing was unloaded, so the model is loaded still (or failed, if it
            # wedged meanwhile), and whoever waits for this unload is woken, never left
            # waiting on a model stuck in ``unloading``.
            if e.state is ModelState.UNLOADING:
                self._set(model_id, ModelState.LOADED)
            e.settled.set()
            raise
        if e.in_flight and not e.wedged and self.cut is not None and not e.backend.kills_wedged:
            with trio.CancelScope(shield=True):  # bounded: each request is judged within its cancel_grace
                await self.cut(model_id, "its model's unload stopping it")
        if e.wedged:
            # Failed (:meth:`wedged`): a thread may still run in the backend, so it is not
            # freed under it; the next load replaces it, as after a cancel.
            e.settled.set()
            return self.status(model_id)
        backend, e.backend = e.backend, None
        self._unloading[model_id] = backend
        if self._killing:  # the stop's kill timer is past: its processes end now
            backend.kill()
        try:
            with trio.CancelScope(shield=True):
                await backend.unload()
        finally:
            self._unloading.pop(model_id, None)
            if e.fetched is not None:
                self.sources.release(e.fetched)
                e.fetched = None
            self._set(model_id, ModelState.CONFIGURED)
            e.settled.set()
        return self.status(model_id)

    async def _discard(self, e: _Entry) -> None:
        """Free a backend that failed by itself (its worker died) and the files it held. A
        wedged one (:meth:`wedged`) is abandoned instead: a thread is stuck in it, and its
        unload would free what that thread uses, or wait on it for ever; the thread and what
        it holds stay until the neuron restarts, and the next load builds a new backend."""
        backend, e.backend = e.backend, None
        if backend is not None and e.wedged:
            log.warning("model %s: its wedged backend is abandoned, not unloaded (a thread is still stuck in it)",
                        e.config.model_id)
        elif backend is not None:
            with trio.CancelScope(shield=True):
                try:
                    await backend.unload()
                except Exception:
                    log.exception("cleaning up after %s failed", e.config.model_id)
        if e.fetched is not None:
            self.sources.release(e.fetched)
            e.fetched = None
        e.wedged = False

    async def unload_all(self, *, kill_after: float = math.inf) -> None:
        """Unload every model, side by side (the neuron is stopping). ``kill_after`` seconds
        in, every backend not unloaded yet is killed (:meth:`Backend.kill`: a hung worker
        would otherwise hold the stop for its whole ``unload_timeout``): those unloading,
        those whose requests still drain (their drain ends then too), those still loading
        (the load fails), and any whose unload begins later; a load asked for after it is
        refused. So each ends unloaded, killed, or failed (an in-process engine that cannot
        end a request: :meth:`wedged`), never left loaded at the neuron's exit."""

        async def one(model_id: str) -> None:
            try:
                await self.unload(model_id, drain_timeout=min(5.0, kill_after))
            except Exception:
                log.exception("unloading %s failed", model_id)

        async with trio.open_nursery() as outer:
            outer.start_soon(self._kill_after, kill_after)
            async with trio.open_nursery() as unloads:
                for model_id in list(self._entries):
                    unloads.start_soon(one, model_id)
            outer.cancel_scope.cancel()

    async def _kill_after(self, seconds: float) -> None:
        await trio.sleep(seconds)
        self._killing = True
        held = [(m, e.backend) for m, e in self._entries.items() if e.backend is not None and not e.wedged]
        for model_id, backend in [*self._unloading.items(), *self._loading.items(), *held]:
            log.warning("model %s did not unload within %gs of the neuron's stop: killing its processes",
                        model_id, seconds)
            backend.kill()

    # --- serving --------------------------------------------------------------------------

    def acquire(self, model_id: str) -> Backend:
        """Take a loaded model's backend for one request; pair with :meth:`release`."""
        e = self._entries.get(model_id)
        if e is None or e.state is not ModelState.LOADED or e.backend is None:
            state = "not configured" if e is None else e.state.value
            raise ModelNotReady(f"model {model_id!r} is not loaded on this neuron ({state})")
        e.in_flight += 1
        return e.backend

    def release(self, model_id: str) -> None:
        e = self._entries.get(model_id)
        if e is not None:
            e.in_flight -= 1
            if e.in_flight == 0:
                e.idle.set()

    def wedged(self, model_id: str, backend: Backend, request_id: str, grace: float, *,
               how: str = "its cancel") -> None:
        """``request_id`` on ``backend`` did not end within ``grace`` seconds of ``how`` (its
        cancel, the connection dropping, the neuron's drain or the model's unload stopping
        it): its engine is wedged in this process (a step it cannot cancel never returns),
        and a thread cannot be killed. The model goes to ``failed`` (the cortex is told, so
        no new request is routed to it; the next load replaces the backend), with one ERROR
        for the operator. Nothing when the backend is no longer the model's."""
        e = self._entries.get(model_id)
        if e is None or e.backend is not backend or e.state not in (ModelState.LOADED, ModelState.UNLOADING):
            return
        reason = (f"request {request_id} did not end within {grace:g}s of {how} (cancel_grace): the engine is "
                  "wedged in the neuron's own process, where it cannot be killed; metadata.isolate = true runs the "
                  "model in a worker process, which the neuron kills and reloads")
        log.error("model %s: %s. The model is marked failed so that no request is routed to it; the stuck thread "
                  "and what it holds stay until the neuron restarts", model_id, reason)
        e.wedged = True
        self._set(model_id, ModelState.FAILED, error=reason)
        e.idle.set()  # an unload waiting for its requests stops waiting for this one

    def _backend_changed(self, model_id: str, backend: Backend, status: ModelStatus) -> None:
        """A loaded backend changed state by itself (a supervised process died, restarted,
        or gave up)."""
        e = self._entries.get(model_id)
        if e is None or e.backend is not backend:
            return
        self._set(model_id, status.state, error=status.error)
