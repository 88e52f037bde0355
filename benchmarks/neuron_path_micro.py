#!/usr/bin/env python3
"""The micro-costs of a neuron's request path, one process per source tree, interleaved.

For each tree (``--src``, repeatable; the checkout itself when none is given), in a fresh
interpreter that imports ``helexa`` from that tree: the process CPU microseconds (best of
5 blocks) and Python calls (``cProfile``) of

* ``decode`` of the benchmark's ``GenerateRequest`` frame (what the neuron does per request),
* ``encode`` of a 16-token ``GenerateResult`` (the neuron's answer) and its ``decode`` (the cortex's),
* ``openai_shapes.validate`` (every backend, per request),
* a ``http1.ResponseReader`` over uvicorn's four-header answer (the proxy path, per request),
* the synthetic backend's whole non-streaming answer of 16 tokens, inside ``trio.run``.

Each tree runs ``--runs`` times, alternating; compare the lowest figures. Usage::

    for c in OLD NEW; do mkdir -p /tmp/t-$c && git archive $c | tar -x -C /tmp/t-$c; done
    flock /tmp/helexa-bench.lock .venv/bin/python benchmarks/neuron_path_micro.py --src /tmp/t-OLD --src /tmp/t-NEW
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path


def measure() -> str:
    import cProfile
    import pstats
    import time

    import trio

    import helexa
    from helexa.protocol import (Feature, GenerateRequest, GenerateResult, ModelConfig, SamplingParams, Task, Usage,
                                 decode, encode)
    from helexa.runtime import http1, openai_shapes
    from helexa.runtime.synthetic import SyntheticBackend

    req = GenerateRequest("a" * 32, "synth", Task.CHAT, messages=({"role": "user", "content": "Say hello"},),
                          sampling=SamplingParams(max_tokens=16), stream=False)
    res = GenerateResult("a" * 32, "stop", Usage(prompt_tokens=8, completion_tokens=16), text="tok " * 16)
    frame_req, frame_res = encode(req), encode(res)
    head = (b"HTTP/1.1 200 OK\r\ndate: Mon, 30 Nov 2026 21:00:00 GMT\r\nserver: uvicorn\r\ncontent-length: 5\r\n"
            b"content-type: application/json\r\n\r\nhello")
    features = frozenset({Feature.LOGPROBS})

    def http_once() -> None:
        reader = http1.ResponseReader()
        reader.start()
        reader.feed(head)
        reader.head()
        reader.body()

    def one(label: str, f, n: int = 5000) -> str:  # noqa: ANN001
        best = 1e9
        for _ in range(5):
            t0 = time.process_time()
            for _ in range(n):
                f()
            best = min(best, (time.process_time() - t0) / n * 1e6)
        profile = cProfile.Profile()
        profile.enable()
        for _ in range(500):
            f()
        profile.disable()
        calls = sum(v[1] for v in pstats.Stats(profile).stats.values()) / 500  # type: ignore[attr-defined]
        return f"{label} {best:.2f} us / {calls:.0f} calls"

    async def synthetic(n: int) -> float:
        backend = SyntheticBackend(ModelConfig("synth", "synthetic", metadata={"tokens": 64}))
        await backend.load(lambda *a: None)
        best = 1e9
        for _ in range(5):
            t0 = time.process_time()
            for _ in range(n):
                async for _event in backend.chat(req):
                    pass
            best = min(best, (time.process_time() - t0) / n * 1e6)
        return best

    out = [str(Path(helexa.__file__).parent.parent),
           one("decode GenerateRequest", lambda: decode(frame_req)),
           one("encode GenerateResult", lambda: encode(res)),
           one("decode GenerateResult", lambda: decode(frame_res)),
           one("validate", lambda: openai_shapes.validate(req, features=features)),
           one("http1 head+body", http_once),
           f"synthetic answer {trio.run(synthetic, 3000):.2f} us"]
    return " | ".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--src", action="append", default=[], help="a source tree (repeatable)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # a child: measure this interpreter's helexa
    a = ap.parse_args()
    if a.one:
        print(measure(), flush=True)
        return
    trees = a.src or [str(Path(__file__).resolve().parent.parent)]
    for _ in range(a.runs):
        for tree in trees:
            # PYTHONPATH comes before the editable install's finder: helexa is imported from the tree.
            subprocess.run([sys.executable, __file__, "--one"], env={**os.environ, "PYTHONPATH": tree}, check=True)


if __name__ == "__main__":
    main()
