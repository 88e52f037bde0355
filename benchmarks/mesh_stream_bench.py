#!/usr/bin/env python3
"""CPU per request/response exchange on one mesh stream, both ends in this process.

Two real libp2p hosts (noise, yamux) on loopback; one stream reused for every exchange,
shaped like a federated request: two messages one way in one write (~0.7 KiB, as hello +
request), two back (as result + receipt). Prints wall and process CPU time per exchange
(both hosts together: the figure that survives a shared machine).

``--direct`` runs it over the mesh's direct channel (``helexa/mesh/direct_channel.py``:
TCP sealed with ChaCha20-Poly1305 under keys granted over libp2p); otherwise the
channel is off and the stream is a yamux (or ``--muxer mplex``) stream over noise.
``--cancelled-read`` makes the serving end start a read and cancel it before each answer,
as the federation's serving side did for every request before 2026-11-30 (a task that
watched for ``Cancel``). ``--muxer mplex`` offers mplex first (py-libp2p's own ``muxer_preference``; the mesh does
not use it). ``--floor`` runs the same exchange over a bare trio TCP connection with the
same framing and codec and one ChaCha20-Poly1305 seal per write: roughly what a secure
channel and a muxer cost at the least, in Python, in this process.

    .venv/bin/python benchmarks/mesh_stream_bench.py --exchanges 2000
    .venv/bin/python benchmarks/mesh_stream_bench.py --exchanges 2000 --direct
    PYTHONPATH=/tmp/base .venv/bin/python benchmarks/mesh_stream_bench.py   # another tree

(Run it from a directory other than the checkout when PYTHONPATH names another tree.)
"""

from __future__ import annotations

import argparse
import functools
import os
import struct
import time

import trio

from helexa.mesh import MeshSettings, open_libp2p_mesh
from helexa.mesh.framing import FrameDecoder, encode_frame
from helexa.protocol import Cancel, decode, encode

PROTOCOL = "/helexa/bench-exchange/1"
ASK = (Cancel("r" * 400), Cancel("q" * 300))


async def exchanges(send, receive, n: int) -> tuple[float, float]:
    for _ in range(200):  # warm-up
        await send(*ASK)
        await receive()
        await receive()
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(n):
        await send(*ASK)
        await receive()
        await receive()
    return (time.perf_counter() - t0) / n, (time.process_time() - c0) / n


async def over_libp2p(n: int, muxer: str, cancelled_read: bool, direct: bool) -> tuple[float, float]:
    if muxer != "yamux":
        from helexa.mesh import libp2p_mesh

        libp2p_mesh.new_host = functools.partial(libp2p_mesh.new_host, muxer_preference=muxer.upper())
    # (``direct`` is a setting of trees after 2026-11-30; older ones have no channel.)
    settings = MeshSettings(direct=direct) if "direct" in MeshSettings.__dataclass_fields__ else MeshSettings()
    a, b = open_libp2p_mesh(os.urandom(32), settings), open_libp2p_mesh(os.urandom(32), settings)

    async def echo(stream):  # type: ignore[no-untyped-def]
        while True:
            first = await stream.receive(timeout=30)
            second = await stream.receive(timeout=30)
            if cancelled_read:
                async with trio.open_nursery() as watcher:
                    watcher.start_soon(functools.partial(stream.receive, timeout=float("inf")))
                    await trio.sleep(0)
                    watcher.cancel_scope.cancel()
            await stream.send(first, second)

    b.serve(PROTOCOL, echo)
    async with trio.open_nursery() as nursery:
        addrs = await nursery.start(b.run)
        await nursery.start(a.run)
        stream = await a.open_stream(await a.connect(addrs[0]), PROTOCOL)
        if direct and type(stream).__name__ != "DirectStream":
            raise SystemExit(f"asked for the direct channel, got a {type(stream).__name__}")
        result = await exchanges(stream.send, stream.receive, n)
        nursery.cancel_scope.cancel()
    return result


class _Sealed:
    """Framing + codec + one AEAD seal per write over a trio stream (the floor)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

        self._s, self._aead = stream, ChaCha20Poly1305(b"k" * 32)
        self._frames, self._buf, self._sent, self._got = FrameDecoder(1 << 20), bytearray(), 0, 0

    async def send(self, *msgs: object) -> None:
        self._sent += 1
        sealed = self._aead.encrypt(self._sent.to_bytes(12, "little"), b"".join(encode_frame(encode(m)) for m in msgs), None)
        await self._s.send_all(struct.pack("!H", len(sealed)) + sealed)

    async def receive(self) -> object:
        while (frame := self._frames.next_frame()) is None:
            self._buf += await self._s.receive_some(65536)
            while len(self._buf) >= 2 and len(self._buf) >= 2 + (size := struct.unpack("!H", self._buf[:2])[0]):
                self._got += 1
                self._frames.feed(self._aead.decrypt(self._got.to_bytes(12, "little"), bytes(self._buf[2:2 + size]), None))
                del self._buf[:2 + size]
        return decode(frame)


async def floor(n: int) -> tuple[float, float]:
    async def echo(raw: trio.SocketStream) -> None:
        s = _Sealed(raw)
        while True:
            first, second = await s.receive(), await s.receive()
            await s.send(first, second)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(functools.partial(trio.serve_tcp, echo, 0, host="127.0.0.1"))
        s = _Sealed(await trio.open_tcp_stream("127.0.0.1", listeners[0].socket.getsockname()[1]))
        result = await exchanges(s.send, s.receive, n)
        nursery.cancel_scope.cancel()
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--exchanges", type=int, default=2000)
    ap.add_argument("--muxer", choices=("yamux", "mplex"), default="yamux")
    ap.add_argument("--direct", action="store_true", help="over the mesh's direct channel")
    ap.add_argument("--floor", action="store_true", help="bare TCP + framing + one AEAD seal per write instead")
    ap.add_argument("--cancelled-read", action="store_true", help="the serving end starts and cancels a read each time")
    args = ap.parse_args()
    wall, cpu = trio.run(floor, args.exchanges) if args.floor else trio.run(over_libp2p, args.exchanges, args.muxer,
                                                                                       args.cancelled_read, args.direct)
    what = ("floor (TCP + framing + AEAD)" if args.floor else "direct channel" if args.direct
            else f"libp2p, {args.muxer}") + (
        ", a read cancelled per exchange" if args.cancelled_read else "")
    print(f"{what}: {args.exchanges} exchanges, per exchange: wall {wall * 1e3:.3f} ms, CPU {cpu * 1e3:.3f} ms "
          "(both ends)")


if __name__ == "__main__":
    main()
