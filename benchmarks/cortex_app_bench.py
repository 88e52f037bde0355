#!/usr/bin/env python3
"""The cortex's own work per request, in one process: CPU time and Python calls.

The default portal's ASGI app (:class:`~helexa.roles.cortex.gateway.PortalApp`) is called
directly with a non-streaming chat completion (the body ``gateway_vs_litellm.py``'s wrk
sends, in the ASGI scope the gateway's own server gives), and its one neuron answers with
one :class:`GenerateResult` at once, as a real neuron's non-streaming relay does: parsing,
metering, the orchestrator's decision, dispatch and the JSON answer, without the HTTP server
or the websocket hop (those are measured end to end by ``gateway_vs_litellm.py``). Figures:
CPU microseconds per request (the process's, best and median of ``--blocks`` blocks of
``--requests``), and Python function calls per request (``cProfile``'s count: the same on a
busy machine as on a quiet one, so it shows a change even where CPU time is lost in other
people's noise).

Usage::

    python benchmarks/cortex_app_bench.py [--requests 1000] [--blocks 5] [--stream] [--src TREE ...]

``--stream`` asks for a streamed answer instead, which the neuron gives as 8 chunks of 8
tokens and a result (SSE framing, the chunks' metering, the stream's end).

``--src`` runs the same in another source tree (``git archive OLD | tar -x -C /tmp/old``);
several are run one after another, twice, in alternating order.
"""

from __future__ import annotations

from cpu_per_request import main, report

BODY = b'{"model":"bench","messages":[{"role":"user","content":"Say hello"}],"max_tokens":16}'
STREAM_BODY = b'{"model":"bench","messages":[{"role":"user","content":"Say hello"}],"max_tokens":64,"stream":true}'
STREAM_FRAMES = 8
"""Chunks of a streamed answer: 64 tokens in 8 chunks of 8, about as the neuron's relay
joins the synthetic backend's 64-token stream (docs/benchmarks.md, "Relaying tokens in
fewer frames"), then the result."""


def measure(requests: int, blocks: int, stream: bool = False) -> None:
    import trio

    from instant_neuron import InstantNeuron

    from helexa.protocol import GenerateResult, TokenChunk, Usage
    from helexa.roles.cortex.catalogue import Catalogue
    from helexa.roles.cortex.config import CortexConfig
    from helexa.roles.cortex.fleet import Fleet
    from helexa.roles.cortex.gateway import Gateway
    from helexa.roles.cortex.orchestrator import Orchestrator
    from helexa.roles.cortex.portal.store import SqliteStore

    text = " ".join(f"tok{i}" for i in range(16))
    body = STREAM_BODY if stream else BODY
    pieces = [" ".join(f"tok{i}" for i in range(j, j + 8)) + " " for j in range(0, 64, 8)]

    class Answer:
        """One generation's events: a single result after one pass through the scheduler."""

        def __init__(self, request) -> None:  # noqa: ANN001
            self.request, self.done = request, False
            self.chunks = list(pieces) if request.stream else []

        async def __aenter__(self) -> "Answer":
            return self

        async def __aexit__(self, *exc: object) -> None:
            pass

        def __aiter__(self) -> "Answer":
            return self

        async def __anext__(self) -> GenerateResult:
            if self.done:
                raise StopAsyncIteration
            await trio.lowlevel.checkpoint()
            if self.chunks:
                return TokenChunk(self.request.request_id, self.chunks.pop(0), tokens=8)
            self.done = True
            if self.request.stream:
                return GenerateResult(self.request.request_id, "length", Usage(8, 64))
            return GenerateResult(self.request.request_id, "length", Usage(8, 16), text=text)

    class OneResultNeuron(InstantNeuron):
        def generate(self, request):  # noqa: ANN001, ANN201
            return Answer(request)

    async def main() -> None:
        fleet = Fleet()
        OneResultNeuron(fleet)
        config = CortexConfig(gateway_socket="127.0.0.1:0")
        gateway = Gateway(config, Orchestrator(config, fleet, Catalogue()), store=SqliteStore(":memory:"))
        app = gateway.app("default")
        headers = [(b"host", b"bench"), (b"content-type", b"application/json"),
                   (b"authorization", b"Bearer sk-bench"), (b"content-length", str(len(body)).encode())]
        sent: list[dict] = []

        async def send(message: dict) -> None:
            sent.append(message)

        async def one() -> None:
            given = False

            async def receive() -> dict:
                nonlocal given
                if given:  # the client stays (until the request is over)
                    await trio.sleep_forever()
                given = True
                return {"type": "http.request", "body": body, "more_body": False}

            sent.clear()
            await app({"type": "http", "method": "POST", "path": "/v1/chat/completions", "query_string": b"",
                       "headers": headers, "client": ("127.0.0.1", 1), "extensions": extensions}, receive, send)

        # What the gateway's own server adds to the scope (helexa.roles.cortex.http's
        # BODY_EXTENSION and CANCEL_EXTENSION; older trees ignore them): the body that came
        # with the head, and the connection's cancel scope (here one around all requests).
        connection = trio.CancelScope()
        extensions = {"helexa.body": body, "helexa.cancel_scope": connection}
        async with trio.open_nursery() as nursery:
            await nursery.start(gateway.orchestrator.run)
            await nursery.start(gateway.watch.run)
            await nursery.start(gateway.writer.run)
            with connection:
                for _ in range(300):
                    await one()
                if stream:
                    streamed = b"".join(m.get("body", b"") for m in sent)
                    assert b"tok63" in streamed and streamed.endswith(b"data: [DONE]\n\n"), sent
                else:
                    assert sent[-1]["type"] == "http.response.body" and b"tok15" in sent[-1]["body"], sent
                await report(one, requests, blocks)
            nursery.cancel_scope.cancel()

    trio.run(main)


if __name__ == "__main__":
    main(__file__, __doc__, measure, requests=1000,
         flags={"stream": "a streamed chat completion (64 tokens in 8 chunks) instead of a non-streamed one"})
