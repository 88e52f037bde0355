"""``synthetic``: a backend with no model, FOR LOAD TESTS ONLY.

It answers every chat or completion with ``metadata.tokens`` tokens (default 64) of the
fixed text ``"tok0 tok1 ..."``, at ``metadata.tokens_per_second`` (default 0: as fast as
the event loop goes), honouring ``max_tokens`` and stop sequences. With ``logprobs`` each
token says it was certain (log-probability 0: the text is fixed); it has no grammar and no
tools. At full speed a stream
yields to the event loop after every token, as a real backend would between tokens; a
non-streaming request has no reader waiting for single tokens and gets its whole answer as
one result (a yield and an event per token there cost more than the rest of the neuron's
work). It exists so that
benchmarks measure the fabric (gateway, control plane, neuron) and not a model. It is never
a default: a model config must name ``backend_kind="synthetic"`` explicitly, and nothing it
says means anything.

Metadata: ``tokens``, ``tokens_per_second``, ``prompt_tokens`` (the usage it reports for
the prompt, default 8), ``load_seconds`` (a pretend load time, default 0), ``load_steps``
(progress reports spread over it, default 1: the web console's tests watch a load progress),
``cancel_seconds`` (how long a request left before its end takes to end, default 0: an
engine that cannot cancel a step, for the neuron's handling of a wedged engine).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing

import trio

from helexa.protocol import Feature, GenerateRequest, GenerateResult, ModelConfig, TokenChunk, TokenLogprob, TopLogprob, Usage

from . import openai_shapes, start_signal
from .base import Backend, BackendError, ChatInference, GenerationEvent, ProgressFn, TextInference


class SyntheticBackend(Backend, ChatInference, TextInference):
    """Fixed tokens at a fixed rate, for load tests only (see the module docstring)."""

    kind = "synthetic"
    features = frozenset({Feature.LOGPROBS})

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        md = config.metadata
        self._tokens = int(md.get("tokens", 64))
        rate = float(md.get("tokens_per_second", 0))
        self._interval = 1.0 / rate if rate > 0 else 0.0
        self._prompt_tokens = int(md.get("prompt_tokens", 8))
        self._load_seconds = float(md.get("load_seconds", 0))
        self._load_steps = max(1, int(md.get("load_steps", 1)))
        self._cancel_seconds = float(md.get("cancel_seconds", 0))
        self._loaded = False
        # The fixed text's tokens, written once: "tok{i} ", the last one of an answer
        # without its space.
        self._spaced = [f"tok{i} " for i in range(self._tokens)]

    async def load(self, progress: ProgressFn) -> None:
        steps = self._load_steps
        for step in range(steps):
            progress("load", step, steps, "steps")
            await trio.sleep(self._load_seconds / steps)
        self._loaded = True
        progress("load", steps, steps, "steps")

    async def unload(self) -> None:
        self._loaded = False

    def chat(self, request: GenerateRequest) -> AsyncIterator[GenerationEvent]:
        return self._generate(request) if not self._cancel_seconds else self._slow_to_cancel(request)

    def complete(self, request: GenerateRequest) -> AsyncIterator[GenerationEvent]:
        return self.chat(request)

    async def _slow_to_cancel(self, request: GenerateRequest) -> AsyncIterator[GenerationEvent]:
        """:meth:`_generate`, but left before its end it takes ``cancel_seconds`` to end,
        whatever cancels it (as a step an engine cannot cancel)."""
        done = False
        try:
            async with aclosing(self._generate(request)) as events:
                async for event in events:
                    done = isinstance(event, GenerateResult)
                    yield event
        finally:
            if not done:
                with trio.CancelScope(shield=True):
                    await trio.sleep(self._cancel_seconds)

    async def _generate(self, request: GenerateRequest) -> AsyncIterator[GenerationEvent]:
        openai_shapes.validate(request, features=self.features)
        if not self._loaded:
            raise BackendError(f"model {self.config.model_id!r} is not loaded", code="model_not_loaded")
        start_signal.report()  # no queue: every request starts at once
        limit = min(self._tokens, request.sampling.max_tokens or self._tokens)
        stops = request.sampling.stop
        # Without a rate or a stream, nobody waits for single tokens: the whole answer goes
        # out as one result (as a real engine's non-streaming answer does), so a benchmark
        # measures the fabric rather than this loop.
        whole = not request.stream and not self._interval and not request.sampling.logprobs
        if whole and not stops:  # the same answer as the loop below, without a pass per token
            await trio.lowlevel.checkpoint()
            text = "".join(self._spaced[:limit])[:-1] if limit else ""
            reason = "length" if limit < self._tokens else "stop"
            yield GenerateResult(request.request_id, reason, self._usage(limit), text=text)
            return
        text, emitted = "", 0
        for i in range(limit):
            piece = self._spaced[i] if i < limit - 1 else self._spaced[i][:-1]
            candidate = text + piece
            hits = [(h, s) for s in stops if (h := candidate.find(s, max(0, len(text) - len(s) + 1))) >= 0]
            if hits:
                hit, word = min(hits, key=lambda h: h[0])
                if hit > len(text):
                    emitted += 1
                    if not whole:
                        yield self._chunk(request, candidate[len(text) : hit])
                yield GenerateResult(request.request_id, "stop", self._usage(emitted),
                                     text=candidate[:hit] if whole else "", stop_sequence=word)
                return
            if self._interval:
                await trio.sleep(self._interval)
            elif not whole:
                await trio.lowlevel.checkpoint()
            text = candidate
            emitted += 1
            if not whole:
                yield self._chunk(request, piece)
        if whole:
            await trio.lowlevel.checkpoint()
        reason = "length" if limit < self._tokens else "stop"
        yield GenerateResult(request.request_id, reason, self._usage(emitted), text=text if whole else "")

    @staticmethod
    def _chunk(request: GenerateRequest, piece: str) -> TokenChunk:
        if not request.sampling.logprobs:
            return TokenChunk(request.request_id, piece)
        # The text is fixed: every token had probability 1.
        top = (TopLogprob(piece, 0.0, piece.encode()),)[: request.sampling.top_logprobs]
        return TokenChunk(request.request_id, piece, logprobs=(TokenLogprob(piece, 0.0, piece.encode(), top),))

    def _usage(self, completion: int) -> Usage:
        return Usage(prompt_tokens=self._prompt_tokens, completion_tokens=completion)
