"""Traces with OpenTelemetry, off and free unless configured (``[telemetry]``).

One trace follows a request across processes: the gateway's span (``POST
/v1/chat/completions``), the orchestrator's decision and any cold load (the provisioner's
load command and the neuron's ``neuron.load``, with an event per stage: download, load),
each dispatch attempt, the neuron's generation and its wait before the backend started on
it (``neuron.queue``: :mod:`helexa.roles.neuron.queue_wait`), and on a federated request the peer
cortex's spans and its neuron's. The W3C ``traceparent`` of the current span rides in the
frames (``GenerateRequest.trace``, ``EmbedRequest.trace``, ``LoadModel.trace``, over the
control plane and the mesh); an HTTP client's own ``traceparent`` header is honoured as
the gateway span's parent.

With ``exporter = "none"`` (the default) no provider is installed: :func:`tracer` is
OpenTelemetry's no-op tracer, spans are non-recording and :func:`traceparent` is ``""``,
so nothing extra travels. ``"otlp"`` exports over OTLP/HTTP in batches (``endpoint``, else
the standard ``OTEL_EXPORTER_OTLP_*`` environment variables); ``"console"`` prints spans
(debugging). Tests install an in-memory exporter with :func:`use_provider`.

trio: OpenTelemetry keeps the current span in a ``contextvars`` variable, and every trio
task runs in a copy of its parent's context, so a span made current in a task is seen by
the code and the child tasks of that task, and never by another request's.
"""

from __future__ import annotations

import logging
from typing import Literal

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from pydantic import BaseModel, ConfigDict, Field

log = logging.getLogger(__name__)

_PROPAGATOR = TraceContextTextMapPropagator()
_provider: trace.TracerProvider | None = None
_NOOP = trace.NoOpTracer()


class TelemetryConfig(BaseModel):
    """``[telemetry]`` of ``cortex.toml`` and ``neuron.toml``."""

    model_config = ConfigDict(extra="forbid")

    exporter: Literal["none", "otlp", "console"] = "none"
    """Where spans go: nowhere (tracing off, no cost), an OTLP/HTTP collector, or stderr."""
    endpoint: str | None = None
    """The OTLP/HTTP traces URL (``http://collector:4318/v1/traces``); unset: the
    ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_ENDPOINT`` environment
    variables, else the collector's default on localhost."""
    service_name: str | None = None
    """``service.name`` of this process's spans (default ``helexa-cortex`` / ``helexa-neuron``)."""
    sample_ratio: float = Field(1.0, ge=0, le=1)
    """Fraction of new traces recorded (a trace begun upstream follows its parent's choice)."""


TEXT_LIMIT = 256
"""Characters of a client's text a span keeps (:func:`text`)."""


def text(value: str, limit: int = TEXT_LIMIT) -> str:
    """A client's text (a path, a model name) as a span may carry it: keys and tokens masked
    as in the logs (:func:`helexa.logs.redact`; a trace leaves the host, to a collector),
    cut to ``limit`` characters."""
    from helexa.logs import redact

    clean = redact(value)
    return clean if len(clean) <= limit else clean[:limit - 1] + "\u2026"


def setup(config: TelemetryConfig, *, service: str) -> None:
    """Install this process's tracer provider as ``config`` says (nothing for ``none``)."""
    if config.exporter == "none":
        return
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
    from opentelemetry.sdk.trace.sampling import ParentBasedTraceIdRatio

    if config.exporter == "otlp":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(endpoint=config.endpoint) if config.endpoint else OTLPSpanExporter()
    else:
        exporter = ConsoleSpanExporter()
    from helexa import build

    resource = Resource.create({"service.name": config.service_name or service, "service.version": build.version()})
    provider = TracerProvider(resource=resource,
                              sampler=ParentBasedTraceIdRatio(config.sample_ratio))
    # The batch processor exports from its own thread: a slow collector never blocks trio.
    provider.add_span_processor(BatchSpanProcessor(exporter))
    use_provider(provider)
    log.info("tracing: exporting spans (%s) as %s", config.exporter, config.service_name or service)


def use_provider(provider: trace.TracerProvider | None) -> None:
    """Make ``provider`` this process's (None: tracing off again). Tests use this with an
    in-memory exporter; several providers may be swapped in one process."""
    global _provider
    _provider = provider


def shutdown() -> None:
    """Flush and stop the provider (at the end of the process)."""
    provider = _provider
    if provider is not None and hasattr(provider, "shutdown"):
        provider.shutdown()


def enabled() -> bool:
    """Whether spans are recorded at all (hot paths skip their bookkeeping when not)."""
    return _provider is not None


def tracer() -> trace.Tracer:
    """helexa's tracer (the no-op one while tracing is off)."""
    provider = _provider
    return provider.get_tracer("helexa") if provider is not None else _NOOP


def traceparent(span: trace.Span | None = None) -> str:
    """The W3C ``traceparent`` of ``span`` (default: the current one); ``""`` when it is
    not recording, so nothing travels while tracing is off."""
    span = span if span is not None else trace.get_current_span()
    if not span.get_span_context().is_valid:
        return ""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span))
    return carrier.get("traceparent", "")


def parent_context(value: str | bytes | None) -> otel_context.Context | None:
    """The context a ``traceparent`` header or frame field names (None when absent or bad)."""
    if not value:
        return None
    text = value.decode("latin-1") if isinstance(value, bytes) else value
    ctx = _PROPAGATOR.extract({"traceparent": text})
    return ctx if trace.get_current_span(ctx).get_span_context().is_valid else None
