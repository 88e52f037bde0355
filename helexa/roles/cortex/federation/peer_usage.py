"""What a peer's answer may claim (pure).

A federated answer's usage is what the asking cortex shows its client and bills the
client's key for, so it is held to what the asker can account for itself: a peer that
reports negative counts sent an invalid answer; one that reports far more tokens than
it sent, or than the request could make, is counted at the asker's own bound.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace

from helexa.protocol import EmbedRequest, EmbedResult, GenerateRequest, GenerateResult, TokenChunk, Usage

from ..prompt_size import prompt_bytes, prompt_upper_bound

COMPLETION_SLACK = 16
"""Tokens a peer may bill beyond twice what it sent (a token may decode to nothing)."""
PROMPT_SLACK = 64
"""Tokens a prompt may make beyond twice its size bound (a template's own text)."""
EMBED_INPUT_ALLOWANCE = 16
"""Tokens an embedding model may add per input (CLS, SEP)."""
UNBOUNDED_MAX_TOKENS = 131_072
"""The most tokens a peer's answer may hold when the request set no ``max_tokens`` (an
open portal's): no answer outgrows its model's context, and 128 Ki is the largest of the
common open models'. Without it a peer streaming forever held a request (and, not
streamed, its growing text) open for as long as it kept sending."""


class InvalidAnswer(ValueError):
    """A peer's frame claims what no answer can (a negative count)."""


def plausible_completion(billed: int, seen: int) -> bool:
    """Whether ``billed`` completion tokens are plausible for an answer that carried
    ``seen`` (the receipts' check, and the one a peer's usage passes or is replaced)."""
    return billed <= max(seen, 0) * 2 + COMPLETION_SLACK


def _carried(text: str, tool_calls: tuple | None) -> int:
    size = len(text.encode("utf-8", "replace"))
    if tool_calls:
        size += len(json.dumps(tool_calls, default=str).encode())
    return size


def chunk_tokens(chunk: TokenChunk) -> int:
    """The tokens a peer's chunk counts for: its own count, at most one a byte of what it
    carries (or one a logprob), at least one (a token may decode to nothing)."""
    if chunk.tokens < 0:
        raise InvalidAnswer("a chunk with a negative token count")
    return min(chunk.tokens, max(1, _carried(chunk.text, chunk.tool_calls), len(chunk.logprobs or ())))


def result_tokens(result: GenerateResult) -> int:
    """The tokens a result's own text (the part not sent as chunks: all of an answer not
    streamed) can hold at most: one a byte, or one a logprob."""
    return max(_carried(result.text, result.tool_calls), len(result.logprobs or ()))


def _check(usage: Usage) -> None:
    if usage.prompt_tokens < 0 or usage.completion_tokens < 0 or usage.cached_tokens < 0:
        raise InvalidAnswer("a usage with a negative token count")


def _has_media(request: GenerateRequest) -> bool:
    """Whether a message carries anything but text (an image by URL costs the model far
    more tokens than its bytes here: no size bound holds)."""
    for m in request.messages:
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list) and any(not (isinstance(p, dict) and p.get("type") == "text") for p in content):
            return True
    return False


def bounded_usage(usage: Usage, request: GenerateRequest, seen: int) -> Usage:
    """``usage`` as a peer reported it for ``request`` after sending ``seen`` tokens (see
    :func:`chunk_tokens`, :func:`result_tokens`), held to the asker's bounds: completion
    tokens at most ``max_tokens`` and plausible for ``seen`` (else ``seen``), prompt tokens
    at most twice the prompt's size bound (else that bound; no bound for a prompt with
    images or other media).

    A request that offers tools with a ``max_tokens`` is held to ``max_tokens`` alone: on a
    model without tool syntax the answer is JSON that a grammar forces and that is shown
    only once it is a whole call (:mod:`helexa.runtime.tool_grammar`), so a call cut short
    sends nothing while every one of its tokens was generated (they were billed as 0)."""
    _check(usage)
    completion = usage.completion_tokens
    max_tokens = request.sampling.max_tokens
    hidden = request.wants_tools and max_tokens is not None
    if not hidden and not plausible_completion(completion, seen):
        completion = seen
    if max_tokens is not None:
        completion = min(completion, max_tokens)
    prompt = bounded_prompt(usage.prompt_tokens, request)
    cached = min(usage.cached_tokens, prompt)
    if (prompt, completion, cached) == (usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens):
        return usage
    return Usage(prompt, completion, cached)


def bounded_prompt(prompt: int, request: GenerateRequest) -> int:
    """A peer's count of ``request``'s prompt (its usage's, or its first chunk's) held to
    the asker's bound: at most twice the prompt's size bound plus :data:`PROMPT_SLACK`,
    else that bound (no bound for a prompt with images or other media). Raises
    :class:`InvalidAnswer` for a negative count."""
    if prompt < 0:
        raise InvalidAnswer("a negative prompt token count")
    if prompt <= PROMPT_SLACK:  # no prompt makes fewer than that bound (nothing to measure)
        return prompt
    bound = prompt_upper_bound(request)
    return bound if prompt > bound * 2 + PROMPT_SLACK and not _has_media(request) else prompt


def bounded_result(result: GenerateResult, request: GenerateRequest, seen: int) -> GenerateResult:
    """``result`` with :func:`bounded_usage` (the same object when nothing changes)."""
    usage = bounded_usage(result.usage, request, seen)
    return result if usage is result.usage else replace(result, usage=usage)


def bounded_embed(result: EmbedResult, request: EmbedRequest) -> EmbedResult:
    """An embedding result's usage held to its inputs' size, as :func:`bounded_usage`."""
    _check(result.usage)
    bound = sum(len(t.encode("utf-8", "replace")) + EMBED_INPUT_ALLOWANCE for t in request.inputs)
    u = result.usage
    if u.prompt_tokens <= bound * 2 + PROMPT_SLACK and u.completion_tokens == 0 and u.cached_tokens <= u.prompt_tokens:
        return result
    prompt = u.prompt_tokens if u.prompt_tokens <= bound * 2 + PROMPT_SLACK else bound
    return replace(result, usage=Usage(prompt, 0, min(u.cached_tokens, prompt)))


def cut_usage(request: GenerateRequest, completion: int, prompt: int | None = None) -> Usage:
    """The usage of an answer the asker cut short: the ``completion`` tokens it counted,
    and the prompt as the portals bill a cut stream's: ``prompt``, the exact count the
    answer's first chunk carried (held to :func:`bounded_prompt`), else
    :func:`estimated_prompt`."""
    return Usage(estimated_prompt(request) if prompt is None else prompt, completion)


def estimated_prompt(request: GenerateRequest) -> int:
    """``request``'s prompt estimated as a cut stream's is where no exact count is known:
    a quarter of its bytes."""
    return math.ceil(prompt_bytes(request)[0] / 4)
