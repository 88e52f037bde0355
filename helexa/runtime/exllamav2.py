"""``exllamav2``: EXL2 models on CUDA GPUs through ExLlamaV2's dynamic generator.

``exllamav2`` and ``torch`` are imported only inside :meth:`ExLlamaV2Backend.load` (the
optional extra ``helexa[exllamav2]``), so this module imports anywhere; without them, or
without a CUDA device, ``load`` raises :class:`LoadFailed` with ``missing_extra`` or
``no_gpu``.

One worker thread per loaded model owns the generator: it takes new jobs and cancels from
a queue, calls ``generator.iterate()`` while jobs remain (continuous batching, paged
attention where flash-attn is installed), and posts each job's results to that job's trio
channel without blocking. Leaving a stream queues a cancel of its job
(``generator.cancel``, which frees its cache pages); the worker applies it before its next
forward pass.

Metadata:
    path: the EXL2 model directory (required).
    max_seq_len: cache length in tokens, shared by all jobs (default: the model's).
    max_batch_size: jobs decoded at once (default 16).
    gpu_split: list of GiB per GPU; absent: auto-split over every visible GPU.
    tensor_parallel: true to load tensor-parallel over the visible GPUs (or ``gpu_split``).
    cache: ``"fp16"`` (default), ``"q8"``, ``"q6"`` or ``"q4"``.

Chat templates come from the model's own ``tokenizer_config.json`` (rendered with jinja2).
Status: written against ExLlamaV2 0.3.x's documented API; not run in this repository's CI
(no GPU). Its tests are marked ``gpu`` and skip without CUDA.
"""

from __future__ import annotations

import json
import logging
import math
import queue
import threading
from collections.abc import AsyncIterator
from contextlib import suppress
from pathlib import Path
from typing import Any

import trio

from helexa.protocol import GenerateRequest, GenerateResult, ModelConfig, Task, TokenChunk, Usage

from . import openai_shapes
from .base import (
    Backend,
    BackendError,
    ChatInference,
    GenerationEvent,
    InvalidRequest,
    LoadFailed,
    ProgressFn,
    TextInference,
    Unsupported,
)

log = logging.getLogger(__name__)

_FINISH = {"stop_token": "stop", "stop_string": "stop", "max_new_tokens": "length"}
_CACHES = {"fp16": "ExLlamaV2Cache", "q8": "ExLlamaV2Cache_Q8", "q6": "ExLlamaV2Cache_Q6", "q4": "ExLlamaV2Cache_Q4"}


