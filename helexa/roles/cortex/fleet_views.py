"""The fleet as :mod:`.placement`'s pure decisions see it: :func:`views`, a snapshot of
every usable neuron's residents with what eviction weighs (for :class:`.provisioner.Provisioner`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio

from helexa.protocol import ModelState

from .catalogue import MB, Priority
from .placement import NodeView, Resident
from .queue import Demand

if TYPE_CHECKING:
    from .provisioner import Provisioner

__all__ = ["views"]


def views(prov: Provisioner, demand: dict[str, Demand] | None = None) -> list[NodeView]:
    """The fleet as the pure core sees it (loads under way count as resident, and so do
    models being unloaded, ``draining`` and not evictable, until they are gone: they hold
    their memory, and a load of the model itself waits for them to leave); first sight of
    a resident counts as a use."""
    now = trio.current_time()
    demand = demand if demand is not None else {}
    pending: dict[str, list[str]] = {}
    for model_id, node_id in prov._pending.items():
        pending.setdefault(node_id, []).append(model_id)
    out = []
    for link in prov.fleet.usable():
        residents = []
        for model_id, status in link.models.items():
            if status.state not in (ModelState.LOADED, ModelState.LOADING):
                continue
            key = (link.node_id, model_id)
            draining = key in prov.draining
            last_used = prov.live.last_used.setdefault(key, now)
            entry = prov.catalogue.get(model_id)
            # The cortex's own count, not the neuron's (a heartbeat old): a plan must see a
            # model go idle the moment its last request ends. What the cortex does not
            # know of, the neuron drains by itself within the unload's grace.
            busy = prov._in_use(*key) > 0
            wanted = demand.get(model_id)
            residents.append(
                Resident(
                    model_id=model_id,
                    memory_mb=entry.memory_mb if entry else status.memory_bytes // MB,
                    on_gpu=entry.on_gpu if entry else False,
                    priority=entry.priority if entry else Priority.CRITICAL,
                    last_used=last_used,
                    busy=busy,
                    evictable=entry is not None and status.state is ModelState.LOADED and not draining
                    and model_id not in prov._pending and not prov.operator.pinned(*key),
                    loaded_at=prov.loaded_at.setdefault(key, now),
                    keep_warm=entry is not None and entry.keep_warm,
                    pinned=(entry is not None and link.node_id in entry.pinned_on) or prov.operator.pinned(*key),
                    queued=wanted.waiting if wanted is not None else 0,
                    rate=prov.live.rate(model_id, now),
                    load_time=prov.load_times.get(model_id),
                    draining=draining,
                )
            )
        for model_id in pending.get(link.node_id, ()):
            if model_id not in link.models or link.models[model_id].state not in (ModelState.LOADED,
                                                                                    ModelState.LOADING):
                entry = prov.catalogue.get(model_id)
                if entry is not None:
                    residents.append(Resident(model_id, entry.memory_mb, entry.on_gpu, entry.priority, now,
                                              evictable=False))
        out.append(NodeView(link.node_id, link.descriptor.hardware, tuple(residents)))
    return out
