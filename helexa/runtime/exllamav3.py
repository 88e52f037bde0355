"""``exllamav3``: EXL3 models on CUDA GPUs through ExLlamaV3's generator.

ExLlamaV3 succeeds ExLlamaV2 (whose last release is 0.3.2); its EXL3 format is what
current quantised models ship in. ``exllamav3`` and ``torch`` are imported only inside
:meth:`ExLlamaV3Backend.load` (the optional extra ``helexa[exllamav3]``), so this module
imports anywhere; without them, or without a CUDA device, ``load`` raises
:class:`~helexa.runtime.LoadFailed` with ``missing_extra`` or ``no_gpu``.

Requirements met on a plain CUDA host: its wheel on PyPI is pure Python and compiles its
CUDA extension (~190 translation units) on first import, with the host's ``nvcc`` and
torch's headers (set ``MAX_JOBS``, ``TORCH_CUDA_ARCH_LIST`` to the GPU's architecture only,
and ``TORCH_EXTENSIONS_DIR`` to keep the build); attention runs on Triton (shipped with
torch), so flash-attn is not needed. ``pydantic`` and ``marisa-trie`` are imported by the
loader; ``llguidance`` and ``formatron`` only by constrained-generation filters.

The generator pages its cache (``cache_tokens`` shared by all running requests) and
batches up to ``max_batch_size`` requests; one
:class:`~helexa.runtime.exllama.GeneratorWorker` thread per loaded model calls it (see
:mod:`helexa.runtime.exllama`). Leaving a stream cancels its job and returns once the
job's pages are free.

Metadata:
    path: the model directory (required): EXL3 or unquantised safetensors.
    cache_tokens: the cache's size in tokens, shared by all running requests (default
        8192; a multiple of 256).
    max_seq_len: tokens per request, prompt included (default: the model's context, at most
        ``cache_tokens``).
    max_batch_size: requests decoded at once (default 16).
    max_chunk_size: prompt tokens per forward pass (default 2048; a multiple of 256).
    gpu_split: list of GiB to use per GPU; absent: auto-split over every visible GPU.
    tensor_parallel: true to load tensor-parallel.
    cache: ``"fp16"`` (default) or ``"q2"`` ... ``"q8"`` (bits per key and value).
    warmup: false to skip ExLlamaV3's warm-up passes after the load (default true: kernel
        autotuning then happens at load time, not on the first requests).

Chat templates come from the model directory (see :class:`~helexa.runtime.chat_template.ChatTemplate`;
ExLlamaV3's own ``hf_chat_template`` would need ``transformers``). Unset sampling
parameters take OpenAI's defaults (:func:`~helexa.runtime.exllama.sampling_of`).
"""

from __future__ import annotations

import gc
import logging
import re
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
"""ExLlamaV3's cache page: cache and chunk sizes are multiples of it."""
ACCEPTED = {None: "unquantised", "exl3": "EXL3"}
_QUANT_CACHE = re.compile(r"q([2-8])")


@dataclass(frozen=True, slots=True)
class ExLlamaV3Settings:
    """The backend's metadata, checked (see the module docstring)."""

    path: Path
    cache_tokens: int = 8192
    max_seq_len: int | None = None
    max_batch_size: int = 16
    max_chunk_size: int = 2048
    gpu_split: list[float] | None = None
    tensor_parallel: bool = False
    cache_bits: int | None = None
    """``None`` for an fp16 cache, else bits per key and value (2-8)."""
    warmup: bool = True

    @classmethod
    def from_metadata(cls, md: dict[str, Any]) -> ExLlamaV3Settings:
        """Raises :class:`LoadFailed` (``invalid_config``) naming the key."""
        if not isinstance(md.get("path"), str) or not md["path"]:
            raise LoadFailed("metadata 'path' (the model directory) is required", code="invalid_config")
        cache = md.get("cache", "fp16")
        quant = _QUANT_CACHE.fullmatch(cache) if isinstance(cache, str) else None
        if cache != "fp16" and quant is None:
            raise LoadFailed(f"metadata 'cache' must be 'fp16' or 'q2' ... 'q8', not {cache!r}", code="invalid_config")
        cache_tokens = metadata_int(md, "cache_tokens", 8192, minimum=PAGE, multiple_of=PAGE) or 8192
        max_seq_len = metadata_int(md, "max_seq_len", None)
        if max_seq_len is not None and max_seq_len > cache_tokens:
            raise LoadFailed(f"metadata 'max_seq_len' ({max_seq_len}) exceeds 'cache_tokens' ({cache_tokens})",
                             code="invalid_config")
        return cls(
            path=Path(md["path"]),
            cache_tokens=cache_tokens,
            max_seq_len=max_seq_len,
            max_batch_size=metadata_int(md, "max_batch_size", 16) or 16,
            max_chunk_size=metadata_int(md, "max_chunk_size", 2048, minimum=PAGE, multiple_of=PAGE) or 2048,
            gpu_split=metadata_split(md),
            tensor_parallel=bool(md.get("tensor_parallel", False)),
            cache_bits=int(quant.group(1)) if quant else None,
            warmup=bool(md.get("warmup", True)),
        )

    def context(self, model_context: int | None) -> int:
        """Tokens per request: ``max_seq_len``, else the model's context bounded by the cache."""
        return self.max_seq_len or min(model_context or self.cache_tokens, self.cache_tokens)


