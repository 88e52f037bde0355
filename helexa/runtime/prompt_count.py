"""Counting a prompt's tokens on the neuron from the GGUF's own tokenizer.

A ``llama_cpp`` model refuses a prompt that cannot fit one slot before the request waits
for one, so every request whose count the cortex did not send (a model the cortex cannot
read: an ``hf://`` or URL source, which only its neurons fetch) needs a count here. Asking
llama.cpp (its ``/apply-template`` and ``/tokenize`` on loopback, from a worker thread)
put 5–12 ms in front of every such request's first token. :class:`PromptCounter` reads the
file's tokenizer once, in a thread, after the model has loaded, and from then on counts
in-process (a fraction of a millisecond) whenever :mod:`helexa.tokenizer` counts exactly:
the same vocabularies and templates for which the cortex trusts its own count. Anything it
cannot count exactly (tools, other vocabularies, the first requests while the tokenizer is
still being read) is left to llama.cpp as before. :func:`context_message` is how a prompt that
does not fit is refused, in OpenAI's words.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import trio

from helexa.protocol import GenerateRequest, Task
from helexa.tokenizer import INLINE_CHARS, GgufTokenizer, TokenCount

log = logging.getLogger(__name__)


class PromptCounter:
    """Exact prompt counts from a GGUF's tokenizer, once :meth:`start` has read it."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._tokenizer: GgufTokenizer | None = None
        self._started = False

    @property
    def ready(self) -> bool:
        """Whether the tokenizer has been read and counts exactly for this vocabulary."""
        return self._tokenizer is not None

    def start(self) -> None:
        """Read the tokenizer in a thread (once); counts are exact from when it is done."""
        if self._started:
            return
        self._started = True

        def read() -> GgufTokenizer:
            return GgufTokenizer.from_file(self._path)

        def deliver(outcome: Any) -> None:  # runs in that thread: one attribute set
            try:
                tokenizer = outcome.unwrap()
            except Exception as exc:  # unreadable metadata: llama.cpp keeps counting
                log.warning("no in-process prompt counts for %s (%s): llama.cpp counts", self._path, exc)
                return
            if tokenizer.exact:
                self._tokenizer = tokenizer
            else:
                log.info("%s: vocabulary not mirrored, llama.cpp counts prompts", self._path)

        trio.lowlevel.start_thread_soon(read, deliver)

    async def count(self, request: GenerateRequest) -> int | None:
        """``request``'s exact prompt tokens, or ``None`` when only llama.cpp can say
        (tokenizer not read yet or not exact here, tools offered). Long prompts are
        counted off the trio thread."""
        tokenizer = self._tokenizer
        if tokenizer is None:
            return None
        if request.task is Task.CHAT:
            messages = list(request.messages)
            size = sum(len(str(m.get("content") or "")) for m in messages)

            def counted() -> TokenCount:
                return tokenizer.count_chat(messages, tools=request.wants_tools)
        else:
            text = request.prompt or ""
            size = len(text)

            def counted() -> TokenCount:
                return tokenizer.count_text(text)
        count = counted() if size <= INLINE_CHARS else await trio.to_thread.run_sync(counted)
        return count.tokens if count.exact else None


def context_message(limit: int, prompt: int, max_tokens: int | None) -> str:
    """OpenAI's wording for a request that does not fit the context."""
    if max_tokens:
        return (f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{prompt + max_tokens} tokens ({prompt} in the messages, {max_tokens} in the completion). "
                "Please reduce the length of the messages or completion.")
    return (f"This model's maximum context length is {limit} tokens. However, your messages resulted in "
            f"{prompt} tokens. Please reduce the length of the messages.")
