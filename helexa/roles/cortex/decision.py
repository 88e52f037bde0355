"""The routing decision: where one request goes, among a free slot on a neuron of this fleet,
the queue, a cold load, a peer cortex over the mesh, or nowhere. :func:`decide` is pure,
over plain data; the :class:`~.orchestrator.Orchestrator` builds its inputs from the fleet
and acts on what it returns."""

from __future__ import annotations

from dataclasses import replace

from helexa.protocol import WorkloadClass

from .scheduler import Hints, RoutingDecision, SchedulerState, schedule

__all__ = ["decide"]


def decide(
    workload: WorkloadClass, hints: Hints, state: SchedulerState, *, catalogued: bool, feasible: bool,
    peers: bool, peer_offers: bool, waiting: int = 0, max_skew: int | None = None,
) -> RoutingDecision:
    """Where a request for ``hints.model_id`` goes. Pure.

    Args:
        workload: the request's class.
        hints: the model, neurons to avoid (those that already failed this request), and
            the size of its prompt in prefix blocks.
        state: the usable neurons that have the model loaded, with their live load, slots,
            and the prefix blocks (or session) of this request each holds.
        catalogued: the operator's catalogue lists the model.
        feasible: some usable neuron here could hold it (all its memory free).
        peers: the request may go to a peer cortex (a mesh is joined and policy allows).
        peer_offers: a live peer offers the model and the ask policy allows it.
        waiting: requests already queued for the model (a newcomer does not jump them).
        max_skew: cache-aware routing's load bound (None: least busy only).

    Returns:
        A decision whose ``mode`` is ``local`` (``targets`` best first, each with a free
        slot), ``queue`` (loaded here, but no slot free or others waiting), ``cold_load``
        (load it here first), ``peer``, or ``none`` (nothing can serve it: 404 for a model
        unknown here, 503 when it was known but every neuron failed).

    A request that already failed somewhere (``hints.exclude``) never leaves for a peer:
    failover stays in the fleet, and the federation tries its peers in turn itself.
    """
    local = schedule(workload, hints, state, max_skew=max_skew)
    if local.targets and not waiting:
        return local
    if local.targets or local.mode == "queue":
        reason = f"{waiting} request(s) wait ahead" if waiting else local.reason
        return replace(local, targets=(), mode="queue", reason=reason)
    retrying = bool(hints.exclude)
    if catalogued and (feasible or retrying or not (peers and peer_offers)):
        return RoutingDecision(hints.model_id, workload, (), mode="cold_load",
                               reason="not loaded on a usable neuron" if feasible else "no neuron here can hold it")
    if peers and not retrying:
        return RoutingDecision(hints.model_id, workload, (), mode="peer",
                               reason="offered by a peer" if peer_offers else "unknown here")
    return RoutingDecision(hints.model_id, workload, (), mode="none",
                           reason="every neuron with it failed" if retrying else "unknown here")
