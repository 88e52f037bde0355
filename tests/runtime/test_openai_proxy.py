"""The openai_proxy backend supervising real server processes."""

from __future__ import annotations

import contextlib
import logging
import sys
import textwrap
from pathlib import Path

import psutil
import pytest
import trio
from scripted_server import Conn, serving

from helexa.protocol import GenerateRequest, ModelConfig, ModelState, ModelStatus, SamplingParams, Task
from helexa.runtime import (
    BackendCrashed,
    BackendError,
    InvalidRequest,
    LoadFailed,
    Overloaded,
    create_backend,
)

SERVER_SCRIPT = Path(__file__).with_name("llama_server.py")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

# A server that answers /health, logs a line, and ignores SIGTERM (to prove the SIGKILL).
STUBBORN = textwrap.dedent(
    """
    import http.server, signal, sys
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200); self.end_headers(); self.wfile.write(b"ok")
        def log_message(self, *args):
            pass
    print("stubborn server says hello", flush=True)
    http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
    """
)


def supervised(tiny_gguf: Path, port: int, **metadata) -> ModelConfig:
    return ModelConfig(
        "tiny-proxied",
        "openai_proxy",
        command=sys.executable,
        args=(str(SERVER_SCRIPT), str(tiny_gguf), str(port)),
        listen_endpoint=f"http://127.0.0.1:{port}",
        metadata={"dialect": "llama.cpp", "ready_timeout": 60, "restart_backoff": 0.1, **metadata},
    )


_BEFORE: set[int] = set()


@pytest.fixture(autouse=True)
def _note_existing_children() -> None:
    """Children that exist before a test (the session's llama_server) are not its own."""
    _BEFORE.clear()
    _BEFORE.update(p.pid for p in psutil.Process().children(recursive=True))


def children() -> list[psutil.Process]:
    """Processes started during this test that are still alive."""
    return [p for p in psutil.Process().children(recursive=True) if p.pid not in _BEFORE and p.status() != psutil.STATUS_ZOMBIE]


async def generate(backend, n: int = 3) -> int:
    request = GenerateRequest("p", "m", Task.COMPLETION, prompt="Hello", sampling=SamplingParams(max_tokens=n))
    async with contextlib.aclosing(backend.complete(request)) as it:
        async for event in it:
            last = event
    return last.usage.completion_tokens


@pytest.mark.slow
async def test_starts_serves_restarts_and_stops_the_process(tiny_gguf: Path) -> None:
    statuses: list[ModelStatus] = []
    progress: list[tuple] = []
    async with trio.open_nursery() as nursery:
        backend = create_backend(supervised(tiny_gguf, free_port()))
        backend.service_nursery = nursery
        backend.status_listener = statuses.append
        with trio.fail_after(60):
            await backend.load(lambda *args: progress.append(args))
            assert progress[0][0] == "starting" and progress[-1][1] == progress[-1][2]
            assert await generate(backend) == 3
            (child,) = children()
            child.kill()
            while [s.state for s in statuses] != [ModelState.LOADING, ModelState.LOADED]:
                await trio.sleep(0.05)
            assert "exited" in statuses[0].error
            assert await generate(backend) == 3
        with trio.fail_after(30):  # SIGTERM's grace, then SIGKILL: never a hang
            await backend.unload()
        assert children() == []


async def test_a_command_that_exits_fails_the_load_and_leaves_nothing(tmp_path: Path) -> None:
    config = ModelConfig(
        "broken", "openai_proxy", command=sys.executable, args=("-c", "raise SystemExit(3)"),
        listen_endpoint=f"http://127.0.0.1:{free_port()}",
    )
    async with trio.open_nursery() as nursery:
        backend = create_backend(config)
        backend.service_nursery = nursery
        with pytest.raises(LoadFailed) as caught:
            await backend.load(lambda *args: None)
        await backend.unload()
    assert caught.value.code == "load_failed" and "status 3" in str(caught.value)
    assert children() == []


async def test_a_missing_executable_fails_the_load() -> None:
    config = ModelConfig("x", "openai_proxy", command="/nonexistent/server", listen_endpoint="http://127.0.0.1:9")
    async with trio.open_nursery() as nursery:
        backend = create_backend(config)
        backend.service_nursery = nursery
        with pytest.raises(LoadFailed, match="cannot start"):
            await backend.load(lambda *args: None)


async def test_a_command_needs_a_service_nursery() -> None:
    config = ModelConfig("x", "openai_proxy", command=sys.executable, listen_endpoint="http://127.0.0.1:9")
    with pytest.raises(LoadFailed, match="service_nursery"):
        await create_backend(config).load(lambda *args: None)


async def test_an_endpoint_that_never_answers_times_out() -> None:
    config = ModelConfig("x", "openai_proxy", listen_endpoint=f"http://127.0.0.1:{free_port()}", metadata={"ready_timeout": 0.5})
    with pytest.raises(LoadFailed, match="did not answer"):
        await create_backend(config).load(lambda *args: None)


async def test_output_is_logged_and_sigterm_is_followed_by_sigkill(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="helexa.runtime.openai_proxy")
    port = free_port()
    config = ModelConfig(
        "stubborn", "openai_proxy", command=sys.executable, args=("-c", STUBBORN, str(port)),
        listen_endpoint=f"http://127.0.0.1:{port}", metadata={"stop_grace": 0.5},
    )
    async with trio.open_nursery() as nursery:
        backend = create_backend(config)
        backend.service_nursery = nursery
        with trio.fail_after(30):
            await backend.load(lambda *args: None)
            while "stubborn server says hello" not in caplog.text:
                await trio.sleep(0.05)
            await backend.unload()
    assert children() == []
    assert "SIGKILL" in caplog.text


