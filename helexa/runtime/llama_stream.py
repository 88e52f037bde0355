"""One llama.cpp request's streamed chunks read into the fabric's events, sans-IO.

xllamacpp's streaming callback receives each chunk as an OpenAI-shaped dict. A
:class:`LlamaStream` is fed those dicts (:meth:`~LlamaStream.feed`) and returns the
:class:`~helexa.protocol.TokenChunk`\\ s they make; once the stream is over,
:meth:`~LlamaStream.result` gives its :class:`~helexa.protocol.GenerateResult`. It keeps
what the end needs: the finish reason and stop sequence, the usage, the whole answer (for
the slot table), and a generic tool answer (:mod:`.tool_grammar`), which is JSON until it
is whole and so is held back rather than streamed. The prompt's token count from
llama.cpp's prompt progress (:meth:`~LlamaStream.progress`) goes out on the first chunk
(``TokenChunk.prompt_tokens``): a stream cut before its result is billed its real prompt.

It touches no trio and holds no lock: it is fed on one thread at a time (llama.cpp's
callback thread when the chunks go out through a :mod:`.token_tap`, the trio thread
otherwise) and read once the stream is over.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from typing import Any

from helexa.protocol import GenerateRequest, GenerateResult, TokenChunk, Usage

from . import openai_shapes, tool_grammar


class LlamaStream:
    """The events of one llama.cpp request (see the module docstring).

    Args:
        request: the request (its id, stop sequences and ``top_logprobs``).
        generic: tools go through :mod:`.tool_grammar`: the answer is held until the end.
    """

    __slots__ = ("_rid", "_stops", "_top", "_generic", "_answer", "_finish", "_stop_sequence", "_usage",
                 "_emitted", "_prompt")

    def __init__(self, request: GenerateRequest, *, generic: bool = False) -> None:
        self._rid = request.request_id
        self._stops = request.sampling.stop
        self._top = request.sampling.top_logprobs
        self._generic = generic
        self._answer: list[str] = []
        self._finish = "stop"
        self._stop_sequence: str | None = None
        self._usage: Usage | None = None
        self._emitted = 0
        self._prompt: int | None = None
        """The prompt's token count until the first chunk carries it (then None)."""

    def progress(self, chunk: dict[str, Any]) -> None:
        """Keep the prompt's token count from a ``prompt_progress`` report (its ``total``,
        cached tokens included, as llama.cpp's usage counts them), for the first chunk."""
        report = chunk.get("prompt_progress")
        total = report.get("total") if type(report) is dict else None
        if type(total) is int and total >= 0 and not self._emitted:
            self._prompt = total

    def feed(self, chunks: Iterable[dict[str, Any]]) -> list[TokenChunk]:
        """The chunks' events, in order: their text joined into one chunk, except around a
        chunk carrying tool calls, which stays its own. Progress reports are skipped.

        Raises the mapped :class:`~helexa.runtime.BackendError` for an error envelope."""
        out: list[TokenChunk] = []
        text, tokens, logprobs = "", 0, []
        for payload in chunks:
            if "prompt_progress" in payload:
                self.progress(payload)
                continue
            view = openai_shapes.parse_chunk(payload, self._stops)
            if view.usage is not None:
                self._usage = view.usage
            if view.finish_reason:
                self._finish, self._stop_sequence = view.finish_reason, view.stop_sequence
            self._answer.append(view.text or "")
            if self._generic:
                continue
            if view.tool_calls:
                if text:
                    out.append(TokenChunk(self._rid, text, tokens, logprobs=tuple(logprobs) or None))
                    self._emitted += tokens
                    text, tokens, logprobs = "", 0, []
                out.append(TokenChunk(self._rid, "", 1, tool_calls=tuple(view.tool_calls)))
            elif view.text:
                text += view.text
                tokens += 1
            if view.logprobs:
                logprobs.extend(_trimmed(view.logprobs, self._top))
        if text:
            self._emitted += tokens
            out.append(TokenChunk(self._rid, text, tokens, logprobs=tuple(logprobs) or None))
        if self._prompt is not None and out:  # the first chunk only: the prompt's count goes with it
            out[0] = replace(out[0], prompt_tokens=self._prompt)
            self._prompt = None
        return out

    @property
    def answer(self) -> str:
        """The text generated so far (a generic tool answer's JSON included)."""
        return "".join(self._answer)

    def result(self) -> GenerateResult:
        """The request's closing event (usage counted from the text when llama.cpp sent none)."""
        usage = self._usage or Usage(completion_tokens=self._emitted)
        if self._generic:
            parsed = tool_grammar.parse(self.answer)
            if parsed.tool_calls:  # whole, whatever stop sequence its arguments hold
                return GenerateResult(self._rid, "tool_calls", usage, tool_calls=parsed.tool_calls)
            # The stop sequences were not llama.cpp's to apply (they would have cut the JSON):
            # a text answer ends before the first of them, as a plain answer would.
            text, stop = tool_grammar.stopped(parsed.content, self._stops)
            finish = "stop" if stop is not None else self._finish
            return GenerateResult(self._rid, finish, usage, text=text, stop_sequence=stop)
        return GenerateResult(self._rid, self._finish, usage, stop_sequence=self._stop_sequence)


def _trimmed(logprobs: list[Any], top: int) -> list[Any]:
    """llama.cpp reports at least one alternative (``n_probs`` >= 1); OpenAI's
    ``top_logprobs`` may be 0."""
    return [replace(lp, top=lp.top[:top]) for lp in logprobs] if any(len(lp.top) > top for lp in logprobs) else logprobs
