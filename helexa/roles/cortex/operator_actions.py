"""What an operator asks of the fleet's models: load here, unload there, pull, pin.

:class:`OperatorActions` serves ``helexa models``, the admin API and the web console. Each
command goes through the :class:`~.provisioner.Provisioner`'s own machinery, so the
guarantees of the queue's loads hold for it too: one load of a model at a time (requests
for the model wait for the operator's load), evictions drain before they unload, and no
unload cuts a running request.

Pins live here (in memory, until the cortex restarts); the provisioner's housekeeping
reads them to load a pinned model again when it is lost and never to evict or idle-unload
it there. A reload that removes a model from the catalogue drops its pins
(:meth:`OperatorActions.drop_pins_outside`): they could never be honoured again.
"""

from __future__ import annotations

from collections.abc import Callable, Container
from typing import TYPE_CHECKING

import trio

from helexa.protocol import Hardware, LoadProgress, ModelState, PullModel, UpsertModelConfig

from .catalogue import CatalogueEntry
from .errors import BadRequest, ColdLoadFailed, Conflict, NotFound
from .fleet import FleetError
from .flights import command_id as _cid
from .placement import LoadPlan, NoPlacement, Unload, place

if TYPE_CHECKING:
    from .provisioner import Provisioner

__all__ = ["OperatorActions"]


