#!/usr/bin/env python3
"""The federation's own CPU per federated request, both cortexes in one process.

Two :class:`~helexa.roles.cortex.federation.service.Federation` services (asker A and
server B, each with its identity and an on-disk ledger) over the in-memory mesh, B's
local handler answering one token at once: what is left is the federation's own work on
both sides (hello and request frames, admission, the answer, the receipt signed, sent,
verified and recorded twice) without gateways, neurons or a transport. Requests run one
at a time, in blocks; prints process CPU per request (best and median block) and Python
calls per request (one profiled block: the firm figure on a loaded machine).
Usage::

    python benchmarks/federation_cpu_bench.py [--requests 2000] [--blocks 5] [--src TREE ...]

``--src`` runs the same in another source tree (``git archive OLD helexa | tar -x -C
/tmp/old``), each tree twice in alternating order, for a before/after in one run.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import asynccontextmanager

from cpu_per_request import main, report


def measure(requests: int, blocks: int) -> None:
    import trio
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from helexa.identity import Identity
    from helexa.mesh import MemoryMesh, MemoryNetwork, peer_id_from_ed25519
    from helexa.protocol import GenerateRequest, GenerateResult, Task, TokenChunk, Usage
    from helexa.protocol.federation import OfferedModel
    from helexa.roles.cortex.federation import ServePolicy
    from helexa.roles.cortex.federation.ledger import Ledger
    from helexa.roles.cortex.federation.service import Federation, FederationSettings

    model = OfferedModel("m", warm=True, price_input=1.0, price_output=2.0)

    @asynccontextmanager
    async def serve(request):  # type: ignore[no-untyped-def]
        async def frames():  # type: ignore[no-untyped-def]
            yield TokenChunk(request.request_id, "x")
            yield GenerateResult(request.request_id, "stop", Usage(7, 1))

        gen = frames()
        try:
            yield gen
        finally:
            await gen.aclose()

    async def main() -> None:
        net = MemoryNetwork()
        work = tempfile.mkdtemp(prefix="helexa-fedcpu-")
        async with trio.open_nursery() as nursery:
            feds = []
            for name, handler in (("b", serve), ("a", None)):
                ident = Identity(Ed25519PrivateKey.generate())
                mesh = MemoryMesh(net, peer_id_from_ed25519(ident.public_bytes), timeout=5)
                await nursery.start(mesh.run)
                fed = Federation(
                    mesh=mesh, identity=ident, operator=f"op-{name}", ledger=Ledger(os.path.join(work, f"{name}.sqlite")),
                    offer_fn=lambda: [model], serve_generate=handler,
                    serve_policy=ServePolicy(rate_per_second=1e9, burst=10**9),
                    settings=FederationSettings(announce_interval=0.2))
                await nursery.start(fed.run)
                feds.append(fed)
            a = feds[1]
            while not a.can_route("m"):
                await trio.sleep(0.05)
            n = 0

            async def one() -> None:
                nonlocal n
                n += 1
                request = GenerateRequest(f"req-{n:08d}", "m", Task.CHAT, messages=({"role": "user", "content": "hi"},))
                async with a.route(request) as frames:
                    async for _ in frames:
                        pass

            for _ in range(200):
                await one()  # warm-up: the stream, caches
            await report(one, requests, blocks)
            nursery.cancel_scope.cancel()

    trio.run(main)


if __name__ == "__main__":
    main(__file__, __doc__, measure, requests=2000)
