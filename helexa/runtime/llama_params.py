"""A llama.cpp model's settings from its metadata, and the server parameters they make.

What each setting means is in :mod:`.llama_cpp`'s docstring ("Metadata"); this module
reads them once, with their defaults, and builds the ``xllamacpp.CommonParams`` of the
model's server from them.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PASSED_THROUGH = ("cache_ram_mib", "slot_prompt_similarity", "n_cache_reuse")
"""Metadata keys given to llama.cpp as they are (converted to its parameter's type)."""


@dataclass(frozen=True, slots=True)
class LlamaSettings:
    path: Path | None
    n_ctx: int
    n_parallel: int
    n_threads: int
    n_gpu_layers: int | None
    max_pending: int
    embeddings: bool
    slot_affinity: bool
    cache_ram_mib: int
    """-1: llama.cpp's default (its host-memory prompt cache on); 0: off."""
    passed: Mapping[str, Any]

    @classmethod
    def of(cls, md: Mapping[str, Any]) -> LlamaSettings:
        n_parallel = int(md.get("n_parallel", 2))
        return cls(
            path=Path(str(md["path"])) if md.get("path") else None,
            n_ctx=int(md.get("n_ctx", 4096)),
            n_parallel=n_parallel,
            # all cores but one, which is left to the neuron's own event loop
            n_threads=int(md.get("n_threads", max(1, (os.cpu_count() or 2) - 1))),
            n_gpu_layers=int(md["n_gpu_layers"]) if md.get("n_gpu_layers") is not None else None,
            max_pending=int(md.get("max_pending", 8 * n_parallel)),
            embeddings=bool(md.get("embeddings", False)),
            slot_affinity=bool(md.get("slot_affinity", True)),
            cache_ram_mib=int(md.get("cache_ram_mib", -1)),
            passed={k: md[k] for k in PASSED_THROUGH if k in md},
        )

    def params(self, xllamacpp: Any, path: Path) -> Any:
        """The server's parameters, with a random API key of its own (the server listens on
        a loopback port that xllamacpp cannot be told not to open)."""
        p = xllamacpp.CommonParams()
        p.model.path = str(path)
        p.n_ctx = self.n_ctx
        p.n_parallel = self.n_parallel
        p.cpuparams.n_threads = self.n_threads
        p.cpuparams_batch.n_threads = self.n_threads
        if self.n_gpu_layers is not None:
            p.n_gpu_layers = self.n_gpu_layers
        if self.embeddings:
            p.embedding = True
            p.pooling_type = xllamacpp.llama_pooling_type.LLAMA_POOLING_TYPE_MEAN
        p.api_keys = [secrets.token_hex(16)]
        for key, value in self.passed.items():
            setattr(p, key, type(getattr(p, key))(value))
        return p
