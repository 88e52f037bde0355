"""The provisioner's background pass: what to load and unload when nobody asked.

:class:`Housekeeping` is run by :meth:`.provisioner.Provisioner.run` and owned by it (as
``provisioner.housekeeping``). Each pass, woken by :meth:`Housekeeping.wake`, a fleet
change, or a deadline of its own, it:

* loads the models the operator pinned on a neuron and the catalogue's **keep-warm**
  models (the latter only once the neurons had ``warm_start_delay`` to rejoin after a
  restart), retrying a failed one after ``warm_retry``;
* starts the loads the admission queue waits for (:meth:`Provisioner.start_queue_loads`);
* unloads **idle** models at their TTL, and the copies it loaded itself of models no
  longer in the catalogue (:mod:`.retirement`), drained first like every unload.

Passes woken by fleet changes are at least :data:`HOUSEKEEP_SPACING` apart.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import trio

from .errors import GatewayError
from .placement import NodeView, idle_unloads, warm_loads
from .retirement import retired_unloads

if TYPE_CHECKING:
    from .provisioner import Provisioner

__all__ = ["HOUSEKEEP_SPACING", "Housekeeping"]

log = logging.getLogger(__name__)

HOUSEKEEP_SPACING = 0.25
"""Seconds between housekeeping passes woken by fleet changes (see :meth:`Housekeeping.run`)."""

class Housekeeping:
    """The background pass of one :class:`~.provisioner.Provisioner` (see the module
    docstring); it keeps which pinned and keep-warm loads are running or failed lately."""

    def __init__(self, provisioner: Provisioner) -> None:
        self.provisioner = provisioner
        self._pin_failed: dict[tuple[str, str], float] = {}
        self._pinning: set[tuple[str, str]] = set()
        self._warm_failed: dict[str, float] = {}
        self._warming: set[str] = set()
        self._woken_by_fleet = False
        self._wake = trio.Event()

    def wake(self) -> None:
        """Something the passes depend on changed (the queue, a load or unload ended): pass again."""
        self._wake.set()

    def pin_changed(self, model_id: str, node_id: str) -> None:
        """A pin was added: its next pass loads it even if its last load failed."""
        self._pin_failed.pop((model_id, node_id), None)

    async def run(self, nursery: trio.Nursery) -> None:
        """Pass after pass, for ever; the loads and unloads it starts run in ``nursery``
        (the provisioner's own)."""
        p = self.provisioner
        last_pass = -HOUSEKEEP_SPACING
        # After a restart, the neurons rejoin within seconds and report what they hold:
        # keep-warm loads wait for them, or a model would be loaded twice.
        warm_from = trio.current_time() + p.settings.warm_start_delay
        while True:
            # A pass looks at every neuron; a join storm (a restarted cortex: thousands of
            # rejoins in seconds) wakes it once per join, which made joins O(n^2): passes
            # woken by fleet changes are spaced, so a storm costs one pass per spacing.
            if self._woken_by_fleet and trio.current_time() - last_pass < HOUSEKEEP_SPACING:
                await trio.sleep(last_pass + HOUSEKEEP_SPACING - trio.current_time())
            self._woken_by_fleet = False
            self._wake = trio.Event()
            now = last_pass = trio.current_time()
            demand = p.demand()
            views = p.views(demand)
            # A pin dropped (unpinned, or its model left the catalogue) forgets its failure.
            self._pin_failed = {k: t for k, t in self._pin_failed.items() if p.operator.pinned(k[1], k[0])}
            for model_id, node_id in self._pins_to_load(views):
                key = (model_id, node_id)
                failed_at = self._pin_failed.get(key)
                if key in self._pinning or (failed_at is not None and now - failed_at < p.settings.warm_retry):
                    continue
                self._pinning.add(key)
                nursery.start_soon(self._load_pinned, model_id, node_id)
            for model_id in warm_loads(p.catalogue, views) if now >= warm_from else ():
                failed_at = self._warm_failed.get(model_id)
                if model_id in self._warming or (failed_at is not None and now - failed_at < p.settings.warm_retry):
                    continue
                entry = p.catalogue.get(model_id)
                headroom = p.settings.memory_headroom
                if entry is not None and any(entry.is_feasible_on(v.hardware, headroom) for v in views):
                    self._warming.add(model_id)
                    nursery.start_soon(self._warm, model_id)
            wake_at = p.start_queue_loads(demand, views, now)
            due, upcoming = idle_unloads(p.catalogue, views, now)
            for unload in due:
                p.begin_unload(unload, "idle")
            for unload in retired_unloads(p.catalogue, p.provisioned, views, loading=p.loading):
                log.info("unloading %s from %s: no longer in the catalogue", unload.model_id, unload.node_id)
                p.begin_unload(unload, "retired")
            if upcoming is not None:
                wake_at = upcoming if wake_at is None else min(wake_at, upcoming)
            if wake_at is None:
                wake_at = now + 3600.0
            if now < warm_from:
                wake_at = min(wake_at, warm_from)
            failures = [*self._warm_failed.values(), *self._pin_failed.values()]
            if any(t + p.settings.warm_retry > now for t in failures):
                wake_at = min(wake_at, min(failures) + p.settings.warm_retry)
            with trio.move_on_at(max(wake_at, now)):
                async with trio.open_nursery() as waiters:
                    waiters.start_soon(_wait_then_cancel, self._wake.wait, waiters.cancel_scope)
                    waiters.start_soon(_wait_then_cancel, self._fleet_changed, waiters.cancel_scope)

    async def _fleet_changed(self) -> None:
        await self.provisioner.fleet.wait_changed()
        self._woken_by_fleet = True

    def _pins_to_load(self, views: list[NodeView]) -> list[tuple[str, str]]:
        """``(model, node)`` pairs pinned but not resident (loading counts) on a usable neuron."""
        p = self.provisioner
        out = []
        for view in views:
            resident = {r.model_id for r in view.residents}
            out += [(model_id, node_id) for node_id, model_id in p.operator.pinned_pairs()
                    if node_id == view.node_id and model_id not in resident and not p.loading(model_id)
                    and model_id in p.catalogue]  # a pin outside it could never load
        return out

    async def _load_pinned(self, model_id: str, node_id: str) -> None:
        p = self.provisioner
        try:
            await p.operator.load_on(model_id, node_id, fresh=False)
            self._pin_failed.pop((model_id, node_id), None)
        except GatewayError as exc:
            log.warning("loading %s pinned on %s failed: %s", model_id, node_id, exc.message)
            self._pin_failed[(model_id, node_id)] = trio.current_time()
        finally:
            self._pinning.discard((model_id, node_id))
            p.wake()

    async def _warm(self, model_id: str) -> None:
        p = self.provisioner
        try:
            await p.ensure_loaded(model_id, timeout=p.settings.load_timeout)
            self._warm_failed.pop(model_id, None)
        except GatewayError as exc:
            log.warning("keep-warm load of %s failed: %s", model_id, exc.message)
            self._warm_failed[model_id] = trio.current_time()
        finally:
            self._warming.discard(model_id)
            p.wake()


async def _wait_then_cancel(wait, scope: trio.CancelScope) -> None:  # type: ignore[no-untyped-def]
    await wait()
    scope.cancel()
