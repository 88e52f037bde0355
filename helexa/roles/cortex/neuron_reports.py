"""What a joined neuron's reports may claim, as the cortex takes them (pure).

A neuron holds the join token, so it is admitted; what it says about itself and its
answers still passes here before the cortex acts on it. Its answers' usage is what a
client's key is billed for, so it is held to what the cortex can account for itself, as a
peer's is (:mod:`.federation.peer_usage`, whose bounds these are): a chunk counts at most
one token a byte it carries, a result's usage at most ``max_tokens`` and what was seen;
a negative count is a broken frame. Its heartbeat's figures drive scheduling, the fleet
view, ``helexa status`` and ``/metrics``: a negative or not-a-number figure is read as
zero (a neuron reporting ``queued = -10**9`` drew every request to itself). The models it
names (a join's statuses and configs, a heartbeat's, a status frame's) are held to
:func:`~helexa.protocol.model.model_id_problem` and at most
:data:`~helexa.protocol.model.MAX_NEURON_MODELS` a report (:func:`named_models`): only the
16 MiB frame bounded them, and one neuron could push megabytes of names into the fleet
document consoles get every second, ``/metrics`` labels and the cortex's memory.
"""

from __future__ import annotations

import math
from collections.abc import Container, Sequence
from dataclasses import replace
from typing import Protocol, TypeVar

from helexa.protocol import (
    EmbedRequest,
    EmbedResult,
    GenerateRequest,
    GenerateResult,
    GpuUsage,
    NeuronDescriptor,
    NeuronMetrics,
    ProtocolError,
    TokenChunk,
)
from helexa.protocol.model import (
    MAX_NAME,
    MAX_NEURON_MODELS,
    MAX_REPORT_TEXT,
    ModelStatus,
    backend_kind_problem,
    bounded_text,
    model_id_problem,
)

from .federation.peer_usage import (
    UNBOUNDED_MAX_TOKENS,
    InvalidAnswer,
    bounded_embed,
    bounded_result,
    chunk_tokens,
    cut_usage,
    result_tokens,
)

__all__ = [
    "UNBOUNDED_MAX_TOKENS",
    "counted_chunk",
    "cut_result",
    "named_models",
    "sane_descriptor",
    "sane_embed",
    "sane_metrics",
    "sane_result",
    "sane_status",
]


def counted_chunk(chunk: TokenChunk) -> TokenChunk:
    """``chunk`` with the tokens it may count for (:func:`.peer_usage.chunk_tokens`): the
    same object when its own count holds, as a one-token chunk always does.

    Raises ``ProtocolError`` for a negative count."""
    n = chunk.tokens
    if n == 1 or n == 0:
        return chunk
    try:
        counted = chunk_tokens(chunk)
    except InvalidAnswer as exc:
        raise ProtocolError(f"chunk for {chunk.request_id}: {exc}", code="invalid_answer") from None
    return chunk if counted == n else replace(chunk, tokens=counted)


def sane_result(result: GenerateResult, request: GenerateRequest, seen: int) -> GenerateResult:
    """``result``'s usage held to ``request``'s bounds after ``seen`` chunk tokens (the
    same object when it holds). Raises ``ProtocolError`` for a negative count."""
    try:
        return bounded_result(result, request, seen + result_tokens(result))
    except InvalidAnswer as exc:
        raise ProtocolError(f"result for {result.request_id}: {exc}", code="invalid_answer") from None


def sane_embed(result: EmbedResult, request: EmbedRequest) -> EmbedResult:
    """An embedding's usage held to its inputs' size. Raises ``ProtocolError`` for a
    negative count."""
    try:
        return bounded_embed(result, request)
    except InvalidAnswer as exc:
        raise ProtocolError(f"result for {result.request_id}: {exc}", code="invalid_answer") from None


def cut_result(request: GenerateRequest, seen: int) -> GenerateResult:
    """The end of an answer the cortex cut at ``max_tokens`` (the neuron streamed past it):
    ``"length"``, billed for what was counted."""
    return GenerateResult(request.request_id, "length", cut_usage(request, seen))


def _count(n: int) -> int:
    return n if n > 0 else 0


def _share(x: float) -> float:
    return x if x > 0.0 and x != math.inf else 0.0  # NaN, negative and infinity all fail x > 0 and x != inf


def sane_metrics(m: NeuronMetrics) -> NeuronMetrics:
    """A heartbeat's figures with every negative or not-finite one read as zero (the same
    object when all hold, as an honest neuron's do)."""
    if (
        m.in_flight >= 0 and m.queued >= 0 and m.ram_used >= 0 and m.ram_total >= 0
        and 0.0 <= m.cpu_percent < math.inf
        and all(g.vram_used >= 0 and g.vram_free >= 0 and 0.0 <= g.utilization < math.inf for g in m.gpus)
    ):
        return m
    gpus = tuple(GpuUsage(g.index, _count(g.vram_used), _count(g.vram_free), _share(g.utilization)) for g in m.gpus)
    return NeuronMetrics(_share(m.cpu_percent), _count(m.ram_used), _count(m.ram_total), gpus,
                         _count(m.in_flight), _count(m.queued))


