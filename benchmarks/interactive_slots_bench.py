#!/usr/bin/env python3
"""What ``orchestrator.interactive_slots`` buys an interactive request behind bulk work.

A real cortex and neuron (SmolLM2 through llama.cpp, ``n_ctx = 4096``: two slots) with
two open loopback portals, ``bulk`` (``priority = "bulk"``) and ``chat`` (``priority =
"interactive"``). Three long bulk streams start (``--bulk-tokens`` each), then one second
later one short interactive stream; printed: each stream's time to its first token and to
its end, for each ``interactive_slots`` value given, one cortex each.

Usage (under the benchmark lock)::

    flock /tmp/helexa-bench.lock .venv/bin/python benchmarks/interactive_slots_bench.py [--held 0,1]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests" / "e2e"), str(ROOT / "tests")]

import openai  # noqa: E402
from procs import ProcGroup  # noqa: E402

MODEL = "smollm2-135m-instruct"
PROMPT = [{"role": "user", "content": "Write a long story about a dragon."}]


def run(held: int, bulk_tokens: int, workdir: Path) -> dict[str, tuple[float, float]]:
    config = f"""
[orchestrator]
interactive_slots = {held}
[portals.bulk]
listen = ["127.0.0.1:0"]
priority = "bulk"
[portals.chat]
listen = ["127.0.0.1:0"]
priority = "interactive"
"""
    with ProcGroup(workdir) as procs:
        cortex = procs.cortex(models=(ROOT / "examples" / "models.toml").read_text(), config=config)
        procs.neuron(cortex, "n1")

        def client(portal: str) -> openai.OpenAI:
            return openai.OpenAI(base_url=cortex.portal_urls[portal][0] + "/v1", api_key="unused", max_retries=0,
                                 timeout=300)

        client("chat").chat.completions.create(model=MODEL, messages=PROMPT, max_tokens=2)  # loaded
        out: dict[str, tuple[float, float]] = {}

        def stream(name: str, portal: str, tokens: int) -> None:
            t0, first = time.monotonic(), None
            for chunk in client(portal).chat.completions.create(model=MODEL, messages=PROMPT, max_tokens=tokens,
                                                                stream=True):
                if first is None and chunk.choices and chunk.choices[0].delta.content:
                    first = time.monotonic() - t0
            out[name] = (first if first is not None else float("nan"), time.monotonic() - t0)

        threads = [threading.Thread(target=stream, args=(f"bulk{i}", "bulk", bulk_tokens)) for i in range(3)]
        for th in threads:
            th.start()
            time.sleep(0.1)
        time.sleep(1.0)
        stream("interactive", "chat", 20)
        for th in threads:
            th.join()
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--held", default="0,1", help="interactive_slots values, one cortex each")
    ap.add_argument("--bulk-tokens", type=int, default=400)
    a = ap.parse_args()
    print("| interactive_slots | interactive: first token s | interactive: end s | bulk streams: first tokens s "
          "| the last bulk stream's end s |")
    print("|---:|---:|---:|---|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for held in (int(h) for h in a.held.split(",")):
            r = run(held, a.bulk_tokens, Path(tmp) / f"held{held}")
            chat = r["interactive"]
            bulk = [r[f"bulk{i}"] for i in range(3)]
            print(f"| {held} | {chat[0]:.2f} | {chat[1]:.2f} | {', '.join(f'{b[0]:.2f}' for b in bulk)} "
                  f"| {max(b[1] for b in bulk):.2f} |", flush=True)


if __name__ == "__main__":
    main()
