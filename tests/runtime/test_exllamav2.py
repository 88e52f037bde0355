"""The exllamav2 backend: importable anywhere, precise failures without its extra or a GPU."""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest

from helexa.protocol import ModelConfig, Workload
from helexa.runtime import LoadFailed, create_backend


def cuda_available() -> bool:
    if importlib.util.find_spec("torch") is None or importlib.util.find_spec("exllamav2") is None:
        return False
    import torch

    return torch.cuda.is_available()


def test_importing_the_module_imports_neither_torch_nor_exllamav2() -> None:
    import helexa.runtime.exllamav2  # noqa: F401

    backend = create_backend(ModelConfig("m", "exllamav2", metadata={"path": "/nowhere"}))
    assert backend.workloads == frozenset({Workload.CHAT, Workload.COMPLETION})
    if "torch" not in sys.modules:
        assert "exllamav2" not in sys.modules


@pytest.mark.skipif(cuda_available(), reason="this machine has CUDA and exllamav2")
async def test_load_without_extra_or_gpu_fails_precisely() -> None:
    backend = create_backend(ModelConfig("m", "exllamav2", metadata={"path": "/nowhere"}))
    with pytest.raises(LoadFailed) as caught:
        await backend.load(lambda *args: None)
    assert caught.value.code in ("missing_extra", "no_gpu")
    await backend.unload()


@pytest.mark.gpu
@pytest.mark.skipif(not os.environ.get("HELEXA_EXL2_MODEL"), reason="set HELEXA_EXL2_MODEL to an EXL2 model directory")
@pytest.mark.skipif(not cuda_available(), reason="needs torch with CUDA, exllamav2 and a GPU (none here)")
async def test_streams_and_cancels_on_a_gpu() -> None:
    import contextlib

    from helexa.protocol import GenerateRequest, GenerateResult, SamplingParams, Task

    backend = create_backend(ModelConfig("m", "exllamav2", metadata={"path": os.environ["HELEXA_EXL2_MODEL"]}))
    await backend.load(lambda *args: None)
    try:
        request = GenerateRequest("g", "m", Task.COMPLETION, prompt="Once upon a time", sampling=SamplingParams(max_tokens=16))
        events = []
        async with contextlib.aclosing(backend.complete(request)) as it:
            async for event in it:
                events.append(event)
        assert isinstance(events[-1], GenerateResult) and events[-1].usage.completion_tokens == 16
        long = GenerateRequest("h", "m", Task.COMPLETION, prompt="Hello", sampling=SamplingParams(max_tokens=1000))
        async with contextlib.aclosing(backend.complete(long)) as it:
            async for _ in it:
                break
    finally:
        await backend.unload()
