"""The fixed chat exchange that the HTTP benchmarks send and answer, and the bare ASGI app
that answers it: the floor against which a server or a framework is measured
(``gateway_bench.py``'s ``raw`` server, ``http_server_bench.py``'s app)."""

from __future__ import annotations

import json

BODY = json.dumps({"model": "bench", "max_tokens": 16, "messages": [{"role": "user", "content": "Say hello"}]})
"""A non-streaming chat completion request."""
ANSWER = json.dumps({"id": "x", "object": "chat.completion", "created": 0, "model": "bench", "choices": [
    {"index": 0, "message": {"role": "assistant", "content": "hello"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}).encode()
"""What :func:`raw_app` answers."""


async def raw_app(scope, receive, send):  # noqa: ANN001, ANN201
    """An ASGI app that reads the request body, parses it as JSON and answers :data:`ANSWER`
    (and completes a lifespan, for servers that run one)."""
    if scope["type"] != "http":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    body = b""
    while True:
        msg = await receive()
        body += msg.get("body", b"")
        if not msg.get("more_body"):
            break
    json.loads(body)
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(ANSWER)).encode())]})
    await send({"type": "http.response.body", "body": ANSWER})
