"""``exllamav2``: EXL2 (and GPTQ) models on CUDA GPUs through ExLlamaV2's dynamic generator.

``exllamav2`` and ``torch`` are imported only inside :meth:`ExLlamaV2Backend.load` (the
optional extra ``helexa[exllamav2]``), so this module imports anywhere. ExLlamaV2 0.3.2 is
its last release; :mod:`helexa.runtime.exllamav3` serves the EXL3 models of its successor.

The first import of ``exllamav2`` compiles its CUDA extension (a few minutes; set
``MAX_JOBS`` to the cores to use, ``TORCH_CUDA_ARCH_LIST`` to the GPU's architecture only,
and ``TORCH_EXTENSIONS_DIR`` to keep the build). The load runs it off the trio thread.

Paged attention, and with it continuous batching of several requests, needs flash-attn
2.5.7 or later. Without it (flash-attn has no wheels on PyPI) the generator runs unpaged:
one request at a time, the others queued, each with the whole cache.

One :class:`~helexa.runtime.exllama.GeneratorWorker` thread per loaded model owns the
generator (see :mod:`helexa.runtime.exllama`): leaving a stream cancels its job and returns
once the job's cache pages are free.

Metadata:
    path: the model directory (required): EXL2, GPTQ or unquantised safetensors.
    max_seq_len: tokens per request, prompt included, and the cache's length (default: the
        model's context, rounded down to a multiple of 256; must be a multiple of 256).
    max_batch_size: jobs decoded at once (default 16; 1 without flash-attn).
    gpu_split: list of GiB per GPU; absent: auto-split over every visible GPU.
    tensor_parallel: true to load tensor-parallel over the visible GPUs (or ``gpu_split``).
    cache: ``"fp16"`` (default), ``"q8"``, ``"q6"`` or ``"q4"``.

Chat templates come from the model directory (see :class:`~helexa.runtime.chat_template.ChatTemplate`).
Unset sampling parameters take OpenAI's defaults (:func:`~helexa.runtime.exllama.sampling_of`),
not ExLlamaV2's (which add a repetition penalty of 1.025 and top-p 0.8).
"""

from __future__ import annotations

import contextlib
import gc
import logging
from collections.abc import AsyncIterator
from contextlib import suppress
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import trio

from helexa.protocol import GenerateRequest, ModelConfig, Task

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
from .exllama import (
    GeneratorWorker,
    ModelDir,
    inspect_model_dir,
    load_error,
    metadata_int,
    metadata_split,
    require_cuda,
    room_for,
    sampling_of,
    stream_job,
)

log = logging.getLogger(__name__)

PAGE = 256
"""ExLlamaV2's cache page: the cache length must be a multiple of it."""
CACHES = {"fp16": "ExLlamaV2Cache", "q8": "ExLlamaV2Cache_Q8", "q6": "ExLlamaV2Cache_Q6", "q4": "ExLlamaV2Cache_Q4"}
ACCEPTED = {None: "unquantised", "exl2": "EXL2", "gptq": "GPTQ"}


@dataclass(frozen=True, slots=True)
class ExLlamaV2Settings:
    """The backend's metadata, checked (see the module docstring)."""

    path: Path
    max_seq_len: int | None = None
    max_batch_size: int = 16
    gpu_split: list[float] | None = None
    tensor_parallel: bool = False
    cache: str = "fp16"

    @classmethod
    def from_metadata(cls, md: dict[str, Any]) -> ExLlamaV2Settings:
        """Raises :class:`LoadFailed` (``invalid_config``) naming the key."""
        if not isinstance(md.get("path"), str) or not md["path"]:
            raise LoadFailed("metadata 'path' (the model directory) is required", code="invalid_config")
        cache = md.get("cache", "fp16")
        if cache not in CACHES:
            raise LoadFailed(f"metadata 'cache' must be one of {', '.join(CACHES)}, not {cache!r}", code="invalid_config")
        return cls(
            path=Path(md["path"]),
            max_seq_len=metadata_int(md, "max_seq_len", None, minimum=PAGE, multiple_of=PAGE),
            max_batch_size=metadata_int(md, "max_batch_size", 16) or 16,
            gpu_split=metadata_split(md),
            tensor_parallel=bool(md.get("tensor_parallel", False)),
            cache=cache,
        )


