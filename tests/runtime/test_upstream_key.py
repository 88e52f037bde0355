"""The API key between the neuron and the OpenAI-style server it proxies: a supervised server
gets a fresh key at each start (in its environment, or in its arguments) and answers nobody
without it; the neuron sends it on every request and never logs it. Real processes."""

from __future__ import annotations

import contextlib
import logging
import socket
import sys
from pathlib import Path

import httpx
import psutil
import pytest
import trio

from helexa.protocol import GenerateRequest, ModelConfig, ModelState, ModelStatus, SamplingParams, Task
from helexa.runtime import LoadFailed, create_backend
from helexa.runtime.upstream_key import PREFIX

KEYED_SERVER = Path(__file__).with_name("keyed_server.py")
LLAMA_SERVER = Path(__file__).with_name("llama_server.py")
OPEN_SERVER = """
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b"ok")
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def keyed(port: int, *args: str, **metadata) -> ModelConfig:
    return ModelConfig("keyed", "openai_proxy", command=sys.executable, args=(str(KEYED_SERVER), str(port), *args),
                       listen_endpoint=f"http://127.0.0.1:{port}",
                       metadata={"dialect": "openai", "ready_timeout": 30, "restart_backoff": 0.1,
                                 "stop_grace": 2, **metadata})


def chat(stream: bool) -> GenerateRequest:
    return GenerateRequest("r", "keyed", Task.CHAT, messages=({"role": "user", "content": "hi"},),
                           sampling=SamplingParams(max_tokens=4), stream=stream)


async def answer(backend, stream: bool) -> str:
    text = ""
    async with contextlib.aclosing(backend.chat(chat(stream))) as events:
        async for event in events:
            text = getattr(event, "text", text) or text
    return text


def server_process(port: int) -> psutil.Process:
    (child,) = [p for p in psutil.Process().children(recursive=True)
                if str(port) in p.cmdline() and p.status() != psutil.STATUS_ZOMBIE]
    return child


def direct(port: int, path: str, key: str | None = None) -> int:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    body = {"model": "keyed", "messages": [{"role": "user", "content": "hi"}]}
    with httpx.Client() as client:
        if path.endswith("/completions"):
            return client.post(f"http://127.0.0.1:{port}{path}", json=body, headers=headers).status_code
        return client.get(f"http://127.0.0.1:{port}{path}", headers=headers).status_code


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG, logger="helexa")
    return caplog


async def test_a_supervised_server_gets_its_key_in_its_environment_and_nobody_else_gets_in(logs) -> None:
    port = free_port()
    statuses: list[ModelStatus] = []
    config = keyed(port, "--key-env", "VLLM_API_KEY", api_key_env="VLLM_API_KEY")
    async with trio.open_nursery() as nursery:
        backend = create_backend(config)
        backend.service_nursery = nursery
        backend.status_listener = statuses.append
        with trio.fail_after(60):
            await backend.load(lambda *a: None)  # the probes carry the key: this server answers none without it
            assert await answer(backend, stream=False) == "ok"
            assert await answer(backend, stream=True) == "ok"
            child = server_process(port)
            key = child.environ()["VLLM_API_KEY"]
            assert key.startswith(PREFIX) and key not in " ".join(child.cmdline())
            for path in ("/v1/chat/completions", "/v1/models", "/health"):
                assert await trio.to_thread.run_sync(direct, port, path) == 401
            assert await trio.to_thread.run_sync(direct, port, "/v1/chat/completions", "wrong") == 401
            assert await trio.to_thread.run_sync(direct, port, "/v1/chat/completions", key) == 200

            child.kill()  # restarted: a new key, which the neuron sends from then on
            while [s.state for s in statuses] != [ModelState.LOADING, ModelState.LOADED]:
                await trio.sleep(0.05)
            second = server_process(port).environ()["VLLM_API_KEY"]
            assert second != key and second.startswith(PREFIX)
            assert await answer(backend, stream=True) == "ok"
            await backend.unload()
    text = logs.text
    assert f"starting {sys.executable}" in text and "non-default args" in text  # the start, the server's own lines
    assert key not in text and second not in text


async def test_the_key_in_the_arguments_is_masked_in_the_logged_command_line(logs) -> None:
    port = free_port()
    async with trio.open_nursery() as nursery:
        backend = create_backend(keyed(port, "--api-key", "{api_key}"))
        backend.service_nursery = nursery
        with trio.fail_after(60):
            await backend.load(lambda *a: None)
            assert await answer(backend, stream=True) == "ok"
            cmdline = server_process(port).cmdline()
            key = cmdline[cmdline.index("--api-key") + 1]
            assert key.startswith(PREFIX)
            assert await trio.to_thread.run_sync(direct, port, "/v1/chat/completions") == 401
            await backend.unload()
    assert "--api-key '***'" in logs.text or "--api-key ***" in logs.text
    assert key not in logs.text and "without an API key" not in logs.text


async def test_a_supervised_server_given_no_key_is_started_with_a_warning(logs) -> None:
    port = free_port()
    config = ModelConfig("open", "openai_proxy", command=sys.executable,
                         args=("-c", OPEN_SERVER, str(port)),
                         listen_endpoint=f"http://127.0.0.1:{port}", metadata={"stop_grace": 2})
    async with trio.open_nursery() as nursery:
        backend = create_backend(config)
        backend.service_nursery = nursery
        with trio.fail_after(60):
            await backend.load(lambda *a: None)
            await backend.unload()
    assert "started without an API key" in logs.text


async def test_a_server_the_neuron_does_not_start_gets_the_key_from_the_neurons_environment(
        monkeypatch: pytest.MonkeyPatch, logs) -> None:
    port = free_port()
    monkeypatch.setenv("HELEXA_UPSTREAM_KEY", "operators-own-key")
    process = await trio.lowlevel.open_process(
        [sys.executable, str(KEYED_SERVER), str(port), "--api-key", "operators-own-key"])
    try:
        config = ModelConfig("keyed", "openai_proxy", listen_endpoint=f"http://127.0.0.1:{port}",
                             metadata={"dialect": "openai", "ready_timeout": 30, "api_key_env": "HELEXA_UPSTREAM_KEY"})
        backend = create_backend(config)
        with trio.fail_after(60):
            await backend.load(lambda *a: None)
            assert await answer(backend, stream=False) == "ok"
            assert await answer(backend, stream=True) == "ok"
            await backend.unload()

        monkeypatch.delenv("HELEXA_UPSTREAM_KEY")
        with pytest.raises(LoadFailed, match="HELEXA_UPSTREAM_KEY, which is not set") as caught:
            await create_backend(config).load(lambda *a: None)
        assert caught.value.code == "invalid_config"
    finally:
        process.kill()
        await process.wait()
    assert "operators-own-key" not in logs.text


async def test_a_bad_variable_name_is_refused() -> None:
    with pytest.raises(LoadFailed, match="api_key_env") as caught:
        create_backend(ModelConfig("x", "openai_proxy", listen_endpoint="http://127.0.0.1:9",
                                   metadata={"api_key_env": "NOT A NAME"}))
    assert caught.value.code == "invalid_config"


@pytest.mark.slow
async def test_llama_cpps_server_with_its_key_in_llama_api_key(tiny_gguf: Path, logs) -> None:
    port = free_port()
    config = ModelConfig("tiny-proxied", "openai_proxy", command=sys.executable,
                         args=(str(LLAMA_SERVER), str(tiny_gguf), str(port)),
                         listen_endpoint=f"http://127.0.0.1:{port}",
                         metadata={"dialect": "llama.cpp", "ready_timeout": 60, "api_key_env": "LLAMA_API_KEY"})
    async with trio.open_nursery() as nursery:
        backend = create_backend(config)
        backend.service_nursery = nursery
        with trio.fail_after(120):
            await backend.load(lambda *a: None)
            request = GenerateRequest("p", "m", Task.COMPLETION, prompt="Hello", sampling=SamplingParams(max_tokens=3))
            async with contextlib.aclosing(backend.complete(request)) as events:
                async for event in events:
                    last = event
            assert last.usage.completion_tokens == 3
            key = server_process(port).environ()["LLAMA_API_KEY"]
            assert await trio.to_thread.run_sync(direct, port, "/v1/chat/completions") == 401
            await backend.unload()
    assert key not in logs.text
