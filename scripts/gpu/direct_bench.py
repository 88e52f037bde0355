"""Tokens per second of an ExLlama model without the fabric, for scripts/gpu_check.sh.

Two ways, in one process one after the other, with the same model, settings, prompt and
greedy sampling as the neuron gets:

* ``library``: the engine's own dynamic generator, called directly (the baseline);
* ``backend``: helexa's backend in-process (its generator thread and trio streaming).

Each runs a warm-up, then ``--rounds`` single streams of ``--tokens`` tokens, then one
round of ``--concurrency`` streams at once. A stream's decode rate is (tokens - 1) / (time
from its first token to its last); its end-to-end rate counts the prompt too. Prints and
writes JSON (``--json``)::

    python direct_bench.py exllamav3 MODEL_DIR --metadata '{"cache_tokens": 65536}' --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

PROMPT = "Once upon a time"


def summarise(streams: list[dict[str, float]]) -> dict[str, Any]:
    """Medians over ``streams`` (each: tokens, start, first, last)."""
    decode = [(s["tokens"] - 1) / (s["last"] - s["first"]) for s in streams if s["tokens"] > 1 and s["last"] > s["first"]]
    e2e = [s["tokens"] / (s["last"] - s["start"]) for s in streams if s["last"] > s["start"]]
    return {
        "streams": len(streams),
        "tokens": [int(s["tokens"]) for s in streams],
        "decode_tps": statistics.median(decode) if decode else None,
        "e2e_tps": statistics.median(e2e) if e2e else None,
        "ttft_ms": statistics.median((s["first"] - s["start"]) * 1e3 for s in streams) if streams else None,
    }


def aggregate(streams: list[dict[str, float]]) -> dict[str, Any]:
    """One round of concurrent streams: total tokens over the round's wall time."""
    start, end = min(s["start"] for s in streams), max(s["last"] for s in streams)
    total = sum(s["tokens"] for s in streams)
    return {"streams": len(streams), "tokens": int(total), "aggregate_tps": total / (end - start) if end > start else None}


# --- the engines' own generators -----------------------------------------------------------


def library_v2(path: Path, md: dict[str, Any]) -> tuple[Any, Any]:
    """Load like helexa's backend does; returns (run(n_jobs) -> streams, free())."""
    import exllamav2
    import torch
    from exllamav2 import attn
    from exllamav2.generator import ExLlamaV2DynamicGenerator, ExLlamaV2DynamicJob, ExLlamaV2Sampler

    config = exllamav2.ExLlamaV2Config(str(path))
    if md.get("max_seq_len"):
        config.max_seq_len = int(md["max_seq_len"])
    model = exllamav2.ExLlamaV2(config)
    cache = exllamav2.ExLlamaV2Cache(model, max_seq_len=config.max_seq_len, lazy=True)
    model.load_autosplit(cache)
    tokenizer = exllamav2.ExLlamaV2Tokenizer(config)
    paged = bool(attn.has_flash_attn_with_paged)
    generator = ExLlamaV2DynamicGenerator(model=model, cache=cache, tokenizer=tokenizer,
                                          max_batch_size=int(md.get("max_batch_size", 16)) if paged else 1, paged=paged)
    settings = ExLlamaV2Sampler.Settings.greedy()
    ids = tokenizer.encode(PROMPT, encode_special_tokens=True)
    stops = [tokenizer.eos_token_id]

    def run(n_jobs: int, tokens: int) -> list[dict[str, float]]:
        jobs = [ExLlamaV2DynamicJob(input_ids=ids, max_new_tokens=tokens, gen_settings=settings, stop_conditions=stops,
                                    identifier=i) for i in range(n_jobs)]
        return _drive(generator, jobs)

    def free() -> None:
        model.unload()
        gc.collect()
        torch.cuda.empty_cache()

    return run, free


def library_v3(path: Path, md: dict[str, Any]) -> tuple[Any, Any]:
    import exllamav3
    import torch
    from exllamav3.generator.sampler import ComboSampler

    batch, chunk = int(md.get("max_batch_size", 16)), int(md.get("max_chunk_size", 2048))
    config = exllamav3.Config.from_directory(str(path))
    model = exllamav3.Model.from_config(config)
    cache = exllamav3.Cache(model, max_num_tokens=int(md.get("cache_tokens", 8192)), max_batch_size=batch)
    model.load(max_chunk_size=chunk, max_batch_size=batch)
    if md.get("warmup", True):
        model.warmup(cache=cache, max_chunk_size=chunk, max_batch_size=min(batch, 8))
    tokenizer = exllamav3.Tokenizer.from_config(config)
    generator = exllamav3.Generator(model=model, cache=cache, tokenizer=tokenizer, max_batch_size=batch, max_chunk_size=chunk)
    ids = tokenizer.encode(PROMPT, encode_special_tokens=True)
    stops = list(dict.fromkeys(config.eos_token_id_list))

    def run(n_jobs: int, tokens: int) -> list[dict[str, float]]:
        jobs = [exllamav3.Job(input_ids=ids, max_new_tokens=tokens, sampler=ComboSampler(temperature=0.0),
                              stop_conditions=stops, identifier=i) for i in range(n_jobs)]
        return _drive(generator, jobs)

    def free() -> None:
        generator.close()
        model.unload()
        gc.collect()
        torch.cuda.empty_cache()

    return run, free