class ExLlamaV2Backend(Backend, ChatInference, TextInference):
    """EXL2 models through ExLlamaV2's dynamic generator (see the module docstring)."""

    kind = "exllamav2"

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        md = config.metadata
        self._path = Path(str(md["path"])) if md.get("path") else None
        self._max_seq_len = md.get("max_seq_len")
        self._max_batch_size = int(md.get("max_batch_size", 16))
        self._gpu_split = md.get("gpu_split")
        self._tensor_parallel = bool(md.get("tensor_parallel", False))
        self._cache_kind = str(md.get("cache", "fp16"))
        self._parts: dict[str, Any] = {}
        self._commands: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._worker_done = threading.Event()
        self._template: Any = None

    # --- lifecycle ------------------------------------------------------------------------

    async def load(self, progress: ProgressFn) -> None:
        """Load weights and cache onto the GPU(s); progress counts modules loaded.

        Raises :class:`LoadFailed`: ``missing_extra`` (exllamav2/torch absent), ``no_gpu``,
        ``model_not_found``, ``corrupt_model`` (not an EXL2 directory), ``out_of_memory``."""
        if self._parts:
            return
        try:
            import torch
            import exllamav2
            from exllamav2 import generator as exl_generator
        except ImportError as exc:
            raise LoadFailed(
                f"the exllamav2 backend needs the 'exllamav2' extra (exllamav2 and torch): {exc}",
                code="missing_extra",
            ) from None
        if not torch.cuda.is_available():
            raise LoadFailed("the exllamav2 backend needs a CUDA GPU and none is visible", code="no_gpu")
        if self._path is None or not (self._path / "config.json").is_file():
            raise LoadFailed(f"no EXL2 model directory at {self._path} (metadata 'path')", code="model_not_found")
        if self._cache_kind not in _CACHES:
            raise LoadFailed(f"unknown cache kind {self._cache_kind!r} ({', '.join(_CACHES)})", code="invalid_config")
        token = trio.lowlevel.current_trio_token()

        def report(done: int, total: int) -> None:
            with suppress(trio.RunFinishedError):
                token.run_sync_soon(progress, "load", done, total, "modules")

        try:
            self._parts = await trio.to_thread.run_sync(self._load_sync, torch, exllamav2, exl_generator, report)
        except torch.cuda.OutOfMemoryError as exc:
            await self._free()
            raise LoadFailed(f"out of GPU memory loading {self._path}: {exc}", code="out_of_memory") from None
        except (ValueError, KeyError, OSError, AssertionError) as exc:
            await self._free()
            raise LoadFailed(f"cannot load {self._path} as EXL2: {exc}", code="corrupt_model") from None
        self._template = _load_template(self._path)
        self._worker_done.clear()
        trio.lowlevel.start_thread_soon(self._worker, lambda outcome: self._worker_done.set())

    def _load_sync(self, torch: Any, exl: Any, exl_generator: Any, report: Any) -> dict[str, Any]:
        parts: dict[str, Any] = {"torch": torch}
        self._parts = parts  # so that a failure half-way can still be freed
        config = exl.ExLlamaV2Config(str(self._path))
        if self._max_seq_len:
            config.max_seq_len = int(self._max_seq_len)
        model = parts["model"] = exl.ExLlamaV2(config)
        cache_cls = getattr(exl, _CACHES[self._cache_kind])
        if self._tensor_parallel:
            model.load_tp(self._gpu_split, callback=report)
            cache = exl.ExLlamaV2Cache_TP(model, base=cache_cls, max_seq_len=config.max_seq_len)
        elif self._gpu_split:
            model.load(self._gpu_split, callback=report)
            cache = cache_cls(model, max_seq_len=config.max_seq_len)
        else:
            cache = cache_cls(model, max_seq_len=config.max_seq_len, lazy=True)
            model.load_autosplit(cache, callback=report)
        parts["cache"] = cache
        tokenizer = parts["tokenizer"] = exl.ExLlamaV2Tokenizer(config)
        parts["generator"] = exl_generator.ExLlamaV2DynamicGenerator(
            model=model, cache=cache, tokenizer=tokenizer, max_batch_size=self._max_batch_size
        )
        parts["exl_generator"] = exl_generator
        parts["max_seq_len"] = config.max_seq_len
        return parts

    async def unload(self) -> None:
        """Cancel every job, stop the worker, and free weights, cache and CUDA memory."""
        if not self._parts:
            return
        if "generator" in self._parts:
            self._commands.put(("stop", None))
            await trio.to_thread.run_sync(self._worker_done.wait, 60.0)
        await self._free()

    async def _free(self) -> None:
        parts, self._parts = self._parts, {}
        torch = parts.get("torch")
        model = parts.get("model")

        def free() -> None:
            if model is not None:
                model.unload()
            parts.clear()
            if torch is not None:
                import gc

                gc.collect()
                torch.cuda.empty_cache()

        await trio.to_thread.run_sync(free)

    # --- the generator thread -------------------------------------------------------------

    def _worker(self) -> None:
        generator = self._parts["generator"]
        routes: dict[Any, Any] = {}  # job -> post(item)
        while True:
            try:
                block = not routes
                command, arg = self._commands.get(block=block)
            except queue.Empty:
                command = None
            if command == "stop":
                for job, post in routes.items():
                    generator.cancel(job)
                    post(("done", None))
                return
            if command == "enqueue":
                job, post = arg
                try:
                    generator.enqueue(job)
                    routes[job] = post
                except Exception as exc:  # ExLlamaV2 asserts on jobs that cannot fit
                    post(("error", exc))
            elif command == "cancel":
                job = arg
                if routes.pop(job, None) is not None:
                    generator.cancel(job)
                continue
            if command is not None and not self._commands.empty():
                continue  # take every pending command before the next forward pass
            if not routes:
                continue
            try:
                results = generator.iterate()
            except Exception as exc:
                log.exception("ExLlamaV2 iterate failed")
                for job, post in routes.items():
                    post(("error", exc))
                routes.clear()
                continue
            for result in results:
                post = routes.get(result["job"])
                if post is None:
                    continue
                post(("result", result))
                if result.get("eos"):
                    del routes[result["job"]]

    # --- inference ------------------------------------------------------------------------

    def chat(self, request: GenerateRequest) -> AsyncIterator[GenerationEvent]:
        return self._generate(request)

    def complete(self, request: GenerateRequest) -> AsyncIterator[GenerationEvent]:
        return self._generate(request)

    def _prompt(self, request: GenerateRequest) -> str:
        if request.task is Task.COMPLETION:
            return request.prompt or ""
        if self._template is None:
            raise Unsupported(f"model {self.config.model_id!r} has no chat template in tokenizer_config.json")
        return self._template(list(request.messages))

    def _job(self, request: GenerateRequest) -> tuple[Any, int]:
        parts = self._parts
        exl_generator, tokenizer = parts["exl_generator"], parts["tokenizer"]
        s = request.sampling
        settings = exl_generator.ExLlamaV2Sampler.Settings()
        if s.temperature is not None:
            settings.temperature = s.temperature
            if s.temperature == 0.0:
                settings.top_k = 1
        for ours, theirs in (
            ("top_p", "top_p"),
            ("top_k", "top_k"),
            ("min_p", "min_p"),
            ("repetition_penalty", "token_repetition_penalty"),
            ("frequency_penalty", "token_frequency_penalty"),
            ("presence_penalty", "token_presence_penalty"),
        ):
            value = getattr(s, ours)
            if value is not None and not (ours == "top_k" and s.temperature == 0.0):
                setattr(settings, theirs, value)
        input_ids = tokenizer.encode(self._prompt(request), encode_special_tokens=True)
        prompt_tokens = int(input_ids.shape[-1])
        room = parts["max_seq_len"] - prompt_tokens
        max_new = min(s.max_tokens or room, room)
        if max_new < 1:
            raise InvalidRequest(f"the prompt ({prompt_tokens} tokens) fills the context")
        job = exl_generator.ExLlamaV2DynamicJob(
            input_ids=input_ids,
            max_new_tokens=max_new,
            gen_settings=settings,
            stop_conditions=[tokenizer.eos_token_id, *s.stop],
            seed=s.seed,
            identifier=request.request_id,
        )
        return job, prompt_tokens

    async def _generate(self, request: GenerateRequest) -> AsyncIterator[GenerationEvent]:
        openai_shapes.validate(request, features=self.features)
        if request.extra:
            raise Unsupported(f"the exllamav2 backend does not support {', '.join(sorted(request.extra))}")
        if not self._parts:
            raise BackendError(f"model {self.config.model_id!r} is not loaded", code="model_not_loaded")
        job, prompt_tokens = await trio.to_thread.run_sync(self._job, request)
        send, receive = trio.open_memory_channel[tuple[str, Any]](math.inf)
        token = trio.lowlevel.current_trio_token()

        def post(item: tuple[str, Any]) -> None:
            with suppress(trio.RunFinishedError):
                token.run_sync_soon(send.send_nowait, item)

        self._commands.put(("enqueue", (job, post)))
        finished = False
        try:
            while not finished:
                kind, payload = await receive.receive()
                if kind == "error":
                    finished = True
                    raise BackendError(f"ExLlamaV2: {payload}")
                if kind == "done":
                    finished = True
                    raise BackendError("the model was unloaded", code="model_not_loaded")
                if payload.get("text"):
                    yield TokenChunk(request.request_id, payload["text"], int(payload["token_ids"].shape[-1]) if "token_ids" in payload else 1)
                if payload.get("eos"):
                    finished = True
                    usage = Usage(
                        prompt_tokens=int(payload.get("prompt_tokens", prompt_tokens)),
                        completion_tokens=int(payload.get("new_tokens", 0)),
                        cached_tokens=int(payload.get("cached_tokens", 0)),
                    )
                    yield GenerateResult(request.request_id, _FINISH.get(payload.get("eos_reason", ""), "stop"), usage)
        finally:
            if not finished:
                self._commands.put(("cancel", job))


def _load_template(path: Path) -> Any:
    """A function rendering chat messages with the model's own template, or ``None``."""
    config = path / "tokenizer_config.json"
    if not config.is_file():
        return None
    data = json.loads(config.read_text())
    source = data.get("chat_template")
    if isinstance(source, list):  # named templates: take the default
        source = next((t["template"] for t in source if t.get("name") == "default"), None)
    if not source:
        return None
    import jinja2.sandbox

    template = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(source)
    special = {k: (v if isinstance(v, str) else (v or {}).get("content", "")) for k, v in data.items() if k in ("bos_token", "eos_token")}
    return lambda messages: template.render(messages=messages, add_generation_prompt=True, **special)
