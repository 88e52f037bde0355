"""One model served through a running cortex and neuron, checked as a client sees it.

For scripts/gpu_check.sh. Against the gateway, with the official ``openai`` client:

1. VRAM in use before the model is loaded (``nvidia-smi``; "n/a" without a GPU);
2. a first request, which cold-loads the model (its time is the load as a client waits it);
3. a stream, checked to arrive in several chunks ending with usage;
4. throughput: ``--rounds`` streams of ``--tokens`` tokens one after the other (greedy),
   then ``--concurrency`` at once, measured as in direct_bench.py;
5. cancellation: a long stream closed after a few chunks; the neuron must report nothing
   in flight soon after, and a short request must then be served promptly;
6. unload: the model's ``idle_ttl`` passes, the fleet shows it unloaded, and the VRAM in
   use falls by at least 90% of what the neuron reported the model holding.

Writes JSON (``--json``) and exits 1 if a check failed::

    python fabric_check.py --gateway http://127.0.0.1:18080 --model tiny-exl3 --json out.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import os
import threading
import time
from pathlib import Path
from typing import Any

import httpx
from openai import OpenAI

sys.path.insert(0, str(Path(__file__).resolve().parent))
from direct_bench import PROMPT, aggregate, summarise  # noqa: E402


def vram_used_mib() -> int | None:
    """Memory in use on GPU 0 as the driver sees it, or None without nvidia-smi."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
        return int(out.split()[0])
    except (subprocess.SubprocessError, ValueError, IndexError):
        return None


