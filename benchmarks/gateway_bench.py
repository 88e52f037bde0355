#!/usr/bin/env python3
"""What the gateway's HTTP layer costs: raw ASGI vs Quart vs the helexa gateway.

Each server runs in its own process (pinned to CPU 0 where ``taskset`` exists): ``raw`` and
``quart`` behind hypercorn on trio, ``gateway`` on its own server (trio + h11, the
default); a lean HTTP/1.1 keep-alive client in this process (CPU 1) measures:

* ``raw``:     a bare ASGI app answering the chat POST with a fixed JSON body;
* ``quart``:   the same handler as a quart-trio route (what the Quart cycle costs);
* ``gateway``: helexa's :class:`Gateway` with an in-memory neuron that answers at once
  (parse, schedule, dispatch, encode: everything but the websocket hop to a neuron);
* ``traced`` (with ``--tracing``): the same gateway recording OpenTelemetry spans (a
  provider with no exporter: the cost of making the spans, not of shipping them).

Usage: ``python benchmarks/gateway_bench.py [--dur 3] [--rounds 2] [--tracing]``. Figures go to stdout
as a Markdown table; the neuron hop is measured by the end-to-end benchmark.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

import trio
from fixed_answer import ANSWER, BODY, raw_app
from instant_neuron import InstantNeuron

STREAM_BODY = json.dumps({"model": "bench", "stream": True, "max_tokens": 64,
                          "messages": [{"role": "user", "content": "Say hello"}]})


# --- servers -----------------------------------------------------------------------------


def quart_app():  # noqa: ANN201
    from quart import request
    from quart_trio import QuartTrio

    app = QuartTrio(__name__)

    @app.post("/v1/chat/completions")
    async def chat():  # noqa: ANN202
        await request.get_json()
        return ANSWER, 200, {"content-type": "application/json"}

    return app


async def serve(kind: str, port: int) -> None:
    import hypercorn.config
    import hypercorn.trio

    if kind in ("gateway", "traced"):
        if kind == "traced":
            from opentelemetry.sdk.trace import TracerProvider

            from helexa import telemetry

            telemetry.use_provider(TracerProvider())
        from helexa.roles.cortex.catalogue import Catalogue
        from helexa.roles.cortex.config import CortexConfig
        from helexa.roles.cortex.fleet import Fleet
        from helexa.roles.cortex.gateway import Gateway
        from helexa.roles.cortex.orchestrator import Orchestrator

        fleet = Fleet()
        InstantNeuron(fleet)
        from helexa.roles.cortex.portal.store import SqliteStore

        config = CortexConfig(gateway_socket=f"127.0.0.1:{port}")
        gateway = Gateway(config, Orchestrator(config, fleet, Catalogue()), store=SqliteStore(":memory:"))
        async with trio.open_nursery() as nursery:
            await nursery.start(gateway.orchestrator.run)
            await gateway.run()
        return
    app = raw_app if kind == "raw" else quart_app()
    if kind == "quart":
        app.config["RESPONSE_TIMEOUT"] = None
    cfg = hypercorn.config.Config()
    cfg.bind = [f"127.0.0.1:{port}"]
    cfg.accesslog = None
    cfg.keep_alive_max_requests = 1_000_000
    await hypercorn.trio.serve(app, cfg)


# --- the client --------------------------------------------------------------------------


def request_bytes(body: str) -> bytes:
    return (f"POST /v1/chat/completions HTTP/1.1\r\nhost: bench\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\n\r\n{body}").encode()


async def one(stream: trio.SocketStream, req: bytes, streaming: bool) -> tuple[float, float]:
    t0 = time.perf_counter()
    await stream.send_all(req)
    buf = b""
    first = 0.0
    while True:
        data = await stream.receive_some(65536)
        if not data:
            raise RuntimeError("server closed the connection")
        if not first and (not streaming or b"content" in buf + data):
            first = time.perf_counter() - t0
        buf += data
        if streaming:
            if buf.endswith(b"0\r\n\r\n") and b"[DONE]" in buf:
                break
        else:
            head, sep, rest = buf.partition(b"\r\n\r\n")
            if sep:
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                if len(rest) >= length:
                    if not head.startswith(b"HTTP/1.1 200"):
                        raise RuntimeError(buf[:300])
                    break
    return first, time.perf_counter() - t0


async def load(port: int, concurrency: int, dur: float, streaming: bool) -> dict[str, float]:
    req = request_bytes(STREAM_BODY if streaming else BODY)
    lat: list[float] = []
    ttft: list[float] = []
    deadline = time.perf_counter() + dur

    async def worker() -> None:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            while time.perf_counter() < deadline:
                first, total = await one(stream, req, streaming)
                lat.append(total)
                ttft.append(first)

    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(concurrency):
            nursery.start_soon(worker)
    elapsed = time.perf_counter() - start
    lat.sort()
    ttft.sort()
    return {"rps": len(lat) / elapsed, "p50": lat[len(lat) // 2] * 1e3, "p99": lat[int(len(lat) * 0.99)] * 1e3,
            "ttft50": ttft[len(ttft) // 2] * 1e3}


def _wait_listening(port: int, timeout: float = 30.0) -> None:
    """Until the server accepts connections (a fixed sleep was too short on a busy machine)."""
    import socket

    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--serve", choices=["raw", "quart", "gateway", "traced"])
    parser.add_argument("--port", type=int, default=18080)
    parser.add_argument("--dur", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--tracing", action="store_true", help="also the gateway recording spans")
    args = parser.parse_args()
    if args.serve:
        trio.run(serve, args.serve, args.port)
        return
    pin = shutil.which("taskset") is not None and (os.cpu_count() or 1) >= 2
    if pin:
        os.sched_setaffinity(0, {1})
    results: dict[tuple[str, str], list[dict[str, float]]] = {}
    for rnd in range(args.rounds):
        for i, kind in enumerate(["raw", "quart", "gateway", *(["traced"] if args.tracing else [])]):
            port = args.port + i + 10 * rnd
            cmd = [sys.executable, __file__, "--serve", kind, "--port", str(port)]
            proc = subprocess.Popen((["taskset", "-c", "0"] if pin else []) + cmd)
            try:
                _wait_listening(port)
                for label, conc, streaming in (("c1", 1, False), ("c16", 16, False), ("s1", 1, True),
                                               ("s16", 16, True)):
                    if streaming and kind not in ("gateway", "traced"):
                        continue
                    results.setdefault((kind, label), []).append(trio.run(load, port, conc, args.dur, streaming))
            finally:
                proc.terminate()
                proc.wait(10)
    print("| server | load | req/s | p50 ms | p99 ms | first chunk p50 ms |")
    print("|---|---|---|---|---|---|")
    for (kind, label), runs in results.items():
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        name = {"c1": "POST c=1", "c16": "POST c=16", "s1": "64-tok stream c=1", "s16": "64-tok stream c=16"}[label]
        print(f"| {kind} | {name} | {med['rps']:.0f} | {med['p50']:.2f} | {med['p99']:.2f} | {med['ttft50']:.2f} |")


if __name__ == "__main__":
    main()