def sane_descriptor(d: NeuronDescriptor) -> NeuronDescriptor:
    """A joining neuron's hardware with every negative figure read as zero (no memory, no
    cores: nothing is placed there on their strength), and its free text (host name,
    build, operator, CPU and GPU names, labels, endpoints) held to :func:`_named_text`."""
    d = _named_text(d)
    hw = d.hardware
    if hw.cpu_cores >= 0 and hw.ram_total >= 0 and all(g.vram_total >= 0 and g.vram_free >= 0 for g in hw.gpus):
        return d
    gpus = tuple(replace(g, vram_total=_count(g.vram_total), vram_free=_count(g.vram_free)) for g in hw.gpus)
    return replace(d, hardware=replace(hw, cpu_cores=_count(hw.cpu_cores), ram_total=_count(hw.ram_total),
                                       gpus=gpus))


_MAX_ITEMS = 64
"""The most GPUs, labels, endpoints or prices a joining neuron's descriptor keeps."""


def _fits(*texts: str) -> bool:
    return all(len(t) <= MAX_NAME and t.isprintable() for t in texts)


def _named_text(d: NeuronDescriptor) -> NeuronDescriptor:
    """``d`` with each text at most :data:`~helexa.protocol.model.MAX_NAME` printable
    characters (:func:`~helexa.protocol.model.bounded_text`: cut with a mark, an
    unprintable character as its escape) and at most :data:`_MAX_ITEMS` GPUs, labels,
    endpoints and prices (the first ones): shown by the console and ``helexa status``,
    they were bounded by the join's frame alone. The same object when all hold."""
    hw = d.hardware
    if (_fits(d.hostname, d.software, d.operator, hw.cpu_model, hw.platform, *d.endpoints, *d.labels,
              *d.labels.values(), *d.pricing)
            and all(_fits(g.name, g.compute_capability, g.uuid) for g in hw.gpus)
            and max(len(hw.gpus), len(d.labels), len(d.endpoints), len(d.pricing)) <= _MAX_ITEMS):
        return d

    def t(text: str) -> str:
        return bounded_text(text, MAX_NAME)

    gpus = tuple(replace(g, name=t(g.name), compute_capability=t(g.compute_capability), uuid=t(g.uuid))
                 for g in hw.gpus[:_MAX_ITEMS])
    return replace(d, hostname=t(d.hostname), software=t(d.software), operator=t(d.operator),
                   hardware=replace(hw, cpu_model=t(hw.cpu_model), platform=t(hw.platform), gpus=gpus),
                   labels={t(k): t(v) for k, v in list(d.labels.items())[:_MAX_ITEMS]},
                   endpoints=tuple(t(e) for e in d.endpoints[:_MAX_ITEMS]),
                   pricing={t(k): v for k, v in list(d.pricing.items())[:_MAX_ITEMS]})


def sane_status(status: ModelStatus) -> tuple[ModelStatus, str | None]:
    """``status`` as the cortex keeps it (the same object when it holds, as an honest
    neuron's does), and what was wrong with it: its ``error`` text bounded
    (:func:`~helexa.protocol.model.bounded_text`: at most 1,024 printable characters, cut
    with a mark), a ``backend_kind`` that is no backend's name dropped (empty: not said).
    They are shown on the console, by ``helexa status`` and in logs; only the frame's 16 MiB
    bounded them. Bounded rather than refused: a neuron of any release keeps working."""
    error, kind = status.error, status.backend_kind
    bad_kind = backend_kind_problem(kind)
    if (error is None or len(error) <= MAX_REPORT_TEXT and error.isprintable()) and bad_kind is None:
        return status, None
    problem = f"{bad_kind}: dropped" if bad_kind else (
        f"model {status.model_id!r}: its error text is over {MAX_REPORT_TEXT} characters or unprintable: cut")
    return replace(status, error=None if error is None else bounded_text(error),
                   backend_kind="" if bad_kind is not None else kind), problem


class _Named(Protocol):
    @property
    def model_id(self) -> str: ...


N = TypeVar("N", bound=_Named)


def named_models(items: Sequence[N], known: Container[str] = ()) -> tuple[Sequence[N], list[str]]:
    """The entries of a neuron's report (model statuses or configs) that may stand, and why
    the others were dropped (empty when none was: then ``items`` itself comes back).

    At most :data:`MAX_NEURON_MODELS` (the first ones), each named by an id
    :func:`model_id_problem` takes. Ids in ``known`` (taken from this neuron before) are not
    checked again: a heartbeat names the same models each second. Dropping rather than
    refusing the frame keeps a neuron working whatever release it runs (nothing new is sent
    to it); the caller logs the reasons for the operator."""
    problems: list[str] = []
    if len(items) > MAX_NEURON_MODELS:
        problems.append(f"it named {len(items)} models, at most {MAX_NEURON_MODELS} are taken: the rest are dropped")
        items = items[:MAX_NEURON_MODELS]
    bad = None
    for i, m in enumerate(items):
        if m.model_id in known:
            continue
        if (problem := model_id_problem(m.model_id)) is not None:
            if bad is None:
                bad = set()
                problems.append(f"{problem}: dropped")
            bad.add(i)
    if bad:
        items = [m for i, m in enumerate(items) if i not in bad]
        if len(bad) > 1:
            problems.append(f"{len(bad) - 1} more model id(s) too long or unprintable: dropped")
    return items, problems
