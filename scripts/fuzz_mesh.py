#!/usr/bin/env python3
"""Fuzz the mesh's federated request streams: generated hostile frames
(``tests/control/frames.py``, every message kind, federation ones included) at a serving
cortex's federation handler, as a stream's first frame, as the request after a valid
``FederatedHello``, and in the middle of an answer being streamed. A bystander peer asks
for real answers all along. The target: 0 tracebacks in the logs, every hostile stream
refused, reset or ended, the bystander served every time.

    .venv/bin/python scripts/fuzz_mesh.py                       # 100,000 frames
    .venv/bin/python scripts/fuzz_mesh.py --frames 20000 --concurrency 32

Runs in this process over the in-memory mesh (every frame still goes through the varint
framing and the codec, as on libp2p; the libp2p transport under it has its own tests).
The serving policy's per-peer rate limits are raised so that every frame reaches the
decoder. Prints JSON; exits 1 when the target is missed.
"""

from __future__ import annotations

import random
import sys
from contextlib import asynccontextmanager
from pathlib import Path

import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "control"), str(ROOT / "scripts")]

from fuzz_driver import Tracebacks, main, rates, run_frames  # noqa: E402

from helexa.identity import Identity  # noqa: E402
from helexa.mesh import MemoryMesh, MemoryNetwork, StreamClosed, StreamTimeout, peer_id_from_ed25519  # noqa: E402
from helexa.mesh.framing import encode_frame  # noqa: E402
from helexa.protocol import GenerateRequest, GenerateResult, ProtocolError, Task, TokenChunk, Usage  # noqa: E402
from helexa.protocol.federation import FEDERATION_PROTOCOL, FederatedHello, OfferedModel  # noqa: E402
from helexa.roles.cortex.federation import ServePolicy  # noqa: E402
from helexa.roles.cortex.federation.ledger import Ledger  # noqa: E402
from helexa.roles.cortex.federation.service import Federation, FederationSettings  # noqa: E402

MODEL = OfferedModel("tiny", warm=True, price_input=1.0, price_output=2.0)
STAGES = ("first", "request", "streaming")


@asynccontextmanager
async def tokens(request: GenerateRequest):
    async def frames():
        for i in range(20):
            await trio.sleep(0.005)
            yield TokenChunk(request.request_id, f"t{i} ")
        yield GenerateResult(request.request_id, "stop", Usage(3, 20))

    gen = frames()
    try:
        yield gen
    finally:
        await gen.aclose()


def request(rid: str) -> GenerateRequest:
    return GenerateRequest(rid, "tiny", Task.CHAT, messages=({"role": "user", "content": "hi"},))


async def one(mesh: MemoryMesh, server: str, stage: str, data: bytes, rid: str) -> str:
    try:
        stream = await mesh.open_stream(server, FEDERATION_PROTOCOL, timeout=5)
    except Exception as exc:  # noqa: BLE001
        return f"open failed: {type(exc).__name__}"
    try:
        with trio.fail_after(15):
            if stage != "first":
                await stream.send(FederatedHello("fuzzer", rid))
            if stage == "streaming":
                await stream.send(request(rid))
                await stream.receive()  # the answer has begun
            # Raw bytes, framed as on the wire: the codec must judge them, not our encoder.
            await stream._write_raw(encode_frame(data))  # noqa: SLF001
            while True:
                msg = await stream.receive(timeout=7)  # the server's handshake deadline is 5 s
                if isinstance(msg, GenerateResult):
                    return "answered to the end"
                if not isinstance(msg, TokenChunk):
                    return f"got {type(msg).__name__}"
    except (StreamClosed, ProtocolError) as exc:
        return f"ended: {type(exc).__name__}"
    except (StreamTimeout, trio.TooSlowError):
        return "no answer in 7 s"
    finally:
        with trio.move_on_after(1):
            await stream.reset()


async def fuzz(frames: int, concurrency: int = 32, seed: int = 0, *, log_every: int = 0) -> dict:
    rng = random.Random(seed)
    served = failed = 0
    with Tracebacks().catching("helexa") as catcher:
        network = MemoryNetwork()
        async with trio.open_nursery() as nursery:
            ident = Identity(Ed25519PrivateKey.generate())
            server_mesh = MemoryMesh(network, peer_id_from_ed25519(ident.public_bytes), timeout=5)
            await nursery.start(server_mesh.run)
            server = Federation(
                mesh=server_mesh, identity=ident, operator="server", ledger=Ledger(":memory:"),
                offer_fn=lambda: [MODEL], serve_generate=tokens, serve_embed=None,
                serve_policy=ServePolicy(rate_per_second=1e6, burst=10**6, max_concurrent_per_peer=10**6),
                settings=FederationSettings(announce_interval=0.5))
            await nursery.start(server.run)
            fuzzer = MemoryMesh(network, "fuzzer-peer", timeout=5)
            await nursery.start(fuzzer.run)
            bident = Identity(Ed25519PrivateKey.generate())
            bmesh = MemoryMesh(network, peer_id_from_ed25519(bident.public_bytes), timeout=5)
            await nursery.start(bmesh.run)
            bystander = Federation(mesh=bmesh, identity=bident, operator="bystander", ledger=Ledger(":memory:"),
                                   offer_fn=lambda: [], settings=FederationSettings(announce_interval=0.5))
            await nursery.start(bystander.run)
            with trio.fail_after(10):
                while not bystander.can_route("tiny"):
                    await trio.sleep(0.05)
            done = trio.Event()

            async def ask() -> None:
                nonlocal served, failed
                i = 0
                while not done.is_set():
                    i += 1
                    try:
                        async with bystander.route(request(f"b{i}")) as answer:
                            async for _ in answer:
                                pass
                        served += 1
                    except Exception:  # noqa: BLE001
                        failed += 1
                    await trio.sleep(0.05)

            nursery.start_soon(ask)
            outcomes, took = await run_frames(
                lambda i, stage, data: one(fuzzer, server_mesh.peer_id, stage, data, f"f{i}"),
                frames=frames, stages=STAGES, concurrency=concurrency, rng=rng, log_every=log_every)
            done.set()
            await trio.sleep(0.2)
            nursery.cancel_scope.cancel()
    report = {**rates(frames, took, outcomes, catcher), "bystander_served": served, "bystander_failed": failed}
    report["ok"] = (report["tracebacks"] == 0 and failed == 0 and served > 0
                    and not any("no answer" in k or "open failed" in k for k in outcomes))
    return report


if __name__ == "__main__":
    sys.exit(main(__doc__, fuzz))
