#!/usr/bin/env python3
"""Python calls and trio run-loop iterations per streamed chunk in the cortex's neuron link.

In one process: a real :class:`~helexa.roles.cortex.neuron_link.NeuronLink` behind the
real websocket server on 127.0.0.1, the neuron's end a raw socket that writes one
``TokenChunk`` frame at a time and waits until the request's task took it (each chunk is
its own socket read, as a real model's tokens are). cProfile counts every call of the
process (the script's own side too, alike for every tree) and how often trio's run loop
went round, per chunk. Run it against another tree with ``PYTHONPATH=TREE``.

Usage::

    .venv/bin/python benchmarks/link_read_passes.py [--chunks 3000]
    PYTHONPATH=/tmp/base .venv/bin/python benchmarks/link_read_passes.py
"""

from __future__ import annotations

import argparse
import cProfile
import pstats

import trio

import helexa
from helexa.protocol import GenerateRequest, GenerateResult, Hardware, NeuronDescriptor, Task, TokenChunk, Usage, encode
from helexa.roles.cortex.neuron_link import NeuronLink
from helexa.transport import websocket as ws_transport
from helexa.transport import wsframes
from helexa.transport.ws_client import handshake

WARM = 50


async def run(chunks: int) -> pstats.Stats:
    prof = cProfile.Profile()
    async with trio.open_nursery() as nursery:
        links, link_out = trio.open_memory_channel[NeuronLink](1)

        async def handler(channel: ws_transport.ServerChannel) -> None:
            link = NeuronLink(channel, NeuronDescriptor("n1", Hardware(cpu_cores=1, ram_total=1)))
            await links.send(link)
            await link.serve()

        port = await nursery.start(lambda task_status: ws_transport.serve(handler, "127.0.0.1", 0,
                                                                          task_status=task_status))
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        neuron = await handshake(stream, host=f"127.0.0.1:{port}")
        link = await link_out.receive()
        taken = trio.Semaphore(0)

        async def consume() -> None:
            request = GenerateRequest("r", "m", Task.CHAT, messages=({"role": "user", "content": "hi"},))
            async with link.generate(request) as events:
                async for _ in events:
                    taken.release()

        nursery.start_soon(consume)
        await neuron.receive()
        frames = [wsframes.client_frame(encode(TokenChunk("r", f"t{i} "))) for i in range(WARM + chunks)]
        for i, frame in enumerate(frames):
            if i == WARM:
                prof.enable()
            await stream.send_all(frame)
            await taken.acquire()
        prof.disable()
        await stream.send_all(wsframes.client_frame(encode(GenerateResult("r", "stop", Usage(1, 1)))))
        await taken.acquire()
        nursery.cancel_scope.cancel()
    return pstats.Stats(prof)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chunks", type=int, default=3000)
    ap.add_argument("--top", type=int, default=0, help="also list the N most called functions")
    a = ap.parse_args()
    stats = trio.run(run, a.chunks)
    calls = sum(v[1] for v in stats.stats.values())  # type: ignore[attr-defined]
    loops = sum(v[1] for (f, _, name), v in stats.stats.items()  # type: ignore[attr-defined]
                if name == "unrolled_run" and f.endswith("_run.py"))
    print(f"{helexa.__file__.rsplit('/helexa/', 1)[0]}: {calls / a.chunks:.1f} Python calls and "
          f"{loops / a.chunks:.2f} run-loop iterations per chunk")
    for (f, line, name), v in sorted(stats.stats.items(), key=lambda kv: -kv[1][1])[:a.top]:  # type: ignore[attr-defined]
        print(f"{v[1] / a.chunks:8.2f}  {f.rsplit('/', 1)[-1]}:{line} {name}")


if __name__ == "__main__":
    main()
