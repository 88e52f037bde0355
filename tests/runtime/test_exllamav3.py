"""The exllamav3 backend: importable anywhere, its metadata checked without a GPU, and a
stream, a cancel and an unload on a GPU where one is (its conformance runs in
test_conformance.py; the precise load failures, shared with exllamav2, in test_exllama.py)."""

from __future__ import annotations

import contextlib
import os
import sys

import pytest

from helexa.protocol import GenerateRequest, GenerateResult, ModelConfig, SamplingParams, Task, TokenChunk, Workload
from helexa.runtime import LoadFailed, backend_class, create_backend
from helexa.runtime.exllamav3 import ExLlamaV3Backend, ExLlamaV3Settings

from exllama_support import gpu_model


def test_importing_the_module_imports_neither_torch_nor_exllamav3() -> None:
    backend = create_backend(ModelConfig("m", "exllamav3", metadata={"path": "/nowhere"}))
    assert backend.workloads == frozenset({Workload.CHAT, Workload.COMPLETION})
    assert backend.memory_bytes() == 0
    if "torch" not in sys.modules:
        assert "exllamav3" not in sys.modules


def test_the_registry_knows_exllamav3() -> None:
    assert backend_class("exllamav3") is ExLlamaV3Backend


def test_metadata_defaults() -> None:
    s = ExLlamaV3Settings.from_metadata({"path": "/m"})
    assert (s.cache_tokens, s.max_seq_len, s.max_batch_size, s.max_chunk_size) == (8192, None, 16, 2048)
    assert (s.gpu_split, s.tensor_parallel, s.cache_bits, s.warmup) == (None, False, None, True)
    assert s.context(4096) == 4096 and s.context(131072) == 8192 and s.context(None) == 8192
    q = ExLlamaV3Settings.from_metadata({"path": "/m", "cache": "q6", "cache_tokens": 65536, "max_seq_len": 32768,
                                         "gpu_split": [20, 24.5], "tensor_parallel": True, "warmup": False})
    assert (q.cache_bits, q.cache_tokens, q.context(131072), q.gpu_split, q.tensor_parallel, q.warmup) == \
        (6, 65536, 32768, [20.0, 24.5], True, False)


@pytest.mark.parametrize(
    ("metadata", "key"),
    [
        ({}, "path"),
        ({"path": ""}, "path"),
        ({"path": "/m", "cache": "q9"}, "cache"),
        ({"path": "/m", "cache": "fp8"}, "cache"),
        ({"path": "/m", "cache_tokens": 1000}, "cache_tokens"),
        ({"path": "/m", "cache_tokens": "8192"}, "cache_tokens"),
        ({"path": "/m", "max_seq_len": 16384}, "max_seq_len"),
        ({"path": "/m", "max_batch_size": 0}, "max_batch_size"),
        ({"path": "/m", "max_chunk_size": 100}, "max_chunk_size"),
        ({"path": "/m", "gpu_split": "20,20"}, "gpu_split"),
        ({"path": "/m", "gpu_split": [20, -1]}, "gpu_split"),
    ],
)
def test_bad_metadata_fails_with_invalid_config_naming_the_key(metadata: dict, key: str) -> None:
    with pytest.raises(LoadFailed) as caught:
        create_backend(ModelConfig("m", "exllamav3", metadata=metadata))
    assert caught.value.code == "invalid_config"
    assert repr(key) in str(caught.value)


@pytest.mark.gpu
@pytest.mark.skipif(gpu_model("exllamav3", "HELEXA_EXL3_MODEL") is not None,
                    reason=gpu_model("exllamav3", "HELEXA_EXL3_MODEL") or "")
async def test_streams_cancels_and_frees_vram_on_a_gpu() -> None:
    import torch
    import trio

    free_before = torch.cuda.mem_get_info()[0]
    backend = create_backend(ModelConfig("m", "exllamav3", metadata={"path": os.environ["HELEXA_EXL3_MODEL"],
                                                                    "cache_tokens": 65536}))
    stages: list[str] = []
    await backend.load(lambda stage, *rest: stages.append(stage))
    try:
        assert {"build", "load"} <= set(stages) and backend.memory_bytes() > 0
        request = GenerateRequest("g", "m", Task.COMPLETION, prompt="Once upon a time", sampling=SamplingParams(max_tokens=16))
        async with contextlib.aclosing(backend.complete(request)) as it:
            events = [event async for event in it]
        assert isinstance(events[-1], GenerateResult) and events[-1].usage.completion_tokens == 16
        long = GenerateRequest("h", "m", Task.COMPLETION, prompt="Hello", sampling=SamplingParams(max_tokens=4000))
        with trio.fail_after(30):
            async with contextlib.aclosing(backend.complete(long)) as it:
                async for event in it:
                    assert isinstance(event, TokenChunk)
                    break
    finally:
        await backend.unload()
    # The cache (64k tokens) and weights are handed back; what stays is torch's own context.
    assert torch.cuda.mem_get_info()[0] >= free_before - 256 * 2**20
