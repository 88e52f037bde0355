"""Fixtures for the runtime tests: backends that can run on this machine."""

from __future__ import annotations

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


CONFORMANCE_KINDS = ["llama_cpp", "openai_proxy", "synthetic"]
PLACES = ["in-process", "in-a-worker"]


@pytest.fixture(params=[(k, p) for k in CONFORMANCE_KINDS for p in PLACES], ids=lambda kp: f"{kp[0]}-{kp[1]}")
async def backend(request: pytest.FixtureRequest, nursery) -> Backend:
    """A loaded generation backend of each kind that runs here, in this process and in a
    worker process (:mod:`helexa.runtime.worker`); unloaded afterwards."""
    kind, place = request.param
    if kind == "llama_cpp":
        config = tiny_llama_config(request.getfixturevalue("tiny_gguf"))
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
