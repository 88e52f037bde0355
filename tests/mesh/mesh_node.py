"""A cortex-like mesh node in its own process, driven over stdin/stdout (JSON lines).

Launched by the cross-process tests and the benchmark with ``sys.executable`` and this
file's path. Prints ``{"event": "ready", "peer_id", "addrs"}`` once up, then answers each
command line ``{"id", "op", ...}`` with ``{"id", ...}`` (commands run concurrently).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from contextlib import aclosing, asynccontextmanager
from pathlib import Path

import trio

from helexa.identity import load_or_create
from helexa.mesh import MeshSettings, open_libp2p_mesh, record_addrs
from helexa.protocol import GenerateRequest, GenerateResult, Task, TokenChunk, Usage
from helexa.protocol.federation import OfferedModel
from helexa.roles.cortex.federation import FederationError
from helexa.roles.cortex.federation.ledger import Ledger
from helexa.roles.cortex.federation.service import Federation, FederationSettings

TEST_TOPIC = "helexa/test"


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--data-dir", type=Path, required=True)
    p.add_argument("--listen", default="/ip4/127.0.0.1/tcp/0")
    p.add_argument("--bootstrap", action="append", default=[])
    p.add_argument("--operator", default="op")
    p.add_argument("--federation", action="store_true", help="run the Federation service")
    p.add_argument("--serve", action="store_true", help="offer the model 'tiny' from a fake fleet")
    p.add_argument("--tokens", type=int, default=3)
    p.add_argument("--token-delay", type=float, default=0.0)
    p.add_argument("--announce-interval", type=float, default=1.0)
    p.add_argument("--gossip-per-peer", type=float, default=50.0, help="new messages/s a neighbour may forward")
    p.add_argument("--gossip-burst", type=int, default=200)
    # The cortex's own switch (``[mesh] direct``), so one variable runs a suite either way.
    p.add_argument("--direct", action=argparse.BooleanOptionalAction,
                   default=os.environ.get("HELEXA_MESH__DIRECT", "true").lower() not in ("0", "false", "no", "off"))
    return p.parse_args()


class Node:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.identity = load_or_create(args.data_dir / "identity.key")
        self.mesh = open_libp2p_mesh(self.identity.seed, MeshSettings(
            listen=args.listen, bootstrap=tuple(args.bootstrap), gossip_per_peer_per_second=args.gossip_per_peer,
            gossip_per_peer_burst=args.gossip_burst, direct=args.direct))
        self.messages = trio.open_memory_channel[dict](1000)
        self.out_lock = trio.Lock()
        self.fed: Federation | None = None
        self.received: dict[str, int] = {}

    @asynccontextmanager
    async def serve_local(self, request: GenerateRequest):
        async def frames():
            for i in range(self.args.tokens):
                if self.args.token_delay:
                    await trio.sleep(self.args.token_delay)
                yield TokenChunk(request.request_id, f"tok{i} ")
            yield GenerateResult(request.request_id, "stop", Usage(5, self.args.tokens))

        gen = frames()
        try:
            yield gen
        finally:
            await gen.aclose()

    async def write(self, obj: dict) -> None:
        async with self.out_lock:
            sys.stdout.write(json.dumps(obj) + "\n")
            sys.stdout.flush()

    async def listen_test_topic(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        sub = self.mesh.subscribe(TEST_TOPIC, lambda origin, data: not data.startswith(b"bad"))
        task_status.started()
        async with aclosing(sub):
            async for m in sub:
                self.received[m.origin] = self.received.get(m.origin, 0) + 1
                await self.messages[0].send({"origin": m.origin, "data": m.data.hex(), "t": time.time()})

    async def command(self, cmd: dict) -> None:
        reply: dict = {"id": cmd["id"]}
        try:
            reply.update(await self.run_op(cmd))
        except Exception as exc:
            reply["error"] = f"{type(exc).__name__}: {exc}"
        await self.write(reply)

    async def run_op(self, cmd: dict) -> dict:
        op = cmd["op"]
        timeout = cmd.get("timeout", 10)
        if op == "peers":
            return {"peers": self.mesh.peers()}
        if op == "wait_peers":
            with trio.fail_after(timeout):
                while not set(cmd["peers"]) <= set(self.mesh.peers()):
                    await trio.sleep(0.05)
            return {"peers": self.mesh.peers(), "t": time.time()}
        if op == "publish":
            await self.mesh.announce(TEST_TOPIC, bytes.fromhex(cmd["data"]))
            return {"t": time.time()}
        if op == "flood":
            for i in range(cmd["n"]):
                await self.mesh.announce(TEST_TOPIC, b"flood %d" % i)
                await trio.sleep(cmd.get("interval", 0))
            return {"t": time.time()}
        if op == "gossip_state":
            return {"dropped": self.mesh.gossip_limit.dropped,
                    "scores": {p: self.mesh.gossip_score(p, TEST_TOPIC) for p in self.mesh.peers()},
                    "received": self.received}
        if op == "next_message":
            with trio.fail_after(timeout):
                return await self.messages[1].receive()
        assert self.fed is not None, "run with --federation"
        if op == "wait_route":
            with trio.fail_after(timeout):
                while not self.fed.can_route(cmd["model"]):
                    await trio.sleep(0.05)
            return {}
        if op == "route":
            req = GenerateRequest(cmd["rid"], cmd["model"], Task.CHAT, messages=({"role": "user", "content": "hi"},),
                                  stream=cmd.get("stream", True))
            texts, peer, error = [], None, None
            t0 = time.perf_counter()
            try:
                async with self.fed.route(req) as frames:
                    peer = frames.peer_id
                    async for f in frames:
                        if isinstance(f, TokenChunk):
                            texts.append(f.text)
                        else:
                            texts.append(f"<{f.finish_reason}>")
            except FederationError as exc:
                error = f"{type(exc).__name__}: {exc}"
            return {"texts": texts, "peer": peer, "error_kind": error, "s": time.perf_counter() - t0}
        if op == "ledger":
            entries = await trio.to_thread.run_sync(self.fed.ledger.entries)
            return {"entries": [{"direction": e.direction, "request_id": e.receipt.request_id,
                                 "peer": e.peer_id, "flagged": e.flagged, "reason": e.flag_reason,
                                 "completion": e.receipt.completion_tokens, "outcome": e.receipt.outcome,
                                 "signature": e.receipt.signature.hex()} for e in entries]}
        raise ValueError(f"unknown op {op!r}")

    async def main(self) -> None:
        async with trio.open_nursery() as nursery:
            addrs = await nursery.start(self.mesh.run)
            record_addrs(self.args.data_dir, self.mesh.peer_id, addrs)
            await nursery.start(self.listen_test_topic)
            if self.args.federation:
                offer = [OfferedModel("tiny", True, price_input=1.0, price_output=2.0)] if self.args.serve else []
                self.fed = Federation(
                    mesh=self.mesh, identity=self.identity, operator=self.args.operator,
                    ledger=Ledger(self.args.data_dir / "ledger.sqlite"), offer_fn=lambda: offer,
                    serve_generate=self.serve_local if self.args.serve else None,
                    settings=FederationSettings(announce_interval=self.args.announce_interval))
                await nursery.start(self.fed.run)
            await self.write({"event": "ready", "peer_id": self.mesh.peer_id, "addrs": addrs})
            stdin = trio.lowlevel.FdStream(0)
            buf = b""
            async for data in stdin:
                buf += data
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    nursery.start_soon(self.command, json.loads(line))
            nursery.cancel_scope.cancel()


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    trio.run(Node(parse()).main)
