"""scripts/gpu_check.sh without a GPU: its dry run, and the tokenizer it gives the tiny model.

The dry run does every step that needs no CUDA for real (tokenizer, tiny model,
models.toml, a cortex and a neuron in their own processes, the openai client's streaming,
cancel and unload checks against a synthetic model); the CUDA steps are skipped with the
reason. What runs only on a GPU is listed in docs/gpu.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import tarfile
from pathlib import Path

import httpx
import pytest

from exllama_support import REPO, free_port

SCRIPT = REPO / "scripts" / "gpu_check.sh"


@pytest.mark.slow
def test_the_dry_run_serves_a_model_through_a_real_cortex_and_neuron(tmp_path: Path) -> None:
    pytest.importorskip("safetensors")
    pytest.importorskip("gguf")
    env = {
        **os.environ,
        "HELEXA_GPU_WHEELS": str(tmp_path / "no-wheels"),  # as in CI: nothing downloaded
        "HELEXA_GPU_WORK": str(tmp_path / "work"),
        "HELEXA_GPU_TINY_ARGS": "--hidden 128 --layers 1 --heads 2 --kv-heads 1 --ffn 256",
        "HELEXA_GPU_TOKENS": "64",
        "HELEXA_GPU_ROUNDS": "1",
        "HELEXA_GPU_CONCURRENCY": "2",
        "HELEXA_GPU_IDLE_TTL": "1",
        "HELEXA_GPU_CONTROL_PORT": str(free_port()),
        "HELEXA_GPU_GATEWAY_PORT": str(free_port()),
    }
    out = tmp_path / "out"
    run = subprocess.run([str(SCRIPT), str(out), "--dry-run"], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]

    results = json.loads((out / "results.json").read_text())
    status = {s["step"]: (s["status"], s["note"]) for s in results["steps"]}
    for ran in ("env", "imports", "tokenizer", "tiny-model", "fabric-up", "fabric-synthetic"):
        assert status[ran][0] == "ok", (ran, status[ran])
    assert status["install"] == ("skipped", status["install"][1]) and "fetch_wheels" in status["install"][1]
    for cuda in ("build-v2", "build-v3"):
        assert status[cuda] == ("skipped", "dry run: needs CUDA")
    for later in ("convert-v2", "direct-v2", "fabric-v2", "convert-v3", "direct-v3", "fabric-v3", "tests-v2"):
        assert status[later][0] == "skipped"

    fabric = results["engines"]["synthetic"]["fabric"]
    assert fabric["failures"] == []
    assert fabric["single"]["tokens"] == [64] and fabric["concurrent"]["tokens"] == 128
    assert fabric["cancel"]["chunks_read"] == 4 and fabric["cancel"]["next_request_tokens"] == 16
    assert fabric["unloaded_after_s"] is not None

    summary = (out / "summary.md").read_text()
    assert "| synthetic |" in summary and "| fabric-synthetic | ok |" in summary
    with tarfile.open(out / "logs.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"logs/steps.tsv", "logs/cortex.log", "logs/neuron.log", "logs/models.toml"} <= names
    models = (out / "logs" / "models.toml").read_text()
    assert 'backend = "exllamav2"' in models and 'backend = "exllamav3"' in models
    assert str(tmp_path / "work" / "tiny-exl3") in models


@pytest.mark.slow
def test_the_tiny_models_tokenizer_tokenizes_as_llama_cpp_does(llama_server: str, smollm2_tokenizer: Path) -> None:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(smollm2_tokenizer / "tokenizer.json"))
    texts = [
        "Hello world",
        " The year 2024 was 12345 days long.",
        "<|im_start|>user\nHi there!<|im_end|>\n<|im_start|>assistant\n",
        "  spaces  and\ttabs\n\nnewlines  ",
        "Ünïcödé, 日本語 and 🙂 emoji",
        "def f(x):\n    return x ** 2  # comment",
    ]
    for text in texts:
        ours = tokenizer.encode(text, add_special_tokens=False).ids
        theirs = httpx.post(f"{llama_server}/tokenize", json={"content": text, "parse_special": True}, timeout=10).json()
        assert ours == theirs["tokens"], text
        assert tokenizer.decode(ours, skip_special_tokens=False) == text