# --- the upstream's answers, byte for byte (a scripted server on 127.0.0.1) -------------------

def proxied(url: str, **metadata) -> ModelConfig:
    return ModelConfig("scripted", "openai_proxy", listen_endpoint=url, metadata={"dialect": "openai", **metadata})


def chat_request(stream: bool = True) -> GenerateRequest:
    return GenerateRequest("r", "scripted", Task.CHAT, messages=({"role": "user", "content": "hi"},),
                           sampling=SamplingParams(max_tokens=4), stream=stream)


async def loaded(url: str, **metadata):
    backend = create_backend(proxied(url, **metadata))
    await backend.load(lambda *args: None)
    return backend


async def health_then(conn: Conn, answer) -> None:
    """Answer readiness probes, then hand each inference request to ``answer``."""
    while (req := await conn.request()) is not None:
        if req[0].startswith(b"GET "):
            await conn.answer(b'{"data": []}')
        else:
            await answer(conn, req)


def sse_chunk(text: str) -> bytes:
    data = b'data: {"choices": [{"index": 0, "delta": {"content": "%s"}, "finish_reason": null}]}\n\n' % text.encode()
    return b"%x\r\n%s\r\n" % (len(data), data)


@pytest.mark.parametrize("status, body, error, code", [
    ("400 Bad Request", b'{"error": {"message": "max_tokens is too large", "type": "BadRequestError"}}',
     InvalidRequest, "invalid_request"),
    ("404 Not Found", b'{"detail": "Not Found"}', InvalidRequest, "invalid_request"),
    ("429 Too Many Requests", b'{"error": {"message": "slow down"}}', Overloaded, "overloaded"),
    ("503 Service Unavailable", b"loading model", Overloaded, "overloaded"),
    ("500 Internal Server Error", b"oops", BackendCrashed, "backend_crashed"),
    ("401 Unauthorized", b'{"error": {"message": "bad key"}}', BackendError, "backend_error"),
])
@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole"])
async def test_upstream_http_errors_map_to_the_runtime_tree(nursery: trio.Nursery, status: str, body: bytes, error,
                                                            code: str, stream: bool) -> None:
    async def answer(conn: Conn, req) -> None:
        await conn.answer(body, status)

    server = await serving(nursery, lambda conn: health_then(conn, answer))
    backend = await loaded(server.url)
    with pytest.raises(error) as caught:
        async for _ in backend.chat(chat_request(stream)):
            pass
    assert caught.value.code == code
    if code == "invalid_request":
        assert str(caught.value) in body.decode()  # the upstream's own message
    await backend.unload()


async def test_a_stream_relays_text_then_an_error_event_from_llama_cpp(nursery: trio.Nursery) -> None:
    async def answer(conn: Conn, req) -> None:
        error = b'error: {"code": 500, "message": "the slot crashed", "type": "server_error"}\n\n'
        await conn.send(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + sse_chunk("Hi")
                        + b"%x\r\n%s\r\n0\r\n\r\n" % (len(error), error))

    server = await serving(nursery, lambda conn: health_then(conn, answer))
    backend = await loaded(server.url)
    seen = []
    with pytest.raises(BackendError, match="the slot crashed"):
        async for event in backend.chat(chat_request()):
            seen.append(event)
    assert [e.text for e in seen] == ["Hi"]
    await backend.unload()


async def test_an_upstream_dying_mid_stream_is_backend_crashed(nursery: trio.Nursery) -> None:
    async def answer(conn: Conn, req) -> None:
        await conn.send(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + sse_chunk("Hi"))
        await conn.stream.aclose()

    server = await serving(nursery, lambda conn: health_then(conn, answer))
    backend = await loaded(server.url)
    seen = []
    with pytest.raises(BackendCrashed):
        async for event in backend.chat(chat_request()):
            seen.append(event)
    assert [e.text for e in seen] == ["Hi"]
    await backend.unload()


async def test_leaving_a_stream_closes_the_upstream_connection(nursery: trio.Nursery) -> None:
    closed = trio.Event()

    async def answer(conn: Conn, req) -> None:
        await conn.send(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + sse_chunk("Hi"))
        await conn.until_closed()  # as llama.cpp and vLLM do: a closed connection stops the generation
        closed.set()

    server = await serving(nursery, lambda conn: health_then(conn, answer))
    backend = await loaded(server.url)
    async with contextlib.aclosing(backend.chat(chat_request())) as events:
        async for event in events:
            assert event.text == "Hi"
            break
    with trio.fail_after(5):
        await closed.wait()
    await backend.unload()


async def test_a_finished_stream_leaves_its_connection_for_the_next_request(nursery: trio.Nursery) -> None:
    paths = []

    async def answer(conn: Conn, req) -> None:
        paths.append(req[0].split(b" ")[1])
        done = b"data: [DONE]\n\n"
        await conn.send(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + sse_chunk("a") + sse_chunk("b")
                        + b"%x\r\n%s\r\n0\r\n\r\n" % (len(done), done))

    server = await serving(nursery, lambda conn: health_then(conn, answer))
    backend = await loaded(server.url + "/api/v1")
    for _ in range(3):
        events = [e async for e in backend.chat(chat_request())]
        assert "".join(e.text for e in events) == "ab" and events[-1].usage.completion_tokens == 2
    assert paths == [b"/api/v1/chat/completions"] * 3
    assert server.accepted == 2  # the readiness probe's connection, then one for all three
    await backend.unload()
