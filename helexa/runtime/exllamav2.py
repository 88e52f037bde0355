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

import gc
import logging
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from helexa.protocol import GenerateRequest

from .base import LoadFailed
from .exllama import Sampling, metadata_int, metadata_split
from .exllama_backend import Engine, ExLlamaBackend, Report, allocated

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


class ExLlamaV2Backend(ExLlamaBackend):
    """EXL2 models through ExLlamaV2's dynamic generator (see the module docstring).

    Its load puts weights and cache onto the GPU(s); progress counts modules loaded (after
    ``build``, the extension's import, which compiles it on first use). It raises
    :class:`LoadFailed`: ``missing_extra`` (exllamav2 or torch absent), ``no_gpu``,
    ``model_not_found``, ``corrupt_model`` (not a model directory ExLlamaV2 reads, e.g.
    EXL3 weights), ``out_of_memory``, ``load_failed`` (e.g. the CUDA extension did not
    build)."""

    kind = "exllamav2"
    engine = "ExLlamaV2"
    accepted = ACCEPTED
    settings_class = ExLlamaV2Settings

    def _load_sync(self, engine: Engine, report: Report) -> None:
        torch, s = engine.torch, self.settings
        report("build", 0, 1, "extension")
        import exllamav2
        from exllamav2 import attn
        from exllamav2.generator import ExLlamaV2DynamicGenerator, ExLlamaV2DynamicJob, ExLlamaV2Sampler

        report("build", 1, 1, "extension")
        before = allocated(torch)
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
        engine.memory = max(0, allocated(torch) - before)

    def _new_job(self, engine: Engine, request: GenerateRequest, ids: Any, max_new: int, s: Sampling) -> Any:
        settings = engine.sampler.Settings()
        settings.temperature = 1.0 if s.greedy else s.temperature
        settings.top_k = 1 if s.greedy else s.top_k
        settings.top_p, settings.min_p = s.top_p, s.min_p
        settings.token_repetition_penalty = s.repetition_penalty
        settings.token_frequency_penalty = s.frequency_penalty
        settings.token_presence_penalty = s.presence_penalty
        return engine.job_class(
            input_ids=ids,
            max_new_tokens=max_new,
            gen_settings=settings,
            stop_conditions=[*engine.stops, *request.sampling.stop],
            seed=request.sampling.seed,
            identifier=request.request_id,
        )

    @staticmethod
    def _free(engine: Engine) -> None:
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
