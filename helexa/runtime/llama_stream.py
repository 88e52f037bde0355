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
A generic text answer that reaches a stop sequence sets :attr:`~LlamaStream.stopped`: the
backend stops llama.cpp there (the stops are not llama.cpp's, which would cut the JSON),
rather than letting the answer run on, unseen and billed, until its JSON ends.

It touches no trio and holds no lock: it is fed on one thread at a time (llama.cpp's
callback thread when the chunks go out through a :mod:`.token_tap`, the trio thread
otherwise) and read once the stream is over.
"""

from __future__ import annotations

import json
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
        cut_stops: the request's stop sequences are applied here, to the text (llama.cpp
            was not given them: with the template's own tool syntax they cut a call): text
            that may be the start of one is held until it is not, and the first one reached
            ends the answer (:attr:`stopped`); tool calls are never cut.
    """

    __slots__ = ("_rid", "_stops", "_top", "_generic", "_answer", "_finish", "_stop_sequence", "_usage",
                 "_emitted", "_prompt", "_stamp", "_escaped", "_keep", "_tail", "_pieces", "stopped", "_cutting",
                 "_held", "_held_tokens")

    def __init__(self, request: GenerateRequest, *, generic: bool = False, cut_stops: bool = False) -> None:
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
        """The prompt's token count (llama.cpp's prompt progress), once reported."""
        self._stamp = True
        """The first chunk has not gone out yet (it carries :attr:`_prompt`)."""
        # A generic text answer's stop sequences as its JSON string writes them: seeing one
        # is when the answer may have reached it (then read whole to be sure).
        self._escaped = tuple(e for e in (json.dumps(stop, ensure_ascii=False)[1:-1] for stop in self._stops if stop)
                              if e) if generic else ()
        self._keep = max((len(e) for e in self._escaped), default=1) - 1
        self._tail = ""
        self._pieces = 0
        self.stopped = False
        """A generic text answer (or, ``cut_stops``, the text) reached one of its stop
        sequences: the rest would be neither shown nor wanted, so the engine should stop
        (:meth:`result` is its end)."""
        self._cutting = cut_stops and bool(self._stops)
        self._held = ""
        self._held_tokens = 0

    def progress(self, chunk: dict[str, Any]) -> None:
        """Keep the prompt's token count from a ``prompt_progress`` report (its ``total``,
        cached tokens included, as llama.cpp's usage counts them), for the first chunk."""
        report = chunk.get("prompt_progress")
        total = report.get("total") if type(report) is dict else None
        if type(total) is int and total >= 0 and self._stamp:
            self._prompt = total

    def feed(self, chunks: Iterable[dict[str, Any]]) -> list[TokenChunk]:
        """The chunks' events, in order: their text joined into one chunk, except around a
        chunk carrying tool calls, which stays its own. Progress reports are skipped.

        Raises the mapped :class:`~helexa.runtime.BackendError` for an error envelope."""
        if self._cutting:
            return self._feed_cutting(chunks)
        out: list[TokenChunk] = []
        text, tokens, logprobs = "", 0, []
        for payload in chunks:
            view = self._read(payload)
            if view is None:
                continue
            if view.finish_reason:
                self._finish, self._stop_sequence = view.finish_reason, view.stop_sequence
            if self._generic:
                if view.text:
                    self._pieces += 1
                    if self._escaped and self._reached_stop(view.text):
                        self.stopped = True
                        break  # what follows is past the answer's end
                continue
            if view.tool_calls:
                if text:
                    self._emit(out, text, tokens, logprobs)
                    text, tokens, logprobs = "", 0, []
                out.append(TokenChunk(self._rid, "", 1, tool_calls=tuple(view.tool_calls)))
            elif view.text:
                text += view.text
                tokens += 1
            if view.logprobs:
                logprobs.extend(_trimmed(view.logprobs, self._top))
        self._emit(out, text, tokens, logprobs)
        return self._first_stamped(out)

    def _feed_cutting(self, chunks: Iterable[dict[str, Any]]) -> list[TokenChunk]:
        """:meth:`feed` with the stop sequences applied here (``cut_stops``): the text up to
        the first one reached, a possible start of one held back; tool calls whole. (With
        tools, llama.cpp streams no logprobs.)"""
        out: list[TokenChunk] = []
        text, tokens = "", 0
        for payload in chunks:
            view = self._read(payload)
            if view is None:
                continue
            if view.finish_reason:
                self._finish = view.finish_reason
            if view.text:
                self._pieces += 1
                tokens += 1
                seen, stop = tool_grammar.stopped(self._held + view.text, self._stops)
                if stop is not None:
                    text += seen
                    self._held, self._finish, self._stop_sequence, self.stopped = "", "stop", stop, True
                    break  # what follows is past the answer's end
                keep = _stop_start(seen, self._stops)
                text, self._held = text + seen[:len(seen) - keep], seen[len(seen) - keep:]
            if view.tool_calls:
                text, self._held = text + self._held, ""  # no stop sequence runs across a call
                if text:
                    self._emit(out, text, tokens + self._held_tokens)
                    text, tokens, self._held_tokens = "", 0, 0
                out.append(TokenChunk(self._rid, "", 1, tool_calls=tuple(view.tool_calls)))
        if text:
            self._emit(out, text, tokens + self._held_tokens)
            self._held_tokens = 0
        else:
            self._held_tokens += tokens
        return self._first_stamped(out)

    def _read(self, payload: dict[str, Any]) -> openai_shapes.ChunkView | None:
        """One chunk read, its usage kept and its text added to the answer; ``None`` for a
        prompt progress report (kept by :meth:`progress`)."""
        if "prompt_progress" in payload:
            self.progress(payload)
            return None
        view = openai_shapes.parse_chunk(payload, self._stops)
        if view.usage is not None:
            self._usage = view.usage
        self._answer.append(view.text or "")
        return view

    def _emit(self, out: list[TokenChunk], text: str, tokens: int, logprobs: list[Any] | None = None) -> None:
        """Add a text chunk of ``tokens`` tokens to ``out`` (nothing when ``text`` is empty)."""
        if text:
            out.append(TokenChunk(self._rid, text, tokens, logprobs=tuple(logprobs or ()) or None))
            self._emitted += tokens

    def _first_stamped(self, out: list[TokenChunk]) -> list[TokenChunk]:
        """``out``, its first chunk carrying the prompt's token count if it is the stream's first."""
        if out and self._stamp:
            self._stamp = False
            if self._prompt is not None:
                out[0] = replace(out[0], prompt_tokens=self._prompt)
        return out

    def _reached_stop(self, piece: str) -> bool:
        """Whether a generic text answer (``{"response": "...``) reached a stop sequence
        with ``piece``: only when the piece completes a stop's JSON-escaped text is the
        answer so far read (a stop the model writes with other escapes, ``\\u00e9`` for
        ``é``, is found only at the end, by :meth:`result`, as before)."""
        tail = self._tail + piece
        self._tail = tail[-self._keep:] if self._keep else ""
        if not any(e in tail for e in self._escaped):
            return False
        content = tool_grammar.parse(self.answer).content  # a cut {"response": "... reads as its text so far
        return tool_grammar.stopped(content, self._stops)[1] is not None

    @property
    def answer(self) -> str:
        """The text generated so far (a generic tool answer's JSON included)."""
        return "".join(self._answer)

    def result(self) -> GenerateResult:
        """The request's closing event (usage counted from the text when llama.cpp sent none)."""
        usage = self._usage or Usage(self._prompt or 0, self._pieces if self._generic or self._cutting
                                     else self._emitted)
        if self._generic:
            parsed = tool_grammar.parse(self.answer)
            if parsed.tool_calls:  # whole, whatever stop sequence its arguments hold
                return GenerateResult(self._rid, "tool_calls", usage, tool_calls=parsed.tool_calls)
            # The stop sequences were not llama.cpp's to apply (they would have cut the JSON):
            # a text answer ends before the first of them, as a plain answer would (and where
            # it reached one, the engine was stopped there: what it billed ends there too).
            text, stop = tool_grammar.stopped(parsed.content, self._stops)
            finish = "stop" if stop is not None else self._finish
            return GenerateResult(self._rid, finish, usage, text=text, stop_sequence=stop)
        # (text held as a possible start of a stop sequence that the answer ended before: its own)
        return GenerateResult(self._rid, self._finish, usage, text=self._held, stop_sequence=self._stop_sequence)


def _stop_start(text: str, stops: tuple[str, ...]) -> int:
    """How many characters at the end of ``text`` may be the start of one of ``stops``."""
    longest = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:k]):
                longest = k
                break
    return longest


def _trimmed(logprobs: list[Any], top: int) -> list[Any]:
    """llama.cpp reports at least one alternative (``n_probs`` >= 1); OpenAI's
    ``top_logprobs`` may be 0."""
    return [replace(lp, top=lp.top[:top]) for lp in logprobs] if any(len(lp.top) > top for lp in logprobs) else logprobs