class OperatorActions:
    """The operator's commands on ``provisioner``'s fleet (see the module docstring).

    Methods that start work in the background need :meth:`Provisioner.run` running.
    """

    def __init__(self, provisioner: Provisioner) -> None:
        self._prov = provisioner
        self._pinned: set[tuple[str, str]] = set()  # (node, model)

    # --- loads and unloads -----------------------------------------------------------------

    async def load_on(self, model_id: str, node_id: str | None = None,
                      on_progress: Callable[[LoadProgress], None] | None = None, *,
                      on_plan: Callable[[str], None] | None = None, fresh: bool = True) -> str:
        """Load ``model_id`` on ``node_id`` (evicting there as a cold load would, draining
        first), or where a cold load would put it; returns the node id once loaded. Requests
        for the model meanwhile wait for this load. ``on_plan`` is told the node chosen,
        before any progress. A load of the model already under way (a request's cold load,
        another operator's) is waited for first: it is the answer when it lands where asked;
        so is a neuron holding it loaded already (``node_id``, when named): nothing is loaded.
        An operator's load forgets the model's failed loads there (``fresh``; not a pin's
        retry): the operator may have fixed what failed.

        Raises:
            ModelNotFound: not in the catalogue. NotFound: no usable neuron ``node_id``.
            BadRequest: it cannot fit there. ColdLoadFailed: the neuron failed (or the load
            waited for did).
        """
        self._prov.entry(model_id)
        if fresh:
            self._prov.backoff.forget(model_id, node_id)
        joined = await self._prov.join_load(model_id)
        if joined is not None and node_id in (None, joined):
            if on_plan is not None:
                on_plan(joined)
            return joined
        if (held := self._loaded_on(model_id, node_id)) is not None:  # nothing to do
            if on_plan is not None:
                on_plan(held)
            return held
        entry, plan = self._plan(model_id, node_id)
        if on_plan is not None:
            on_plan(plan.node_id)
        return await self._prov.load_planned(entry, plan, on_progress)

    def begin_load_on(self, model_id: str, node_id: str) -> None:
        """:meth:`load_on`, started in the background; returns at once (the web console:
        the fleet's next updates show the load). Raises as :meth:`load_on` does before it starts."""
        self._prov.entry(model_id)
        self._prov.backoff.forget(model_id, node_id)
        if self._loaded_on(model_id, node_id) is not None:
            return
        entry, plan = self._plan(model_id, node_id)
        self._prov.begin_load_planned(entry, plan)

    async def unload_from(self, model_id: str, node_id: str) -> None:
        """Unload ``model_id`` from ``node_id``, draining its requests first (its pin goes
        too). Raises NotFound when that neuron does not hold it, ColdLoadFailed when the
        neuron could not be told."""
        self._check_holds(model_id, node_id)
        self.unpin(model_id, node_id)
        try:
            await self._prov.unload(node_id, model_id)
        except FleetError as exc:
            raise ColdLoadFailed(f"unloading {model_id!r} from {node_id} failed: {exc}",
                                 retry_after=self._prov.settings.retry_after, model=model_id) from None

    def begin_unload_from(self, model_id: str, node_id: str) -> None:
        """:meth:`unload_from`, started in the background; returns at once."""
        self._check_holds(model_id, node_id)
        self.unpin(model_id, node_id)
        self._prov.begin_unload(Unload(node_id, model_id), "operator")

    async def pull_on(self, model_id: str, node_id: str,
                      on_progress: Callable[[LoadProgress], None] | None = None) -> None:
        """Fetch ``model_id``'s source into ``node_id``'s cache without loading it.
        Raises :class:`ModelNotFound`, :class:`NotFound` (no such neuron) or
        :class:`ColdLoadFailed` (the neuron refused: the disk is full, a wrong hash...)."""
        prov = self._prov
        entry = prov.entry(model_id)
        link = prov.fleet.get(node_id)
        if link is None:
            raise NotFound(f"no neuron {node_id!r}", param="node")
        try:
            config = entry.model_config_for_neuron()
            if link.configs.get(entry.id) != config:
                await prov.command(link, UpsertModelConfig(_cid(), config), prov.settings.command_timeout)
            await prov.command(link, PullModel(_cid(), entry.id), prov.settings.load_timeout, on_progress)
        except FleetError as exc:
            raise ColdLoadFailed(f"pulling {model_id!r} onto {node_id} failed: {exc}",
                                 retry_after=prov.settings.retry_after, model=model_id,
                                 reason=getattr(exc, "code", None)) from None

    # --- pins ------------------------------------------------------------------------------

    def pins(self) -> dict[str, frozenset[str]]:
        """Model -> the neurons it is pinned on (until the cortex restarts)."""
        out: dict[str, frozenset[str]] = {}
        for node_id, model_id in self._pinned:
            out[model_id] = out.get(model_id, frozenset()) | {node_id}
        return out

    def pinned(self, node_id: str, model_id: str) -> bool:
        return (node_id, model_id) in self._pinned

    def pinned_pairs(self) -> list[tuple[str, str]]:
        """Every ``(node, model)`` pin, sorted."""
        return sorted(self._pinned)

    def pin(self, model_id: str, node_id: str) -> None:
        """Keep ``model_id`` loaded on ``node_id``: loaded now (in the background) and again
        whenever it is lost, never evicted nor unloaded for idleness there. Raises
        :class:`ModelNotFound` for a model outside the catalogue, :class:`Conflict` where it
        cannot be held there beside the neuron's other pins (every pinned model of the pool
        it draws from, RAM or GPU memory, in the ``memory_headroom`` share of it): a pin
        that can never be honoured would fail its load every ``warm_retry``, for ever."""
        entry = self._prov.entry(model_id)
        if (node_id, model_id) not in self._pinned and (link := self._prov.fleet.get(node_id)) is not None:
            self._check_room(entry, node_id, link.descriptor.hardware)
        self._pinned.add((node_id, model_id))
        self._prov.pin_changed(model_id, node_id)

    def drop_pins_outside(self, catalogue: Container[str]) -> list[tuple[str, str]]:
        """Drop the pins of models no longer in ``catalogue`` (a reload removed them: no pin
        of theirs can be honoured again, since a load needs the model's entry); returns
        the ``(node, model)`` pins dropped, sorted. Their copies stay loaded, as after an
        unpin, until the operator unloads them."""
        dropped = sorted(pair for pair in self._pinned if pair[1] not in catalogue)
        self._pinned.difference_update(dropped)
        return dropped

    def unpin(self, model_id: str, node_id: str) -> bool:
        """Drop a pin (the model stays loaded, as any other); False if there was none."""
        if (node_id, model_id) not in self._pinned:
            return False
        self._pinned.discard((node_id, model_id))
        self._prov.wake()
        return True

    # --- inside ----------------------------------------------------------------------------

    def _check_room(self, entry: CatalogueEntry, node_id: str, hardware: Hardware) -> None:
        """Raise :class:`Conflict` unless ``entry`` fits on ``node_id`` with its other pins."""
        prov = self._prov
        headroom = prov.settings.memory_headroom
        usable = int(entry.capacity_mb(hardware) * headroom)
        if not entry.is_feasible_on(hardware, headroom):
            raise Conflict(f"model {entry.id!r} ({entry.memory_mb} MB) can never be held on {node_id} "
                           f"({usable} MB usable of its memory_headroom {headroom:g} share)", param="neuron",
                           code="no_feasible_neuron")
        others = sorted((m, e.memory_mb) for n, m in self._pinned if n == node_id and m != entry.id
                        and (e := prov.catalogue.get(m)) is not None and e.on_gpu == entry.on_gpu)
        if entry.memory_mb + sum(mb for _, mb in others) > usable:
            pool = "GPU memory" if entry.on_gpu else "RAM"
            raise Conflict(f"model {entry.id!r} ({entry.memory_mb} MB) does not fit on {node_id} beside its other "
                           f"pins ({', '.join(f'{m}: {mb} MB' for m, mb in others)}): {usable} MB of its {pool} "
                           "is usable (memory_headroom); unpin one first", param="neuron", code="pins_do_not_fit")

    def _plan(self, model_id: str, node_id: str | None) -> tuple[CatalogueEntry, LoadPlan]:
        prov = self._prov
        entry = prov.entry(model_id)
        views = prov.views()
        if node_id is not None:
            views = [v for v in views if v.node_id == node_id]
            if not views:
                raise NotFound(f"no usable neuron {node_id!r}", param="node", code="neuron_not_found")
        if prov.loading(model_id):
            raise BadRequest(f"model {model_id!r} is already loading", param="model", code="already_loading")
        try:
            plan = place(entry, views, headroom=prov.settings.memory_headroom, policy=prov.policy,
                         now=trio.current_time())
        except NoPlacement as exc:
            raise BadRequest(f"{exc}" + (f" (on {node_id})" if node_id else ""), param="node",
                             code="no_feasible_neuron") from None
        return entry, plan

    def _loaded_on(self, model_id: str, node_id: str | None) -> str | None:
        """The usable neuron (``node_id`` itself, when named) where ``model_id`` is loaded
        and not being unloaded, if any: a load of it there, or where a cold load would go
        (none would: it is loaded), is done already. Planned anyway, it was a second copy,
        or an eviction of the model itself where no copy had room."""
        prov = self._prov
        for link in sorted(prov.fleet.usable(), key=lambda link: link.node_id):
            status = link.models.get(model_id)
            if (node_id in (None, link.node_id) and status is not None and status.state is ModelState.LOADED
                    and (link.node_id, model_id) not in prov.draining):
                return link.node_id
        return None

    def holds(self, model_id: str, node_id: str) -> bool:
        """Whether ``node_id`` holds ``model_id``: loaded, loading, unloading or failed
        (an unload clears a failure); one only configured there holds nothing to unload."""
        link = self._prov.fleet.get(node_id)
        status = None if link is None else link.models.get(model_id)
        return status is not None and status.state is not ModelState.CONFIGURED

    def _check_holds(self, model_id: str, node_id: str) -> None:
        if not self.holds(model_id, node_id):
            raise NotFound(f"neuron {node_id!r} does not hold model {model_id!r}", param="model")
