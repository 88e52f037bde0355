"""The plain-float counter and histogram families render on ``/metrics`` exactly as
prometheus_client's own families do, for the same operations in the same order."""

from __future__ import annotations

import math
import random
import time

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client import Counter as PromCounter
from prometheus_client import Histogram as PromHistogram
from prometheus_client import metrics as exporter

from helexa.roles.cortex import metric_families
from helexa.roles.cortex.metrics import Metrics

BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


def _pair(module_counter, module_histogram, registry):  # noqa: ANN001, ANN202
    counter = module_counter("helexa_things", "Things, by model and kind", ["model", "kind"], registry=registry)
    histogram = module_histogram("helexa_wait_seconds", "How long", ["model"], buckets=BUCKETS, registry=registry)
    return counter, histogram


def _run(counter, histogram, ops) -> None:  # noqa: ANN001
    for op, labels, amount in ops:
        if op == "inc":
            counter.labels(*labels).inc(amount)
        else:
            histogram.labels(labels[0]).observe(amount)


@pytest.fixture
def frozen_time(monkeypatch):  # noqa: ANN001, ANN201
    monkeypatch.setattr(time, "time", lambda: 1764536400.25)


def test_same_operations_render_the_same_text_as_prometheus_client(frozen_time) -> None:  # noqa: ANN001
    rng = random.Random(17)
    ops = []
    # bounds exactly, between bounds, past the last, zero, tiny, huge, and integer amounts
    amounts = [*BUCKETS, 0.0, 1e-9, 61.0, 1e12, 0.0031, 7, 0.5000001]
    for _ in range(400):
        labels = (rng.choice(["m1", "m2", "m:3"]), rng.choice(["prompt", "completion"]))
        if rng.random() < 0.5:
            ops.append(("inc", labels, rng.choice([1, 3, 0, 0.25, 16])))
        else:
            ops.append(("observe", labels, rng.choice(amounts) * rng.choice([1, 1, 0.9, 1.1])))
    ours, theirs = CollectorRegistry(auto_describe=True), CollectorRegistry(auto_describe=True)
    _run(*_pair(metric_families.Counter, metric_families.Histogram, ours), ops)
    _run(*_pair(PromCounter, PromHistogram, theirs), ops)
    assert generate_latest(ours) == generate_latest(theirs)
    assert b'helexa_wait_seconds_bucket{le="+Inf",model="m1"}' in generate_latest(ours)


def test_a_nan_observation_falls_in_no_bucket_but_in_the_sum_as_prometheus_client_does(
        frozen_time) -> None:  # noqa: ANN001
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    for registry, module in ((ours, metric_families), (theirs, None)):
        h = (module.Histogram("h", "h", ["m"], buckets=BUCKETS, registry=registry) if module
             else PromHistogram("h", "h", ["m"], buckets=BUCKETS, registry=registry))
        h.labels("a").observe(math.nan)
        h.labels("a").observe(0.2)
    assert generate_latest(ours) == generate_latest(theirs)


def test_series_touched_but_never_counted_are_shown_at_zero(frozen_time) -> None:  # noqa: ANN001
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    _pair(metric_families.Counter, metric_families.Histogram, ours)[1].labels("idle")
    _pair(PromCounter, PromHistogram, theirs)[1].labels("idle")
    assert generate_latest(ours) == generate_latest(theirs)


def test_created_series_follow_the_exporters_switch(frozen_time, monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setattr(exporter, "_use_created", False)
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    ops = [("inc", ("a", "b"), 2), ("observe", ("a",), 1)]
    _run(*_pair(metric_families.Counter, metric_families.Histogram, ours), ops)
    _run(*_pair(PromCounter, PromHistogram, theirs), ops)
    assert generate_latest(ours) == generate_latest(theirs)
    assert b"_created" not in generate_latest(ours)


def test_a_counter_refuses_a_negative_increment_and_a_wrong_label_count() -> None:
    counter = metric_families.Counter("c", "c", ["a", "b"], registry=CollectorRegistry())
    with pytest.raises(ValueError):
        counter.labels("x", "y").inc(-1)
    with pytest.raises(ValueError):
        counter.labels("x")


def test_a_family_name_taken_twice_in_one_registry_is_refused() -> None:
    registry = CollectorRegistry(auto_describe=True)
    metric_families.Counter("helexa_requests", "r", ["m"], registry=registry)
    with pytest.raises(ValueError):
        PromCounter("helexa_requests", "r", ["m"], registry=registry)


def test_the_gateways_request_metrics_render_as_before(frozen_time) -> None:  # noqa: ANN001
    """Metrics.request_done's families, against the same calls on prometheus_client's."""
    metrics = Metrics()
    metrics.request_done("m", "n1", "chat", duration=0.012, ttft=0.004, prompt_tokens=9, completion_tokens=16)
    metrics.request_done("m", "n1", "chat", duration=0.3, ttft=None, prompt_tokens=0, completion_tokens=0)
    metrics.portal_request("default", "m", "ok", prompt_tokens=9, completion_tokens=16, cost=0.5, currency="EUR")
    metrics.ledger_written("default", 0.0007)
    text = metrics.render().decode()
    registry = CollectorRegistry()
    requests = PromCounter("helexa_requests", "Requests served, by model, neuron and endpoint",
                           ["model", "neuron", "endpoint"], registry=registry)
    latency = PromHistogram("helexa_request_duration_seconds", "Time from dispatch to the last byte",
                            ["model", "neuron"], buckets=BUCKETS, registry=registry)
    requests.labels("m", "n1", "chat").inc()
    requests.labels("m", "n1", "chat").inc()
    latency.labels("m", "n1").observe(0.012)
    latency.labels("m", "n1").observe(0.3)
    for line in generate_latest(registry).decode().splitlines():
        assert line in text
    assert 'helexa_tokens_total{kind="prompt",model="m",neuron="n1"} 9.0' in text
    assert 'helexa_tokens_per_second_count{model="m",neuron="n1"} 1.0' in text
    assert 'helexa_portal_cost_total{currency="EUR",portal="default"} 0.5' in text
    assert 'helexa_ledger_write_seconds_bucket{le="0.001",portal="default"} 1.0' in text
