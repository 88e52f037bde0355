"""Prometheus metrics of the gateway, per model and neuron, and per portal, served on
``/metrics`` (the admin socket).

Each :class:`Metrics` owns its own registry, so several cortexes (or tests) in one process
never collide. Labels name portals, models, neurons and outcomes, never a key: a key id
would make a series per customer, and the ledger is where per-key usage lives.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from .metric_families import Counter, Histogram

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_LOAD_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
_RATE_BUCKETS = (1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000)
_WRITE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    """The counters and histograms; call the methods from the request path."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("helexa_requests", "Requests served, by model, neuron and endpoint",
                                ["model", "neuron", "endpoint"], registry=r)
        self.errors = Counter("helexa_request_errors", "Requests that failed, by model, neuron and code",
                              ["model", "neuron", "code"], registry=r)
        self.ttft = Histogram("helexa_time_to_first_token_seconds", "Time from dispatch to the first token",
                              ["model", "neuron"], buckets=_LATENCY_BUCKETS, registry=r)
        self.latency = Histogram("helexa_request_duration_seconds", "Time from dispatch to the last byte",
                                 ["model", "neuron"], buckets=_LATENCY_BUCKETS, registry=r)
        self.tokens_per_second = Histogram("helexa_tokens_per_second", "Generation speed of a request",
                                           ["model", "neuron"], buckets=_RATE_BUCKETS, registry=r)
        self.tokens = Counter("helexa_tokens", "Tokens, by model, neuron and kind (prompt, completion)",
                              ["model", "neuron", "kind"], registry=r)
        self.queue_time = Histogram("helexa_queue_seconds", "Time a request waited before dispatch "
                                    "(scheduling, cold loads)", ["model"], buckets=_LATENCY_BUCKETS, registry=r)
        self.cold_loads = Counter("helexa_cold_loads", "Models loaded on demand", ["model", "neuron"], registry=r)
        self._children: dict[tuple[str, str, str], tuple] = {}
        self.cold_load_seconds = Histogram("helexa_cold_load_seconds", "Duration of on-demand loads",
                                           ["model", "neuron"], buckets=_LOAD_BUCKETS, registry=r)
        self.portal_requests = Counter("helexa_portal_requests", "Requests a portal served, by model (as asked) "
                                       "and outcome (ok, client_gone, error)", ["portal", "model", "outcome"],
                                       registry=r)
        self.portal_tokens = Counter("helexa_portal_tokens", "Tokens a portal billed, by model and kind "
                                     "(prompt, completion)", ["portal", "model", "kind"], registry=r)
        self.portal_cost = Counter("helexa_portal_cost", "What a portal billed, in its currency",
                                   ["portal", "currency"], registry=r)
        self.portal_refusals = Counter("helexa_portal_refusals", "Requests a portal refused, by reason "
                                       "(unauthorized, requests, tokens, too_large, concurrency, budget)",
                                       ["portal", "reason"], registry=r)
        self.ledger_write = Histogram("helexa_ledger_write_seconds", "Time until a usage record was on disk",
                                      ["portal"], buckets=_WRITE_BUCKETS, registry=r)
        self._portal_children: dict[tuple[str, str, str], tuple] = {}
        self._ledger_children: dict[str, Histogram] = {}

    def request_done(
        self, model: str, neuron: str, endpoint: str, *, duration: float, ttft: float | None,
        prompt_tokens: int, completion_tokens: int,
    ) -> None:
        key = (model, neuron, endpoint)
        children = self._children[key] if key in self._children else None  # (no method call per request)
        if children is None:  # labels() costs a lock and a dict lookup per metric: once per key
            children = self._children[key] = (
                self.requests.labels(model, neuron, endpoint), self.latency.labels(model, neuron),
                self.ttft.labels(model, neuron), self.tokens_per_second.labels(model, neuron),
                self.tokens.labels(model, neuron, "prompt"), self.tokens.labels(model, neuron, "completion"),
            )
        requests, latency, ttft_h, rate, prompt, completion = children
        requests.inc()
        latency.observe(duration)
        if ttft is not None:
            ttft_h.observe(ttft)
            gen_time = duration - ttft
            if completion_tokens > 1 and gen_time > 0:
                rate.observe((completion_tokens - 1) / gen_time)
        if prompt_tokens:
            prompt.inc(prompt_tokens)
        if completion_tokens:
            completion.inc(completion_tokens)

    def portal_request(self, portal: str, model: str, outcome: str, *, prompt_tokens: int, completion_tokens: int,
                       cost: float, currency: str) -> None:
        """One request a portal served and billed (``model`` as the client asked for it)."""
        key = (portal, model, outcome)
        children = self._portal_children[key] if key in self._portal_children else None
        if children is None:
            children = self._portal_children[key] = (
                self.portal_requests.labels(portal, model, outcome), self.portal_tokens.labels(portal, model, "prompt"),
                self.portal_tokens.labels(portal, model, "completion"), self.portal_cost.labels(portal, currency))
        requests, prompt, completion, money = children
        requests.inc()
        if prompt_tokens:
            prompt.inc(prompt_tokens)
        if completion_tokens:
            completion.inc(completion_tokens)
        if cost:
            money.inc(cost)

    def ledger_written(self, portal: str, seconds: float) -> None:
        child = self._ledger_children.get(portal)
        if child is None:
            child = self._ledger_children[portal] = self.ledger_write.labels(portal)
        child.observe(seconds)

    def portal_refused(self, portal: str, reason: str) -> None:
        self.portal_refusals.labels(portal, reason).inc()

    def request_failed(self, model: str, neuron: str, code: str) -> None:
        self.errors.labels(model, neuron or "-", code).inc()

    def queued(self, model: str, seconds: float) -> None:
        self.queue_time.labels(model).observe(seconds)

    def cold_load(self, model: str, neuron: str, seconds: float) -> None:
        self.cold_loads.labels(model, neuron).inc()
        self.cold_load_seconds.labels(model, neuron).observe(seconds)

    def neuron_gone(self, neuron: str) -> None:
        """Drop ``neuron``'s series (it was removed from the fleet): a fleet whose neurons
        come and go under new ids (containers, autoscaling) kept ~170 series of each one
        that ever joined, in memory and in every scrape, for good."""
        for family in (self.requests, self.errors, self.ttft, self.latency, self.tokens_per_second, self.tokens,
                       self.cold_loads, self.cold_load_seconds):
            family.forget("neuron", neuron)
        for key in [k for k in self._children if k[1] == neuron]:
            del self._children[key]

    def add_collector(self, collector: Collector) -> None:
        """Serve ``collector``'s families on ``/metrics`` too (the fleet's gauges)."""
        self.registry.register(collector)

    def render(self) -> bytes:
        """The text exposition format, for ``GET /metrics``."""
        return generate_latest(self.registry)