def _drive(generator: Any, jobs: list[Any]) -> list[dict[str, float]]:
    start = time.perf_counter()
    streams = {job.identifier: {"tokens": 0, "start": start, "first": 0.0, "last": 0.0} for job in jobs}
    generator.enqueue(jobs)
    while generator.num_remaining_jobs():
        for result in generator.iterate():
            if result.get("stage") != "streaming":
                continue
            s, now = streams[result["identifier"]], time.perf_counter()
            if result.get("text") or result.get("token_ids") is not None:
                s["first"] = s["first"] or now
                s["last"] = now
            if result.get("eos"):
                s["tokens"] = result["new_tokens"]
    return list(streams.values())


# --- helexa's backend in-process -----------------------------------------------------------


def backend_run(kind: str, path: Path, md: dict[str, Any], tokens: int, rounds: int, concurrency: int) -> dict[str, Any]:
    import trio

    from helexa.protocol import GenerateRequest, GenerateResult, ModelConfig, SamplingParams, Task, TokenChunk
    from helexa.runtime import create_backend

    async def one(backend, n: int, tag: str) -> dict[str, float]:
        request = GenerateRequest(tag, "m", Task.COMPLETION, prompt=PROMPT,
                                  sampling=SamplingParams(max_tokens=n, temperature=0.0))
        s = {"tokens": 0, "start": time.perf_counter(), "first": 0.0, "last": 0.0}
        async with contextlib.aclosing(backend.complete(request)) as events:
            async for event in events:
                now = time.perf_counter()
                if isinstance(event, TokenChunk):
                    s["first"] = s["first"] or now
                    s["last"] = now
                elif isinstance(event, GenerateResult):
                    s["tokens"] = event.usage.completion_tokens
        return s

    async def main() -> dict[str, Any]:
        backend = create_backend(ModelConfig("m", kind, metadata={**md, "path": str(path)}))
        t0 = time.perf_counter()
        await backend.load(lambda *args: None)
        load_s = time.perf_counter() - t0
        try:
            await one(backend, 32, "warmup")
            single = [await one(backend, tokens, f"r{i}") for i in range(rounds)]
            together: list[dict[str, float]] = []

            async def add(i: int) -> None:
                together.append(await one(backend, tokens, f"c{i}"))

            async with trio.open_nursery() as nursery:
                for i in range(concurrency):
                    nursery.start_soon(add, i)
            return {"load_s": load_s, "memory_bytes": backend.memory_bytes(), "single": summarise(single),
                    "concurrent": aggregate(together)}
        finally:
            await backend.unload()

    return trio.run(main)


def library_run(kind: str, path: Path, md: dict[str, Any], tokens: int, rounds: int, concurrency: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    run, free = (library_v2 if kind == "exllamav2" else library_v3)(path, md)
    load_s = time.perf_counter() - t0
    try:
        run(1, 32)
        single = [run(1, tokens)[0] for _ in range(rounds)]
        together = run(concurrency, tokens)
        return {"load_s": load_s, "single": summarise(single), "concurrent": aggregate(together)}
    finally:
        free()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=["exllamav2", "exllamav3"])
    parser.add_argument("model", type=Path)
    parser.add_argument("--metadata", default="{}", help="the model's metadata in models.toml, as JSON")
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--modes", default="library,backend")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    md = json.loads(args.metadata)
    out: dict[str, Any] = {"kind": args.kind, "tokens": args.tokens, "rounds": args.rounds, "failures": []}
    for mode in args.modes.split(","):
        run = library_run if mode == "library" else backend_run
        try:
            out[mode] = run(args.kind, args.model, md, args.tokens, args.rounds, args.concurrency)
        except Exception as exc:  # recorded, and the other mode still runs
            traceback.print_exc()
            out["failures"].append(f"{mode}: {type(exc).__name__}: {exc}")
            continue
        print(mode, json.dumps(out[mode]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 1 if out["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