@dataclass(slots=True)
class _Engine:
    """One loaded model: everything ``unload`` frees."""

    torch: Any
    model_dir: ModelDir
    model: Any = None
    cache: Any = None
    tokenizer: Any = None
    generator: Any = None
    sampler: Any = None
    job_class: Any = None
    worker: GeneratorWorker | None = None
    context: int = 0
    stops: tuple[int, ...] = ()
    memory: int = 0


class ExLlamaV2Backend(Backend, ChatInference, TextInference):
    """EXL2 models through ExLlamaV2's dynamic generator (see the module docstring)."""

    kind = "exllamav2"

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.settings = ExLlamaV2Settings.from_metadata(config.metadata)
        self._engine: _Engine | None = None

    def memory_bytes(self) -> int:
        return self._engine.memory if self._engine is not None else 0

    # --- lifecycle ------------------------------------------------------------------------

    async def load(self, progress: ProgressFn) -> None:
        """Load weights and cache onto the GPU(s); progress counts modules loaded (after
        ``build``, the extension's import, which compiles it on first use).

        Raises :class:`LoadFailed`: ``missing_extra`` (exllamav2 or torch absent),
        ``no_gpu``, ``model_not_found``, ``corrupt_model`` (not a model directory
        ExLlamaV2 reads, e.g. EXL3 weights), ``out_of_memory``, ``load_failed`` (e.g. the
        CUDA extension did not build)."""
        if self._engine is not None:
            return
        torch = require_cuda("exllamav2", "exllamav2")
        model_dir = await trio.to_thread.run_sync(
            partial(inspect_model_dir, self.settings.path, accepted=ACCEPTED, engine="ExLlamaV2")
        )
        token = trio.lowlevel.current_trio_token()

        def report(stage: str, done: int, total: int | None, unit: str) -> None:
            with suppress(trio.RunFinishedError):
                token.run_sync_soon(progress, stage, done, total, unit)

        engine = _Engine(torch=torch, model_dir=model_dir)
        try:
            await trio.to_thread.run_sync(self._load_sync, engine, report)
        except BaseException as exc:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(_free, engine)
            if isinstance(exc, Exception):
                raise load_error(exc, torch, self.settings.path, "ExLlamaV2") from None
            raise
        engine.worker = GeneratorWorker(engine.generator, f"exllamav2-{self.config.model_id}")
        engine.worker.start()
        self._engine = engine

    def _load_sync(self, engine: _Engine, report: Any) -> None:
        torch, s = engine.torch, self.settings
        report("build", 0, 1, "extension")
        import exllamav2
        from exllamav2 import attn
        from exllamav2.generator import ExLlamaV2DynamicGenerator, ExLlamaV2DynamicJob, ExLlamaV2Sampler

        report("build", 1, 1, "extension")
        before = _allocated(torch)
        config = exllamav2.ExLlamaV2Config(str(s.path))
        config.max_seq_len = s.max_seq_len or max(PAGE, config.max_seq_len // PAGE * PAGE)
        model = engine.model = exllamav2.ExLlamaV2(config)

        def modules(done: int, total: int) -> None:
            report("load", done, total, "modules")

        cache_cls = getattr(exllamav2, CACHES[s.cache])
        if s.tensor_parallel:
            model.load_tp(s.gpu_split, callback=modules, expect_cache_tokens=config.max_seq_len, expect_cache_base=cache_cls)
            cache = exllamav2.ExLlamaV2Cache_TP(model, base=cache_cls, max_seq_len=config.max_seq_len)
        elif s.gpu_split:
            model.load(s.gpu_split, callback=modules)
            cache = cache_cls(model, max_seq_len=config.max_seq_len)
        else:
            cache = cache_cls(model, max_seq_len=config.max_seq_len, lazy=True)
            model.load_autosplit(cache, callback=modules)
        engine.cache = cache
        engine.tokenizer = exllamav2.ExLlamaV2Tokenizer(config)
        paged = bool(attn.has_flash_attn_with_paged) and not config.no_flash_attn
        if not paged:
            log.warning("flash-attn >= 2.5.7 is not installed: ExLlamaV2 serves %s one request at a time",
                        self.config.model_id)
        engine.generator = ExLlamaV2DynamicGenerator(
            model=model, cache=cache, tokenizer=engine.tokenizer,
            max_batch_size=s.max_batch_size if paged else 1, paged=paged,
        )
        engine.sampler, engine.job_class = ExLlamaV2Sampler, ExLlamaV2DynamicJob
        engine.context = config.max_seq_len
        eos = engine.tokenizer.eos_token_id
        engine.stops = tuple(dict.fromkeys([*engine.model_dir.stop_token_ids, *([eos] if eos is not None else [])]))
        engine.memory = max(0, _allocated(torch) - before)

    async def unload(self) -> None:
        """Cancel every job, stop the generator thread, and free weights, cache and VRAM."""
        engine, self._engine = self._engine, None
        if engine is None:
            return
        if engine.worker is not None:
            engine.worker.stop()
            await trio.to_thread.run_sync(engine.worker.join, 60.0)
        await trio.to_thread.run_sync(_free, engine)

    # --- inference ------------------------------------------------------------------------

    def chat(self, request: GenerateRequest) -> AsyncIterator[GenerationEvent]:
        return self._generate(request)

    def complete(self, request: GenerateRequest) -> AsyncIterator[GenerationEvent]:
        return self._generate(request)

    async def _generate(self, request: GenerateRequest) -> AsyncIterator[GenerationEvent]:
        engine = self._engine
        openai_shapes.validate(request, max_context=engine.context if engine else None, features=self.features)
        if request.extra:
            raise Unsupported(f"the exllamav2 backend does not support {', '.join(sorted(request.extra))}")
        if engine is None or engine.worker is None:
            raise BackendError(f"model {self.config.model_id!r} is not loaded", code="model_not_loaded")
        job, prompt_tokens = await trio.to_thread.run_sync(self._job, engine, request)
        stream = stream_job(engine.worker, job, request.request_id, prompt_tokens, "ExLlamaV2",
                            request.sampling.stop)
        async with contextlib.aclosing(stream) as events:
            async for event in events:
                yield event

    def _job(self, engine: _Engine, request: GenerateRequest) -> tuple[Any, int]:
        if request.task is Task.COMPLETION:
            text, add_bos = request.prompt or "", engine.model_dir.add_bos
        elif engine.model_dir.chat_template is None:
            raise Unsupported(f"model {self.config.model_id!r} has no chat template")
        else:
            text, add_bos = engine.model_dir.chat_template.render(request.messages), False
        ids = engine.tokenizer.encode(text, add_bos=add_bos, encode_special_tokens=True)
        prompt_tokens = int(ids.shape[-1])
        if prompt_tokens == 0:
            raise InvalidRequest("the prompt is empty")
        max_new = room_for(request.sampling.max_tokens, prompt_tokens, engine.context)
        s = sampling_of(request.sampling)
        settings = engine.sampler.Settings()
        settings.temperature = 1.0 if s.greedy else s.temperature
        settings.top_k = 1 if s.greedy else s.top_k
        settings.top_p, settings.min_p = s.top_p, s.min_p
        settings.token_repetition_penalty = s.repetition_penalty
        settings.token_frequency_penalty = s.frequency_penalty
        settings.token_presence_penalty = s.presence_penalty
        job = engine.job_class(
            input_ids=ids,
            max_new_tokens=max_new,
            gen_settings=settings,
            stop_conditions=[*engine.stops, *request.sampling.stop],
            seed=request.sampling.seed,
            identifier=request.request_id,
        )
        return job, prompt_tokens


def _allocated(torch: Any) -> int:
    return sum(torch.cuda.memory_allocated(i) for i in range(torch.cuda.device_count()))


def _free(engine: _Engine) -> None:
    """Drop the model, cache and generator and hand their VRAM back to the driver."""
    model = engine.model
    engine.generator = engine.cache = engine.tokenizer = engine.model = engine.worker = None
    if model is not None:
        try:
            model.unload()
        except Exception:
            log.exception("ExLlamaV2 unload failed")
    del model
    gc.collect()
    with suppress(Exception):
        engine.torch.cuda.empty_cache()
