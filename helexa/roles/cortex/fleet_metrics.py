"""The fleet's own state as Prometheus gauges, read at each scrape of ``/metrics``.

Families (all gauges unless said)::

    helexa_neurons{health}                          neurons by health (healthy, unhealthy, draining, offline)
    helexa_neuron_ram_bytes{neuron, kind}           RAM used / total, from heartbeats
    helexa_neuron_gpu_memory_bytes{neuron, gpu, kind}   VRAM used / total per GPU
    helexa_neuron_in_flight_requests{neuron}        requests running on a neuron
    helexa_neuron_queued_requests{neuron}           requests queued inside a neuron
    helexa_models{state}                            (model, neuron) pairs by state (offline: on a
                                                    disconnected neuron, whatever it last reported)
    helexa_model_state{model, neuron, state}        1 for each model's state on each neuron
    helexa_model_load_progress{model, stage}        fraction done of a load in progress
    helexa_catalogue_models                         entries in the catalogue
    helexa_pinned_models                            (model, neuron) pins
    helexa_gateway_in_flight_requests               HTTP requests being handled
    helexa_cold_load_waiting_requests               requests waiting for a cold load
    helexa_mesh_peers                               peers with a live announcement
    helexa_federation_requests_total{direction, outcome}   counter: federated requests
                                                    served and consumed since start
    helexa_federation_tokens_total{direction}       counter: their tokens

Labels name neurons, models and GPUs, never a key or a peer's customer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from helexa.protocol import ModelState

from .fleet import OFFLINE, Fleet, Health, health_view, online

if TYPE_CHECKING:
    from .federation.service import Federation
    from .orchestrator import Orchestrator

_STATES = [*(s.value for s in ModelState), OFFLINE]


class FleetCollector(Collector):
    """Reads ``orchestrator``'s fleet, catalogue and provisioner (and the federation's
    peers and ledger, when given) at each scrape.

    Args:
        orchestrator: the cortex's orchestrator.
        in_flight: the gateway's HTTP requests being handled.
        federation: returns the federation (None without the mesh).
    """

    def __init__(self, orchestrator: Orchestrator, in_flight: Callable[[], int],
                 federation: Callable[[], Federation | None] = lambda: None) -> None:
        self.orchestrator = orchestrator
        self.fleet: Fleet = orchestrator.fleet
        self.in_flight = in_flight
        self.federation = federation

    def describe(self) -> Iterator[GaugeMetricFamily]:
        return iter(())  # unchecked: the families depend on the fleet at scrape time

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        links = sorted(self.fleet, key=lambda link: link.node_id)
        # As the operator's views show it: a disconnected neuron is offline, not unhealthy
        # (missed heartbeats while connected), until it rejoins or is removed.
        health = GaugeMetricFamily("helexa_neurons", "Neurons by health (offline: disconnected, not yet removed)",
                                   labels=["health"])
        views = [health_view(link) for link in links]
        for h in [*(h.value for h in Health), OFFLINE]:
            health.add_metric([h], views.count(h))
        yield health

        ram = GaugeMetricFamily("helexa_neuron_ram_bytes", "A neuron's RAM, used and total",
                                labels=["neuron", "kind"])
        vram = GaugeMetricFamily("helexa_neuron_gpu_memory_bytes", "A neuron's GPU memory, used and total, per GPU",
                                 labels=["neuron", "gpu", "kind"])
        running = GaugeMetricFamily("helexa_neuron_in_flight_requests", "Requests running on a neuron",
                                    labels=["neuron"])
        queued = GaugeMetricFamily("helexa_neuron_queued_requests", "Requests queued inside a neuron",
                                   labels=["neuron"])
        for link in links:
            m = link.metrics
            ram.add_metric([link.node_id, "used"], m.ram_used)
            ram.add_metric([link.node_id, "total"], m.ram_total or link.descriptor.hardware.ram_total)
            totals = {g.index: g.vram_total for g in link.descriptor.hardware.gpus}
            for gpu in m.gpus:
                vram.add_metric([link.node_id, str(gpu.index), "used"], gpu.vram_used)
                vram.add_metric([link.node_id, str(gpu.index), "total"],
                                totals.get(gpu.index, gpu.vram_used + gpu.vram_free))
            running.add_metric([link.node_id], max(m.in_flight, link.in_flight))
            queued.add_metric([link.node_id], m.queued)
        yield from (ram, vram, running, queued)

        # As /admin/models shows them: a disconnected neuron's models are offline, whatever
        # they last reported, so that nothing counts as loaded capacity that is gone.
        by_state = GaugeMetricFamily("helexa_models", "Models on neurons, by state (offline: on a disconnected "
                                     "neuron)", labels=["state"])
        each = GaugeMetricFamily("helexa_model_state", "1 for a model's state on a neuron (offline: the neuron "
                                 "is disconnected)", labels=["model", "neuron", "state"])
        counts = dict.fromkeys(_STATES, 0)
        for link in links:
            for model_id, status in sorted(link.models.items()):
                state = status.state.value if online(link) else OFFLINE
                counts[state] += 1
                each.add_metric([model_id, link.node_id, state], 1)
        for state, n in counts.items():
            by_state.add_metric([state], n)
        yield from (by_state, each)

        provisioner = self.orchestrator.provisioner
        progress = GaugeMetricFamily("helexa_model_load_progress", "Fraction done of a model load in progress",
                                     labels=["model", "stage"])
        for model_id, (stage, fraction) in sorted(provisioner.load_progress.items()):
            progress.add_metric([model_id, stage], fraction)
        yield progress
        yield GaugeMetricFamily("helexa_catalogue_models", "Models in the catalogue",
                                value=len(self.orchestrator.catalogue))
        yield GaugeMetricFamily("helexa_pinned_models", "Models pinned on neurons (helexa models pin)",
                                value=sum(len(on) for on in provisioner.operator.pins().values()))
        yield GaugeMetricFamily("helexa_gateway_in_flight_requests", "HTTP requests being handled",
                                value=self.in_flight())
        yield GaugeMetricFamily("helexa_cold_load_waiting_requests", "Requests waiting for a cold load",
                                value=self.orchestrator.waiting)

        fed = self.federation()
        peers = GaugeMetricFamily("helexa_mesh_peers", "Mesh peers with a live announcement")
        requests = CounterMetricFamily("helexa_federation_requests", "Federated requests since start, served "
                                       "to peers and consumed from them, by outcome", labels=["direction", "outcome"])
        tokens = CounterMetricFamily("helexa_federation_tokens", "Tokens of federated requests since start",
                                     labels=["direction"])
        if fed is not None:
            peers.add_metric([], len(fed.table.peers()))
            per_direction: dict[str, int] = {}
            for (direction, outcome), (n, t) in sorted(fed.ledger.recorded.items()):
                requests.add_metric([direction, outcome], n)
                per_direction[direction] = per_direction.get(direction, 0) + t
            for direction, t in sorted(per_direction.items()):
                tokens.add_metric([direction], t)
        else:
            peers.add_metric([], 0)
        yield from (peers, requests, tokens)
