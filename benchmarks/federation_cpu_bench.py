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

import argparse
import cProfile
import os
import pstats
import subprocess
import sys
import tempfile
import time
from contextlib import asynccontextmanager


def measure(requests: int, blocks: int) -> None:
    import trio
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    import helexa
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
            per = []
            for _ in range(blocks):
                t0 = time.process_time()
                for _ in range(requests):
                    await one()
                per.append((time.process_time() - t0) / requests * 1e6)
            profile = cProfile.Profile()
            profile.enable()
            for _ in range(requests):
                await one()
            profile.disable()
            calls = sum(v[1] for v in pstats.Stats(profile).stats.values())
            per.sort()
            print(f"{os.path.dirname(os.path.dirname(helexa.__file__))}: {per[0]:.0f} us/request best, "
                  f"{per[len(per) // 2]:.0f} median; {calls / requests:.0f} Python calls/request", flush=True)
            nursery.cancel_scope.cancel()

    trio.run(main)


_FROM_SRC = """\
import sys
src = sys.argv.pop(1)
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f)]  # the checkout's import hook
sys.path.insert(0, src)
sys.argv[0] = {script!r}
exec(compile(open({script!r}).read(), {script!r}, "exec"), {{"__name__": "__main__", "__file__": {script!r}}})
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=2000, help="requests per block")
    ap.add_argument("--blocks", type=int, default=5)
    ap.add_argument("--src", action="append", default=[], help="another source tree (repeatable)")
    a = ap.parse_args()
    if not a.src:
        measure(a.requests, a.blocks)
        return
    here = os.path.abspath(__file__)
    for order in (a.src, a.src[::-1]):
        for src in order:
            subprocess.run([sys.executable, "-c", _FROM_SRC.format(script=here), os.path.abspath(src),
                            "--requests", str(a.requests), "--blocks", str(a.blocks)], check=True)


if __name__ == "__main__":
    main()
