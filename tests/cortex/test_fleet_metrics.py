"""The fleet's gauges on ``/metrics``, and the example Grafana dashboard and Prometheus
alert rules in ``packaging/``: every metric they query is one the cortex serves."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import yaml
from prometheus_client.parser import text_string_to_metric_families

from helexa.protocol import GpuUsage, ModelState, ModelStatus, NeuronMetrics
from helexa.roles.cortex.catalogue import Catalogue, CatalogueEntry
from helexa.roles.cortex.fleet import Fleet, Health
from neuron_double import GB, NeuronDouble, hardware
from serving import admin_headers, serving

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "packaging" / "grafana" / "helexa-dashboard.json"
ALERTS = ROOT / "packaging" / "prometheus" / "helexa-alerts.yml"
CATALOGUE = Catalogue([CatalogueEntry(id="chat", backend="synthetic", memory_mb=100)])
_SUFFIXES = ("_total", "_bucket", "_sum", "_count", "_created")


async def _scrape() -> str:
    fleet = Fleet()
    n1 = NeuronDouble("n1", fleet, loaded=("chat",), hw=hardware(ram_gb=16, gpus=(8,)))
    n1.metrics = NeuronMetrics(ram_used=4 * GB, ram_total=16 * GB, gpus=(GpuUsage(0, 3 * GB, 5 * GB),),
                               in_flight=1, queued=2)
    n2 = NeuronDouble("n2", fleet)
    n2.models["chat"] = ModelStatus("chat", ModelState.FAILED, error="no")
    n2.health = Health.UNHEALTHY
    n3 = NeuronDouble("n3", fleet, loaded=("chat",))  # its connection dropped: as NeuronLink leaves it until removed
    n3.health, n3.connected = Health.UNHEALTHY, False
    async with serving(fleet, CATALOGUE) as (gateway, url), httpx.AsyncClient(base_url=url) as http:
        r = await http.post("/v1/chat/completions", json={"model": "chat", "messages": [{"role": "user",
                                                                                         "content": "x"}]})
        assert r.status_code == 200
        gateway.orchestrator.provisioner.load_progress["big"] = ("download", 0.25)
        metrics = await http.get("/metrics", headers=admin_headers())
        assert metrics.status_code == 200
        return metrics.text


def _samples(text: str) -> dict[tuple[str, frozenset], float]:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


async def test_metrics_show_the_fleets_neurons_memory_and_models() -> None:
    samples = _samples(await _scrape())

    def value(name: str, **labels: str) -> float:
        return samples[(name, frozenset(labels.items()))]

    assert value("helexa_neurons", health="healthy") == 1 and value("helexa_neurons", health="unhealthy") == 1
    assert value("helexa_neurons", health="offline") == 1 and value("helexa_neurons", health="draining") == 0
    assert value("helexa_neuron_ram_bytes", neuron="n1", kind="used") == 4 * GB
    assert value("helexa_neuron_ram_bytes", neuron="n1", kind="total") == 16 * GB
    assert value("helexa_neuron_gpu_memory_bytes", neuron="n1", gpu="0", kind="used") == 3 * GB
    assert value("helexa_neuron_gpu_memory_bytes", neuron="n1", gpu="0", kind="total") == 8 * GB
    assert value("helexa_neuron_queued_requests", neuron="n1") == 2
    assert value("helexa_models", state="loaded") == 1 and value("helexa_models", state="failed") == 1
    assert value("helexa_model_state", model="chat", neuron="n2", state="failed") == 1
    # a disconnected neuron's models are offline, as /admin/models shows them: not capacity still loaded
    assert value("helexa_models", state="offline") == 1
    assert value("helexa_model_state", model="chat", neuron="n3", state="offline") == 1
    assert ("helexa_model_state", frozenset({"model": "chat", "neuron": "n3", "state": "loaded"}.items())) \
        not in samples
    assert value("helexa_model_load_progress", model="big", stage="download") == 0.25
    assert value("helexa_catalogue_models") == 1
    assert value("helexa_gateway_in_flight_requests") == 1  # the scrape itself
    assert value("helexa_mesh_peers") == 0


def _names(expr: str) -> set[str]:
    return set(re.findall(r"\bhelexa_[a-z0-9_]+\b", expr))


def _served(text: str) -> set[str]:
    served = set()
    for family in text_string_to_metric_families(text):
        served.add(family.name)
        served.update(s.name for s in family.samples)
        if family.type in ("counter", "histogram"):  # series not seen yet still have these names
            served.update(family.name + suffix for suffix in _SUFFIXES)
    return served


async def test_every_metric_the_dashboard_and_the_alerts_use_is_served() -> None:
    served = _served(await _scrape())
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    rules = [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]
    assert len(exprs) >= 15 and len(rules) >= 8
    assert all(rule["alert"] and rule["annotations"]["summary"] for rule in rules)
    # a disconnected neuron is neither unhealthy nor its models loaded or failed: an alert of its own
    assert any('health="offline"' in rule["expr"] for rule in rules)
    used = set().union(*map(_names, exprs + [rule["expr"] for rule in rules]))
    assert used - served == set()
    # the fleet's own families are all on the dashboard
    fleet_families = {"helexa_neurons", "helexa_neuron_ram_bytes", "helexa_neuron_gpu_memory_bytes", "helexa_models",
                      "helexa_model_load_progress", "helexa_neuron_queued_requests", "helexa_mesh_peers",
                      "helexa_federation_requests_total", "helexa_gateway_in_flight_requests"}
    assert fleet_families <= used


async def test_model_names_nothing_serves_add_no_series_to_the_metrics() -> None:
    """Names a client makes up (on an open portal, which serves every name the fleet has)
    are refused 404 and counted under one label, "-": as their own label values, each
    would add series to /metrics for as long as the cortex runs."""
    fleet = Fleet()
    NeuronDouble("n1", fleet, loaded=("chat",))
    async with serving(fleet, CATALOGUE) as (_, url), httpx.AsyncClient(base_url=url) as http:
        for i in range(20):
            body = {"model": f"made-up-{i}", "messages": [{"role": "user", "content": "x"}]}
            assert (await http.post("/v1/chat/completions", json=body)).status_code == 404
            assert (await http.post("/v1/chat/completions", json={**body, "stream": True})).status_code == 404
            assert (await http.post("/v1/embeddings", json={"model": f"made-up-{i}", "input": "x"})).status_code == 404
        text = (await http.get("/metrics", headers=admin_headers())).text
    assert "made-up" not in text
    decisions = {s.labels["model"]: s.value for f in text_string_to_metric_families(text)
                 if f.name == "helexa_routing_decisions" for s in f.samples if s.name.endswith("_total")}
    assert decisions == {"-": 60}