class ExLlamaV3Backend(ExLlamaBackend):
    """EXL3 models through ExLlamaV3's generator (see the module docstring).

    Its load puts weights and cache onto the GPU(s) and warms up. Progress stages:
    ``build`` (the extension's import, which compiles it on first use), ``load`` (modules),
    ``warmup`` (passes). It raises :class:`LoadFailed`: ``missing_extra`` (exllamav3,
    torch or a module it imports absent), ``no_gpu``, ``model_not_found``,
    ``corrupt_model`` (not a model directory ExLlamaV3 reads, e.g. EXL2 weights),
    ``out_of_memory``, ``load_failed`` (e.g. the CUDA extension did not build)."""

    kind = "exllamav3"
    engine = "ExLlamaV3"
    accepted = ACCEPTED
    settings_class = ExLlamaV3Settings

    def _load_sync(self, engine: Engine, report: Report) -> None:
        torch, s = engine.torch, self.settings
        report("build", 0, 1, "extension")
        import exllamav3
        from exllamav3.generator.sampler import ComboSampler

        report("build", 1, 1, "extension")
        before = allocated(torch)
        config = exllamav3.Config.from_directory(str(s.path))
        model = engine.model = exllamav3.Model.from_config(config)
        quant = {} if s.cache_bits is None else {
            "layer_type": exllamav3.CacheLayer_quant, "k_bits": s.cache_bits, "v_bits": s.cache_bits
        }
        # The cache must exist before the load: the loader allocates its tensors per layer.
        engine.cache = exllamav3.Cache(model, max_num_tokens=s.cache_tokens, max_batch_size=s.max_batch_size, **quant)
        model.load(
            use_per_device=s.gpu_split,
            tensor_p=s.tensor_parallel,
            max_chunk_size=s.max_chunk_size,
            max_batch_size=s.max_batch_size,
            callback=lambda done, total: report("load", done, total, "modules"),
        )
        if s.warmup:
            model.warmup(
                cache=engine.cache, max_chunk_size=s.max_chunk_size, max_batch_size=min(s.max_batch_size, 8),
                callback=lambda done, total: report("warmup", done, total, "passes"),
            )
        engine.tokenizer = exllamav3.Tokenizer.from_config(config)
        engine.generator = exllamav3.Generator(
            model=model, cache=engine.cache, tokenizer=engine.tokenizer,
            max_batch_size=s.max_batch_size, max_chunk_size=s.max_chunk_size,
        )
        engine.sampler, engine.job_class = ComboSampler, exllamav3.Job
        engine.context = s.context(engine.model_dir.context or config.max_position_embeddings)
        eos = [engine.tokenizer.eos_token_id, *config.eos_token_id_list]
        engine.stops = tuple(dict.fromkeys([*engine.model_dir.stop_token_ids, *(e for e in eos if e is not None)]))
        engine.memory = max(0, allocated(torch) - before)

    def _new_job(self, engine: Engine, request: GenerateRequest, ids: Any, max_new: int, s: Sampling) -> Any:
        sampler = engine.sampler(
            rep_p=s.repetition_penalty, freq_p=s.frequency_penalty, pres_p=s.presence_penalty,
            temperature=0.0 if s.greedy else s.temperature, min_p=s.min_p, top_k=s.top_k, top_p=s.top_p,
        )
        return engine.job_class(
            input_ids=ids,
            max_new_tokens=max_new,
            sampler=sampler,
            seed=request.sampling.seed,
            stop_conditions=[*engine.stops, *request.sampling.stop],
            identifier=request.request_id,
        )

    @staticmethod
    def _free(engine: Engine) -> None:
        """Close the generator, unload the model (which drops the cache's tensors) and hand
        the VRAM back to the driver."""
        generator, model = engine.generator, engine.model
        engine.generator = engine.cache = engine.tokenizer = engine.model = engine.worker = None
        if generator is not None:
            try:
                generator.close()
            except Exception:
                log.exception("ExLlamaV3 generator close failed")
        if model is not None:
            try:
                model.unload()
            except Exception:
                log.exception("ExLlamaV3 unload failed")
        del generator, model
        gc.collect()
        with suppress(Exception):
            engine.torch.cuda.empty_cache()
