"""The backend registry: ``backend_kind`` -> backend class, imported lazily.

Lazy imports keep heavy engines (torch, exllamav2) out of processes that never use them,
and let a missing optional extra surface as a precise :class:`LoadFailed` at load time.
"""

from __future__ import annotations

import importlib

from helexa.protocol import ModelConfig

from .base import Backend, LoadFailed

BACKENDS: dict[str, str] = {
    "llama_cpp": "helexa.runtime.llama_cpp:LlamaCppBackend",
    "embeddings": "helexa.runtime.embeddings:OnnxEmbeddingBackend",
    "exllamav2": "helexa.runtime.exllamav2:ExLlamaV2Backend",
    "exllamav3": "helexa.runtime.exllamav3:ExLlamaV3Backend",
    "openai_proxy": "helexa.runtime.openai_proxy:OpenAIProxyBackend",
    "synthetic": "helexa.runtime.synthetic:SyntheticBackend",
}


def backend_class(kind: str) -> type[Backend]:
    """Resolve a backend kind. Raises :class:`LoadFailed` (``unknown_backend`` or
    ``missing_extra``) with a message naming what is missing."""
    target = BACKENDS.get(kind)
    if target is None:
        known = ", ".join(sorted(BACKENDS))
        raise LoadFailed(f"unknown backend kind {kind!r} (known: {known})", code="unknown_backend")
    module_name, _, cls_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise LoadFailed(
            f"backend {kind!r} cannot be imported: {exc} (is its optional extra installed?)",
            code="missing_extra",
        ) from None
    return getattr(module, cls_name)


def create_backend(config: ModelConfig) -> Backend:
    return backend_class(config.backend_kind)(config)
