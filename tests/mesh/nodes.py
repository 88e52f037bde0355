"""Drive ``mesh_node.py`` processes from trio tests (and the benchmark)."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import trio

SCRIPT = Path(__file__).with_name("mesh_node.py")
ROOT = Path(__file__).resolve().parents[2]


class NodeProcess:
    def __init__(self, proc: trio.Process, data_dir: Path) -> None:
        self.proc = proc
        self.data_dir = data_dir
        self.peer_id = ""
        self.addrs: list[str] = []
        self._ids = itertools.count()
        self._waiting: dict[int, trio.MemorySendChannel] = {}
        self._ready = trio.Event()

    @classmethod
    async def start(cls, nursery: trio.Nursery, data_dir: Path, *args: str, timeout: float = 30) -> "NodeProcess":
        data_dir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        stderr = open(data_dir / "stderr.log", "ab")
        cmd = [sys.executable, str(SCRIPT), "--data-dir", str(data_dir), *args]
        proc = await nursery.start(partial(trio.run_process, cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                           stderr=stderr, check=False, env=env))
        node = cls(proc, data_dir)
        nursery.start_soon(node._read)
        with trio.fail_after(timeout):
            await node._ready.wait()
        return node

    async def _read(self) -> None:
        buf = b""
        async for data in self.proc.stdout:
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                msg = json.loads(line)
                if msg.get("event") == "ready":
                    self.peer_id, self.addrs = msg["peer_id"], msg["addrs"]
                    self._ready.set()
                elif msg.get("id") in self._waiting:
                    self._waiting.pop(msg["id"]).send_nowait(msg)
        for chan in self._waiting.values():
            chan.close()

    async def call(self, op: str, timeout: float = 30, **kw) -> dict:
        """Run a command in the node; raises RuntimeError with the node's error."""
        cid = next(self._ids)
        send, recv = trio.open_memory_channel(1)
        self._waiting[cid] = send
        await self.proc.stdin.send_all((json.dumps({"id": cid, "op": op, **kw}) + "\n").encode())
        with trio.fail_after(timeout):
            try:
                reply = await recv.receive()
            except trio.EndOfChannel:
                raise RuntimeError(f"node {self.peer_id} exited") from None
        if "error" in reply:
            raise RuntimeError(reply["error"])
        return reply

    def kill(self) -> None:
        self.proc.kill()

    async def stop(self) -> None:
        if self.proc.returncode is None:
            self.proc.terminate()
            with trio.move_on_after(5):
                await self.proc.wait()
            if self.proc.returncode is None:
                self.proc.kill()
