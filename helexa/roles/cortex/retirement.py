"""Models the catalogue dropped: which of them the cortex unloads (a pure decision).

A model removed from ``models.toml`` (or renamed: the old name is removed, the new one
added) and reloaded (``helexa reload``, SIGHUP) is no longer the catalogue's, so it would
never be idle-unloaded nor evicted (both need its entry) and would hold its memory until
an operator unloaded it; a rename would hold the model twice. So each housekeeping pass
(:mod:`.housekeeping`) unloads, draining first like every unload, the copies **the cortex
loaded of its own accord** (a cold load for requests, a load for the queue, keep-warm)
whose model left the catalogue.

What the cortex did not load itself keeps its old behaviour: an operator's load
(``helexa models load``, a pin) stays until the operator unloads it, and so does a model a
neuron held when the cortex first saw it (loaded by hand on the neuron, or before the
cortex restarted: the cortex cannot tell who loaded it).
"""

from __future__ import annotations

from collections.abc import Callable, Container, Iterable

from .placement import NodeView, Unload

__all__ = ["retired_unloads"]


def retired_unloads(catalogue: Container[str], provisioned: Iterable[tuple[str, str]], nodes: list[NodeView],
                    loading: Callable[[str], bool] = lambda model_id: False) -> list[Unload]:
    """The ``(neuron, model)`` copies to unload: loaded by the cortex itself
    (``provisioned``), resident on a usable neuron as ``nodes`` show it (a copy draining
    is not there), not in ``catalogue`` any more and not loading (``loading(model)``: its
    load ends first, and the next pass sees it). Sorted by neuron, then model."""
    held = {(n.node_id, r.model_id) for n in nodes for r in n.residents if not r.draining}
    return sorted((Unload(node_id, model_id) for node_id, model_id in provisioned
                   if model_id not in catalogue and not loading(model_id) and (node_id, model_id) in held),
                  key=lambda u: (u.node_id, u.model_id))