_WAIT_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class OrchestratorMetrics:
    """The orchestrator's own families, in the registry of a :class:`Metrics` (one set per
    registry: :meth:`of`): the admission queue per model and portal, the routing decisions
    (mode, and whether the prompt's prefix was found cached), and evictions by reason."""

    @classmethod
    def of(cls, metrics: Metrics) -> "OrchestratorMetrics":
        """The families in ``metrics``' registry (created on first use)."""
        found = getattr(metrics, "_orchestrator_metrics", None)
        if found is None:
            found = cls(metrics.registry)
            metrics._orchestrator_metrics = found  # type: ignore[attr-defined]  # a cache, not state
        return found

    def __init__(self, registry: CollectorRegistry) -> None:
        from prometheus_client import Gauge

        r = self.registry = registry
        self.queue_length = Gauge("helexa_queue_length", "Requests waiting in the admission queue",
                                  ["model", "portal"], registry=r)
        self.queue_wait = Histogram("helexa_queue_wait_seconds", "Time a request waited in the admission queue "
                                    "before it was admitted", ["model", "portal"], buckets=_WAIT_BUCKETS, registry=r)
        self.queue_rejections = Counter("helexa_queue_rejections", "Requests refused by the admission queue, "
                                        "by reason (full, deadline, load_failed)", ["model", "portal", "reason"],
                                        registry=r)
        self.decisions = Counter("helexa_routing_decisions", "Routing decisions, by mode (local, queue, cold_load, "
                                 "peer, none) and cache (hit, miss, session, none)", ["model", "mode", "cache"],
                                 registry=r)
        self.prefix_blocks = Counter("helexa_prefix_blocks", "Prompt blocks routed, by whether the chosen neuron "
                                     "already held them (hit, miss)", ["model", "kind"], registry=r)
        self.evictions = Counter("helexa_evictions", "Models unloaded by the cortex, by reason (swap, idle, "
                                 "operator, retired: no longer in the catalogue)", ["model", "reason"], registry=r)
        self._decided: dict[tuple[str, str, str], tuple] = {}

    def waiting(self, model: str, portal: str, delta: int) -> None:
        self.queue_length.labels(model, portal).inc(delta)

    def admitted(self, model: str, portal: str, waited: float) -> None:
        self.queue_wait.labels(model, portal).observe(waited)

    def rejected(self, model: str, portal: str, reason: str) -> None:
        self.queue_rejections.labels(model, portal, reason).inc()

    def decided(self, model: str, mode: str, cache: str, *, matched: int = 0, total: int = 0) -> None:
        key = (model, mode, cache)
        children = self._decided[key] if key in self._decided else None
        if children is None:  # one per request: labels() costs a lock and a lookup per metric
            children = self._decided[key] = (self.decisions.labels(model, mode, cache),
                                             self.prefix_blocks.labels(model, "hit"),
                                             self.prefix_blocks.labels(model, "miss"))
        decisions, hit, miss = children
        decisions.inc()
        if total:
            if matched:
                hit.inc(matched)
            if total > matched:
                miss.inc(total - matched)

    def evicted(self, model: str, reason: str) -> None:
        self.evictions.labels(model, reason).inc()
