"""OpenAI's answer bodies, non-streamed, kept at the HTTP edge of the cortex: a chat
completion's or a completion's with its ``n`` choices (:class:`Choices`, gathered from the
fabric's indexed events), usage, log-probabilities, tool calls joined from their deltas,
and the embeddings body. Streamed chunks are framed in :mod:`.sse`; requests are read in
:mod:`.openai_api`.
"""

from __future__ import annotations

import base64
import struct
import time
from dataclasses import dataclass, field
from typing import Any

from helexa.protocol import EmbedResult, GenerateRequest, GenerateResult, Task, TokenChunk, TokenLogprob, Usage


def usage_body(usage: Usage) -> dict[str, Any]:
    """OpenAI's usage for the billed usage: ``prompt_tokens_details.cached_tokens`` is the
    part of the prompt the engine reused from its cache (what the ledger's ``cached_tokens``
    records), as OpenAI reports it."""
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens, "prompt_tokens_details": {"cached_tokens": usage.cached_tokens}}


def merge_tool_calls(parts: list[Any]) -> list[dict[str, Any]]:
    """The tool calls of a non-streamed answer, from what the neuron relayed.

    Streamed backends relay OpenAI tool-call *deltas*: pieces sharing an ``index``, the
    first with ``id``, ``type`` and the function's ``name``, the rest carrying more of its
    ``arguments``. They are joined into one call per index. A part without ``index`` is a
    whole call already (a backend that answered in one piece) and is kept as it is.
    """
    calls: list[dict[str, Any]] = []
    by_index: dict[Any, dict[str, Any]] = {}
    for part in parts:
        if not isinstance(part, dict):
            continue
        index = part.get("index")
        if index is None:
            calls.append(dict(part))
            continue
        fn = part.get("function") or {}
        call = by_index.get(index)
        if call is None:
            call = by_index[index] = {"id": part.get("id"), "type": part.get("type") or "function",
                                      "function": {"name": fn.get("name") or "", "arguments": ""}}
            calls.append(call)
        else:
            if part.get("id"):
                call["id"] = part["id"]
            if fn.get("name"):
                call["function"]["name"] = fn["name"]
        call["function"]["arguments"] += fn.get("arguments") or ""
    return calls


def logprobs_body(task: Task, logprobs: list[TokenLogprob] | tuple[TokenLogprob, ...], *,
                  text_offset: int = 0) -> dict[str, Any]:
    """A choice's ``logprobs`` in OpenAI's shape: ``{"content": [...]}`` for chat, the
    legacy ``tokens`` / ``token_logprobs`` / ``top_logprobs`` / ``text_offset`` lists for
    completions (offsets counted from ``text_offset``)."""
    if task is Task.CHAT:
        return {"content": [_token_body(lp) for lp in logprobs], "refusal": None}
    offsets, at = [], text_offset
    for lp in logprobs:
        offsets.append(at)
        at += len(lp.token)
    return {"tokens": [lp.token for lp in logprobs], "token_logprobs": [lp.logprob for lp in logprobs],
            "top_logprobs": [{t.token: t.logprob for t in lp.top} for lp in logprobs], "text_offset": offsets}


def _token_body(lp: TokenLogprob) -> dict[str, Any]:
    return {"token": lp.token, "logprob": lp.logprob,
            "bytes": list(lp.token_bytes) if lp.token_bytes is not None else list(lp.token.encode()),
            "top_logprobs": [{"token": t.token, "logprob": t.logprob,
                              "bytes": list(t.token_bytes) if t.token_bytes is not None else list(t.token.encode())}
                             for t in lp.top]}


@dataclass
class _Choice:
    parts: list[str] = field(default_factory=list)
    tool_calls: list[Any] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    result: GenerateResult | None = None


class Choices:
    """The ``n`` choices of a non-streamed answer, gathered from indexed fabric events."""

    def __init__(self, n: int = 1) -> None:
        self._choices = [_Choice() for _ in range(n)]

    def add(self, index: int, event: TokenChunk | GenerateResult) -> None:
        c = self._choices[index]
        c.parts.append(event.text)
        c.tool_calls.extend(event.tool_calls or ())
        c.logprobs.extend(event.logprobs or ())
        if isinstance(event, GenerateResult):
            c.result = event

    @property
    def usage(self) -> Usage:
        """Usage summed over the choices: the prompt's tokens once (only choice 0's result
        carries them, :mod:`.choices`), every choice's completion tokens."""
        results = [c.result for c in self._choices if c.result is not None]
        if len(results) == 1:  # one choice (nearly every request): its usage as it is, not summed anew
            return results[0].usage
        return Usage(sum(r.usage.prompt_tokens for r in results), sum(r.usage.completion_tokens for r in results),
                     sum(r.usage.cached_tokens for r in results))

    def __iter__(self):
        return iter(self._choices)


def completion_body(request: GenerateRequest, response_id: str, choices: Choices, *,
                    logprobs: bool = False) -> dict[str, Any]:
    """The non-streaming body of a chat completion or a completion with every choice."""
    out = []
    for index, c in enumerate(choices):
        assert c.result is not None, "every choice ends with a result"
        text = "".join(c.parts)
        lps = logprobs_body(request.task, c.logprobs) if logprobs else None
        if request.task is Task.CHAT:
            calls = merge_tool_calls(c.tool_calls) if c.tool_calls else None
            message: dict[str, Any] = {"role": "assistant", "content": text if text or not calls else None}
            if calls:
                message["tool_calls"] = calls
            out.append({"index": index, "message": message, "finish_reason": c.result.finish_reason,
                        "logprobs": lps})
        else:
            out.append({"index": index, "text": text, "finish_reason": c.result.finish_reason, "logprobs": lps})
    obj = "chat.completion" if request.task is Task.CHAT else "text_completion"
    return {"id": response_id, "object": obj, "created": int(time.time()), "model": request.model_id,
            "choices": out, "usage": usage_body(choices.usage)}


def completion_response(
    request: GenerateRequest, response_id: str, text: str, result: GenerateResult,
    tool_calls: list[Any] | None = None,
) -> dict[str, Any]:
    """The non-streaming body of a single-choice answer (see :func:`completion_body`)."""
    choices = Choices(1)
    choices.add(0, GenerateResult(result.request_id, result.finish_reason, result.usage, text,
                                  tuple(tool_calls) if tool_calls else None))
    return completion_body(request, response_id, choices)


def embedding_response(model: str, result: EmbedResult, encoding_format: str) -> dict[str, Any]:
    """The ``/v1/embeddings`` body; vectors as float lists or base64 of float32 LE."""
    n = len(result.vectors) // 4
    count = n // result.dim if result.dim else 0
    data = []
    step = result.dim * 4
    for i in range(count):
        raw = result.vectors[i * step:(i + 1) * step]
        if encoding_format == "base64":
            value: Any = base64.b64encode(raw).decode("ascii")
        else:
            value = list(struct.unpack(f"<{result.dim}f", raw))
        data.append({"object": "embedding", "index": i, "embedding": value})
    return {"object": "list", "data": data, "model": model,
            "usage": {"prompt_tokens": result.usage.prompt_tokens, "total_tokens": result.usage.prompt_tokens}}
