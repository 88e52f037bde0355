"""The loads the admission queue needs, each housekeeping pass: the part of
:class:`~.provisioner.Provisioner` that turns the queue's demand into load plans
(:func:`~.placement.plan_loads`) and fails at once the requests that no load can serve now
(no usable neuron can hold their model; or its loads failed lately on every neuron that
could, :mod:`.load_backoff`). A helper of the provisioner, as :mod:`.fleet_views` is."""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import TYPE_CHECKING

from .errors import NoCapacity
from .placement import NodeView, plan_loads
from .queue import Demand

if TYPE_CHECKING:
    from .provisioner import Provisioner

__all__ = ["start"]

log = logging.getLogger("helexa.roles.cortex.provisioner")


def start(prov: Provisioner, demand: dict[str, Demand], views: list[NodeView], now: float) -> float | None:
    """Start ``prov``'s loads for ``demand`` (``views``: its views of it); return when to
    plan again (None: on a change)."""
    resident = {r.model_id for v in views for r in v.residents}
    # A model draining to make room is not planned back before it left: its requests wait
    # their turn, rather than evict a third model for it.
    wanted = [replace(d, rate=prov.live.rate(m, now), load_time=prov.load_times.get(m))
              for m, d in demand.items() if m not in prov._flights and m not in prov._swapped
              and m in prov.catalogue]
    # No usable neuron can hold it (its only one left): the 503 a new request gets, now.
    stranded = {d.model_id for d in wanted if d.model_id not in resident and (e := prov.catalogue.get(d.model_id))
                and not any(e.is_feasible_on(v.hardware, prov.settings.memory_headroom) for v in views)}
    for model_id in stranded:
        prov._on_load_failed(model_id, NoCapacity(f"no usable neuron for model {model_id!r} right now",
                                                  retry_after=prov.settings.retry_after))
    wanted = [d for d in wanted if d.model_id not in stranded]
    # It failed lately on every neuron that could hold it: its requests get that now,
    # not another load that fails the same way.
    stuck = prov.backoff.stuck([d.model_id for d in wanted if d.model_id not in resident], views, prov.catalogue,
                               prov.settings.memory_headroom, now)
    for model_id, nodes in stuck.items():
        prov._on_load_failed(model_id, prov.backoff.error(model_id, nodes, now))
    wanted = [d for d in wanted if d.model_id not in stuck]
    barred = {d.model_id: b for d in wanted if (b := prov.backoff.barred(d.model_id, now))}
    if not wanted:
        return None
    plans, retry = plan_loads([d for d in wanted if d.model_id not in resident],
                              {d.model_id: e for d in wanted if (e := prov.catalogue.get(d.model_id))},
                              views, policy=prov.policy, headroom=prov.settings.memory_headroom, now=now,
                              replicas=[d for d in wanted if d.model_id in resident], barred=barred)
    for plan in plans:
        entry = prov.catalogue.get(plan.model_id)
        assert entry is not None
        log.info("loading %s on %s for %d waiting request(s), evicting %s", plan.model_id, plan.node_id,
                 demand[plan.model_id].waiting, list(plan.evict) or "nothing")
        prov._start_flight(entry, plan)
    return retry
