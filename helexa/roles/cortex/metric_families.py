"""Counters and histograms kept in plain floats by the thread that owns them, and handed
to prometheus_client only when ``/metrics`` is scraped.

prometheus_client's ``Counter.inc`` and ``Histogram.observe`` take a lock and pass
through four Python calls each, for every increment: about a dozen per request on the
gateway's path (docs/benchmarks.md, 2026-11-30, branch meter). The families here are
drop-in for the hot ones of :class:`~.metrics.Metrics`: the same constructor arguments,
``labels(*values)`` returning a child with ``inc`` / ``observe``, and a
:meth:`Counter.collect` that yields exactly what prometheus_client's own family would
(``_total`` and ``_created`` per series; cumulative ``_bucket`` per bound, ``+Inf``,
``_count``, ``_sum``, ``_created``), in the order the series were first used, so
``/metrics`` reads the same.

**Not thread-safe, by design:** a family is written and collected only on the trio thread
of the cortex that owns it (the request path and the ``/metrics`` handler both run there).
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Iterable, Sequence

from prometheus_client import CollectorRegistry
from prometheus_client import metrics as _exporter
from prometheus_client.metrics_core import Metric
from prometheus_client.utils import INF, floatToGoString


class _Family:
    _type = ""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str], registry: CollectorRegistry
                 ) -> None:
        self._name = name
        self._documentation = documentation
        self._labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], object] = {}
        registry.register(self)

    def labels(self, *values: str) -> object:
        """The series of ``values`` (one per label name, in order), created on first use."""
        key = tuple(str(v) for v in values)
        if len(key) != len(self._labelnames):
            raise ValueError(f"{self._name} takes {len(self._labelnames)} label values, got {len(key)}")
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self._child()
        return child

    def forget(self, label: str, value: str) -> None:
        """Drop every series whose ``label`` is ``value`` (a neuron that left for good)."""
        i = self._labelnames.index(label)
        for key in [k for k in self._children if k[i] == value]:
            del self._children[key]

    def _child(self) -> object:  # pragma: no cover
        raise NotImplementedError

    def describe(self) -> Iterable[Metric]:
        return [Metric(self._name, self._documentation, self._type)]


class _CounterChild:
    __slots__ = ("value", "created")

    def __init__(self) -> None:
        self.value = 0.0
        self.created = time.time()

    def inc(self, amount: float = 1) -> None:
        if amount < 0:
            raise ValueError("Counters can only be incremented by non-negative amounts.")
        self.value += amount


class Counter(_Family):
    """A labelled counter (``NAME_total``), as ``prometheus_client.Counter`` renders it."""

    _type = "counter"

    def _child(self) -> _CounterChild:
        return _CounterChild()

    def labels(self, *values: str) -> _CounterChild:  # type: ignore[override]
        return super().labels(*values)  # type: ignore[return-value]

    def collect(self) -> Iterable[Metric]:
        metric = Metric(self._name, self._documentation, self._type)
        names = self._labelnames
        for key, child in self._children.items():
            assert isinstance(child, _CounterChild)
            labels = dict(zip(names, key))
            metric.add_sample(self._name + "_total", labels, child.value)
            if _exporter._use_created:  # the exporter's own switch (PROMETHEUS_DISABLE_CREATED_SERIES)
                metric.add_sample(self._name + "_created", labels, child.created)
        return [metric]


class _HistogramChild:
    __slots__ = ("_bounds", "counts", "sum", "created")

    def __init__(self, bounds: list[float]) -> None:
        self._bounds = bounds
        self.counts = [0.0] * len(bounds)
        self.sum = 0.0
        self.created = time.time()

    def observe(self, amount: float) -> None:
        self.sum += amount
        bounds = self._bounds
        i = bisect.bisect_left(bounds, amount)  # the first bound >= amount
        if i < len(bounds) and amount <= bounds[i]:  # (NaN falls in no bucket, as prometheus_client has it)
            self.counts[i] += 1


class Histogram(_Family):
    """A labelled histogram with fixed ``buckets`` (``+Inf`` added), as
    ``prometheus_client.Histogram`` renders it."""

    _type = "histogram"

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str], *, buckets: Sequence[float],
                 registry: CollectorRegistry) -> None:
        bounds = [float(b) for b in buckets]
        if bounds != sorted(bounds):
            raise ValueError("Buckets not in sorted order")
        if bounds[-1] != INF:
            bounds.append(INF)
        self._bounds = bounds
        self._les = [floatToGoString(b) for b in bounds]
        super().__init__(name, documentation, labelnames, registry)

    def _child(self) -> _HistogramChild:
        return _HistogramChild(self._bounds)

    def labels(self, *values: str) -> _HistogramChild:  # type: ignore[override]
        return super().labels(*values)  # type: ignore[return-value]

    def collect(self) -> Iterable[Metric]:
        metric = Metric(self._name, self._documentation, self._type)
        name, names = self._name, self._labelnames
        for key, child in self._children.items():
            assert isinstance(child, _HistogramChild)
            labels = dict(zip(names, key))
            acc = 0.0
            for le, count in zip(self._les, child.counts):
                acc += count
                metric.add_sample(name + "_bucket", {**labels, "le": le}, acc)
            metric.add_sample(name + "_count", labels, acc)
            if self._bounds[0] >= 0:
                metric.add_sample(name + "_sum", labels, child.sum)
            if _exporter._use_created:  # the exporter's own switch (PROMETHEUS_DISABLE_CREATED_SERIES)
                metric.add_sample(name + "_created", labels, child.created)
        return [metric]
