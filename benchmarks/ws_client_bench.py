#!/usr/bin/env python3
"""The neuron's websocket client against trio-websocket's, on the cortex's own server.

One process, real sockets on 127.0.0.1: the control plane's server (``transport.serve``)
answers every request frame with a result frame, as a neuron's non-streaming answer is one
frame each way; the client under test is either :func:`helexa.transport.websocket.connect`
(ours, since issue 17) or trio-websocket's (what neurons dialled with before), with
``--conc`` tasks sending at once. Prints round trips per second and the process's CPU
microseconds per round trip (server and client together; the server side is the same
for both), best of ``--blocks``.

Usage::

    python benchmarks/ws_client_bench.py [--requests 5000] [--blocks 3] [--conc 1,16]
"""

from __future__ import annotations

import argparse
import time

import trio
import trio_websocket

from helexa.protocol import GenerateRequest, GenerateResult, SamplingParams, Task, Usage, decode, encode
from helexa.transport import websocket as ws_transport

REQUEST = GenerateRequest("r" * 32, "bench", Task.CHAT, messages=({"role": "user", "content": "Say hello"},),
                          sampling=SamplingParams(max_tokens=16), stream=False)
RESULT = GenerateResult("r" * 32, "stop", Usage(prompt_tokens=9, completion_tokens=16), text="tok " * 16)


async def answer(channel) -> None:
    while True:
        await channel.receive()
        await channel.send(RESULT)


class TrioWebsocketClient:
    """trio-websocket's connection behind the two calls the bench makes (what the neuron's
    channel did before issue 17: encode, send_message; get_message, decode)."""

    def __init__(self, ws: trio_websocket.WebSocketConnection) -> None:
        self._ws = ws

    async def send(self, msg: object) -> None:
        await self._ws.send_message(encode(msg))

    async def receive(self) -> object:
        return decode(await self._ws.get_message())


async def run(client: str, requests: int, conc: int, url: str) -> tuple[float, float]:
    async def drive(channel) -> tuple[float, float]:
        done = trio.Event()
        left = [requests]
        answered = [0]

        async def reader() -> None:
            while answered[0] < requests:
                await channel.receive()
                answered[0] += 1
            done.set()

        async def sender() -> None:
            while left[0] > 0:
                left[0] -= 1
                await channel.send(REQUEST)
                await trio.sleep(0)

        c0, t0 = time.process_time(), time.perf_counter()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            for _ in range(conc):
                nursery.start_soon(sender)
        with trio.fail_after(60):
            await done.wait()
        return (time.perf_counter() - t0), (time.process_time() - c0)

    if client == "ours":
        async with ws_transport.connect(url, timeout=10) as channel:
            return await drive(channel)
    async with trio_websocket.open_websocket_url(url, message_queue_size=64, connect_timeout=10) as ws:
        return await drive(TrioWebsocketClient(ws))


async def main(a: argparse.Namespace) -> None:
    async with trio.open_nursery() as nursery:
        port = await nursery.start(lambda task_status: ws_transport.serve(answer, "127.0.0.1", 0, task_status=task_status))
        url = f"ws://127.0.0.1:{port}/"
        for conc in a.conc:
            best: dict[str, tuple[float, float]] = {}
            for _ in range(a.blocks):
                for client in ("trio-websocket", "ours"):
                    wall, cpu = await run(client, a.requests, conc, url)
                    prev = best.get(client)
                    if prev is None or cpu < prev[1]:
                        best[client] = (wall, cpu)
            for client, (wall, cpu) in best.items():
                print(f"c={conc:<3d} {client:15s} {a.requests / wall:9,.0f} round trips/s  "
                      f"{cpu / a.requests * 1e6:6.1f} us CPU per round trip")
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=5000)
    ap.add_argument("--blocks", type=int, default=3)
    ap.add_argument("--conc", type=lambda s: [int(c) for c in s.split(",")], default=[1, 16])
    trio.run(main, ap.parse_args())
