"""Runtime benchmark: SmolLM2 through helexa's backend vs xllamacpp called directly, and
MiniLM embeddings/s.

    .venv/bin/python benchmarks/runtime_bench.py [--rounds 5] [--tokens 128] [--threads 2]

Both paths use the same GGUF, the same llama.cpp parameters (n_ctx, n_parallel, threads)
and the same greedy request; rounds alternate between them so that noise from other work
on the machine hits both alike. Reported per path (median over rounds): time to first
token, decode tokens/s (tokens after the first / time after the first) and end-to-end
tokens/s (completion tokens / total time).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import trio

from helexa.protocol import EmbedRequest, GenerateRequest, GenerateResult, ModelConfig, SamplingParams, Task, TokenChunk
from helexa.runtime import create_backend
from helexa.runtime.llama_cpp import default_gguf_path

PROMPT = "Write a long story about a lighthouse keeper and a storm."


def direct_round(server, tokens: int) -> tuple[float, float, int]:
    start = time.perf_counter()
    first = last = None
    usage = {}

    def on_chunk(chunk) -> bool:
        nonlocal first, last, usage
        now = time.perf_counter()
        for choice in chunk.get("choices") or ():
            if (choice.get("delta") or {}).get("content"):
                first = first or now
                last = now
        usage = chunk.get("usage") or usage
        return False

    body = {
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    server.handle_chat_completions(body, on_chunk)
    return first - start, last - first, usage["completion_tokens"]


async def backend_round(backend, tokens: int) -> tuple[float, float, int]:
    request = GenerateRequest(
        "bench", "smollm2", Task.CHAT, messages=({"role": "user", "content": PROMPT},),
        sampling=SamplingParams(max_tokens=tokens, temperature=0.0),
    )
    start = time.perf_counter()
    first = last = None
    async with contextlib.aclosing(backend.chat(request)) as it:
        async for event in it:
            now = time.perf_counter()
            if isinstance(event, TokenChunk) and event.text:
                first = first or now
                last = now
            elif isinstance(event, GenerateResult):
                completion = event.usage.completion_tokens
    return first - start, last - first, completion


def summarise(name: str, rounds: list[tuple[float, float, int]]) -> float:
    ttft = statistics.median(r[0] for r in rounds)
    decode = statistics.median((r[2] - 1) / r[1] for r in rounds)
    e2e = statistics.median(r[2] / (r[0] + r[1]) for r in rounds)
    print(f"{name:>10}: ttft {ttft * 1000:7.1f} ms   decode {decode:6.1f} tok/s   end-to-end {e2e:6.1f} tok/s   ({rounds[0][2]} tokens)")
    return decode


async def main(args: argparse.Namespace) -> None:
    import xllamacpp

    metadata = {"n_ctx": 2048, "n_parallel": 1, "n_threads": args.threads}
    backend = create_backend(ModelConfig("smollm2", "llama_cpp", metadata=metadata))
    await backend.load(lambda *a: None)
    params = xllamacpp.CommonParams()
    params.model.path = str(default_gguf_path())
    params.n_ctx, params.n_parallel = 2048, 1
    params.cpuparams.n_threads = params.cpuparams_batch.n_threads = args.threads
    server = await trio.to_thread.run_sync(xllamacpp.Server, params)

    await trio.to_thread.run_sync(direct_round, server, 8)  # warm-up both
    await backend_round(backend, 8)
    direct, ours = [], []
    for _ in range(args.rounds):
        direct.append(await trio.to_thread.run_sync(direct_round, server, args.tokens))
        ours.append(await backend_round(backend, args.tokens))
    print(f"SmolLM2-135M-Instruct Q4_1, {args.threads} threads, {args.rounds} rounds, greedy, max {args.tokens} tokens")
    d = summarise("direct", direct)
    o = summarise("helexa", ours)
    print(f"helexa / direct decode tokens/s: {100 * o / d:.1f}%")
    await backend.unload()
    del server

    embedder = create_backend(ModelConfig("minilm", "embeddings"))
    await embedder.load(lambda *a: None)
    texts = tuple(f"Sentence {i}: the quick brown fox jumps over the lazy dog near the river bank." for i in range(256))
    await embedder.embed(EmbedRequest("w", "minilm", texts[:8]))
    start = time.perf_counter()
    for _ in range(args.rounds):
        await embedder.embed(EmbedRequest("e", "minilm", texts))
    elapsed = time.perf_counter() - start
    print(f"MiniLM int8 ONNX: {args.rounds * len(texts) / elapsed:.0f} embeddings/s (batches of {len(texts)})")
    await embedder.unload()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    trio.run(main, parser.parse_args())
