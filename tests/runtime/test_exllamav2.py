"""The exllamav2 backend: importable anywhere, its metadata checked without a GPU, and a
stream, a cancel and an unload on a GPU where one is (its conformance runs in
test_conformance.py; the precise load failures, shared with exllamav3, in test_exllama.py)."""

from __future__ import annotations

import os
import sys

import pytest

from helexa.protocol import ModelConfig, Workload
from helexa.runtime import LoadFailed, create_backend

from exllama_support import cuda_with, gpu_model


def test_importing_the_module_imports_neither_torch_nor_exllamav2() -> None:
    import helexa.runtime.exllamav2  # noqa: F401

    backend = create_backend(ModelConfig("m", "exllamav2", metadata={"path": "/nowhere"}))
    assert backend.workloads == frozenset({Workload.CHAT, Workload.COMPLETION})
    if "torch" not in sys.modules:
        assert "exllamav2" not in sys.modules


@pytest.mark.skipif(cuda_with("exllamav2"), reason="this machine has CUDA and exllamav2")
async def test_load_without_extra_or_gpu_fails_precisely() -> None:
    backend = create_backend(ModelConfig("m", "exllamav2", metadata={"path": "/nowhere"}))
    with pytest.raises(LoadFailed) as caught:
        await backend.load(lambda *args: None)
    assert caught.value.code in ("missing_extra", "no_gpu")
    await backend.unload()


@pytest.mark.gpu
@pytest.mark.skipif(gpu_model("exllamav2", "HELEXA_EXL2_MODEL") is not None,
                    reason=gpu_model("exllamav2", "HELEXA_EXL2_MODEL") or "")
async def test_streams_cancels_and_frees_vram_on_a_gpu() -> None:
    import contextlib

    import torch
    import trio

    from helexa.protocol import GenerateRequest, GenerateResult, SamplingParams, Task, TokenChunk

    free_before = torch.cuda.mem_get_info()[0]
    backend = create_backend(ModelConfig("m", "exllamav2", metadata={"path": os.environ["HELEXA_EXL2_MODEL"]}))
    await backend.load(lambda *args: None)
    try:
        assert backend.memory_bytes() > 0
        request = GenerateRequest("g", "m", Task.COMPLETION, prompt="Once upon a time", sampling=SamplingParams(max_tokens=16))
        async with contextlib.aclosing(backend.complete(request)) as it:
            events = [event async for event in it]
        assert isinstance(events[-1], GenerateResult) and events[-1].usage.completion_tokens == 16
        long = GenerateRequest("h", "m", Task.COMPLETION, prompt="Hello", sampling=SamplingParams(max_tokens=1000))
        with trio.fail_after(30):
            async with contextlib.aclosing(backend.complete(long)) as it:
                async for event in it:
                    assert isinstance(event, TokenChunk)
                    break
            # Without flash-attn ExLlamaV2 runs one job at a time: this one runs only if the
            # cancelled one is gone.
            async with contextlib.aclosing(backend.complete(request)) as it:
                events = [event async for event in it]
        assert events[-1].usage.completion_tokens == 16
    finally:
        await backend.unload()
    assert torch.cuda.mem_get_info()[0] >= free_before - 256 * 2**20


def test_metadata_defaults_and_checks() -> None:
    from helexa.runtime.exllamav2 import ExLlamaV2Settings

    s = ExLlamaV2Settings.from_metadata({"path": "/m"})
    assert (s.max_seq_len, s.max_batch_size, s.gpu_split, s.tensor_parallel, s.cache) == (None, 16, None, False, "fp16")
    q = ExLlamaV2Settings.from_metadata({"path": "/m", "max_seq_len": 32768, "cache": "q4", "gpu_split": [22, 22]})
    assert (q.max_seq_len, q.cache, q.gpu_split) == (32768, "q4", [22.0, 22.0])


@pytest.mark.parametrize(
    ("metadata", "key"),
    [
        ({}, "path"),
        ({"path": "/m", "cache": "q5"}, "cache"),
        ({"path": "/m", "max_seq_len": 1000}, "max_seq_len"),
        ({"path": "/m", "max_seq_len": 128}, "max_seq_len"),
        ({"path": "/m", "max_batch_size": -1}, "max_batch_size"),
        ({"path": "/m", "gpu_split": []}, "gpu_split"),
    ],
)
def test_bad_metadata_fails_with_invalid_config_naming_the_key(metadata: dict, key: str) -> None:
    with pytest.raises(LoadFailed) as caught:
        create_backend(ModelConfig("m", "exllamav2", metadata=metadata))
    assert caught.value.code == "invalid_config"
    assert repr(key) in str(caught.value)