class Fabric:
    def __init__(self, gateway: str, model: str) -> None:
        self.gateway, self.model = gateway.rstrip("/"), model
        self.client = OpenAI(base_url=f"{self.gateway}/v1", api_key="unused", timeout=300, max_retries=0)

    def fleet_model(self) -> dict[str, Any]:
        """This model's status on the first neuron that has it (empty if none)."""
        token = os.environ.get("HELEXA_ADMIN_TOKEN", "")  # the admin API needs the cortex's admin token
        fleet = httpx.get(f"{self.gateway}/admin/fleet", headers={"authorization": f"Bearer {token}"},
                          timeout=10).json()
        for neuron in fleet.get("neurons", []):
            status = neuron.get("models", {}).get(self.model)
            if status is not None:
                return {**status, "neuron_in_flight": neuron.get("in_flight", 0)}
        return {}

    def stream(self, tokens: int, prompt: str = PROMPT) -> dict[str, float]:
        s = {"tokens": 0, "start": time.perf_counter(), "first": 0.0, "last": 0.0, "chunks": 0}
        stream = self.client.completions.create(model=self.model, prompt=prompt, max_tokens=tokens, temperature=0,
                                                stream=True, stream_options={"include_usage": True})
        for chunk in stream:
            now = time.perf_counter()
            if chunk.choices and chunk.choices[0].text:
                s["first"] = s["first"] or now
                s["last"] = now
                s["chunks"] += 1
            if chunk.usage is not None:
                s["tokens"] = chunk.usage.completion_tokens
        return s

    def concurrent(self, n: int, tokens: int) -> list[dict[str, float]]:
        results: list[dict[str, float]] = []
        errors: list[BaseException] = []

        def one() -> None:
            try:
                results.append(self.stream(tokens))
            except BaseException as exc:  # reported below, not lost in a thread
                errors.append(exc)

        threads = [threading.Thread(target=one) for _ in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return results

    def cancel(self, tokens: int, after_chunks: int = 4) -> dict[str, Any]:
        """Close a long stream after a few chunks; time until the neuron has nothing in flight."""
        stream = self.client.completions.create(model=self.model, prompt=PROMPT, max_tokens=tokens, temperature=0,
                                                stream=True)
        seen = 0
        for chunk in stream:
            if chunk.choices and chunk.choices[0].text:
                seen += 1
                if seen >= after_chunks:
                    break
        stream.close()
        closed = time.perf_counter()
        idle_after = None
        while time.perf_counter() - closed < 15:
            status = self.fleet_model()
            if status.get("in_flight", 0) == 0 and status.get("neuron_in_flight", 0) == 0:
                idle_after = time.perf_counter() - closed
                break
            time.sleep(0.02)
        short = self.stream(16)
        return {"chunks_read": seen, "requested_tokens": tokens, "idle_after_s": idle_after,
                "next_request_s": short["last"] - short["start"], "next_request_tokens": short["tokens"]}

    def short_request_s(self) -> float:
        s = self.stream(16)
        return s["last"] - s["start"]

    def wait_unloaded(self, timeout: float) -> float | None:
        start = time.perf_counter()
        while time.perf_counter() - start < timeout:
            if self.fleet_model().get("state") != "loaded":
                return time.perf_counter() - start
            time.sleep(0.25)
        return None


def check(args: argparse.Namespace, out: dict[str, Any]) -> None:
    """Run the checks in order, filling ``out``; a failed check appends to ``out["failures"]``."""
    fabric = Fabric(args.gateway, args.model)
    fail = out["failures"].append
    vram = vram_used_mib if args.vram else (lambda: None)
    out["vram_before_load_mib"] = vram()

    t0 = time.perf_counter()
    first = fabric.stream(32)
    out["cold_request_s"] = time.perf_counter() - t0
    status = fabric.fleet_model()
    out["memory_bytes"] = status.get("memory_bytes", 0)
    out["vram_loaded_mib"] = vram()
    if first["tokens"] != 32:
        fail(f"the first request got {first['tokens']} tokens, not 32")
    if first["chunks"] < 2:
        fail(f"the first request came in {first['chunks']} chunk(s): not streamed")

    single = [fabric.stream(args.tokens) for _ in range(args.rounds)]
    out["single"] = summarise(single)
    if any(s["tokens"] != args.tokens for s in single):
        fail(f"streams ended early: {[s['tokens'] for s in single]} of {args.tokens} tokens")
    out["concurrent"] = aggregate(fabric.concurrent(args.concurrency, args.tokens))

    # Cancellation. The neuron's in-flight count reaches the fleet view with its heartbeat
    # (1 s), so "idle after" is coarse; the sharper sign is the next request: had the
    # cancelled job gone on (thousands of tokens), a one-at-a-time engine would serve the
    # next request only after it, and a batching one more slowly.
    baseline = min(fabric.short_request_s() for _ in range(3))
    out["cancel"] = cancel = fabric.cancel(args.cancel_tokens)
    cancel["baseline_request_s"] = baseline
    if cancel["idle_after_s"] is None or cancel["idle_after_s"] > 2.5:
        fail(f"the neuron still ran the cancelled request {cancel['idle_after_s']} s after the client left")
    if cancel["next_request_tokens"] != 16:
        fail("the request after the cancel did not complete")
    elif cancel["next_request_s"] > 2 * baseline + 0.5:
        fail(f"the request after the cancel took {cancel['next_request_s']:.2f} s against {baseline:.2f} s before it")

    waited = fabric.wait_unloaded(args.unload_wait)
    out["unloaded_after_s"] = waited
    out["vram_unloaded_mib"] = vram()
    if waited is None:
        fail(f"the model was still loaded {args.unload_wait} s after its last use")
    loaded, unloaded = out["vram_loaded_mib"], out["vram_unloaded_mib"]
    if loaded is not None and unloaded is not None and out["memory_bytes"]:
        freed = (loaded - unloaded) * 2**20
        out["vram_freed_fraction"] = freed / out["memory_bytes"]
        if freed < 0.9 * out["memory_bytes"]:
            fail(f"unloading freed {loaded - unloaded} MiB of the {out['memory_bytes'] >> 20} MiB the model held")
    elif loaded is not None and not out["memory_bytes"]:
        fail("the neuron reported no memory for the loaded model")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gateway", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--cancel-tokens", type=int, default=3000)
    parser.add_argument("--unload-wait", type=float, default=60.0)
    parser.add_argument("--no-vram", dest="vram", action="store_false", help="skip the VRAM checks (no GPU model)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    out: dict[str, Any] = {"model": args.model, "tokens": args.tokens, "rounds": args.rounds, "failures": []}
    try:
        check(args, out)
    except Exception as exc:  # recorded with what was measured before it
        out["failures"].append(f"{type(exc).__name__}: {exc}")
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)
    return 1 if out["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
