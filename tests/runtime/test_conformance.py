"""One suite every generation backend that runs on this machine must pass.

Run against ``llama_cpp`` (a tiny random-weight GGUF), ``openai_proxy`` (in front of
llama.cpp's own server in a child process) and ``synthetic`` (see ``conftest.py``); on a
machine with a CUDA GPU also against ``exllamav2`` and ``exllamav3``, serving the EXL2 and
EXL3 models named by ``HELEXA_EXL2_MODEL`` / ``HELEXA_EXL3_MODEL`` (``scripts/gpu_check.sh``
quantises a tiny model for them); elsewhere those skip.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools

import pytest
import trio

from helexa.protocol import GenerateRequest, GenerateResult, SamplingParams, Task, TokenChunk
from helexa.runtime import Backend, InvalidRequest

_ids = itertools.count()


def chat(max_tokens: int | None = 8, **sampling) -> GenerateRequest:
    return GenerateRequest(
        f"r{next(_ids)}",
        "m",
        Task.CHAT,
        messages=({"role": "user", "content": "Say something."},),
        sampling=SamplingParams(max_tokens=max_tokens, **sampling),
    )


def completion(max_tokens: int | None = 8, prompt: str = "Once upon a time", **sampling) -> GenerateRequest:
    return GenerateRequest(
        f"r{next(_ids)}", "m", Task.COMPLETION, prompt=prompt, sampling=SamplingParams(max_tokens=max_tokens, **sampling)
    )


async def collect(stream) -> tuple[list[TokenChunk], GenerateResult]:
    events = []
    async with contextlib.aclosing(stream) as it:
        async for event in it:
            events.append(event)
    assert events and isinstance(events[-1], GenerateResult), events[-1:]
    assert all(isinstance(e, TokenChunk) for e in events[:-1])
    return events[:-1], events[-1]


async def test_chat_streams_chunks_then_exactly_one_result(backend: Backend) -> None:
    with trio.fail_after(30):
        chunks, result = await collect(backend.chat(chat(8)))
    assert chunks and "".join(c.text for c in chunks)
    assert result.finish_reason == "length"
    assert result.usage.completion_tokens == 8
    assert result.request_id == chunks[0].request_id


async def test_max_tokens_bounds_a_completion(backend: Backend) -> None:
    with trio.fail_after(30):
        for limit in (1, 5, 17):
            chunks, result = await collect(backend.complete(completion(limit)))
            assert result.usage.completion_tokens == limit
            assert result.finish_reason == "length"
            assert 1 <= sum(c.tokens for c in chunks) <= limit


async def test_stop_sequence_ends_generation_before_it(backend: Backend) -> None:
    with trio.fail_after(30):
        chunks, _ = await collect(backend.complete(completion(12, temperature=0.0)))
        full = "".join(c.text for c in chunks)
        # A word from past the first third of the answer (not a chunk: how text is cut into
        # chunks differs between backends, and a worker joins what arrives together).
        words = [w for w in full[len(full) // 3:].split() if len(w) >= 2] or [w for w in full.split() if len(w) >= 2]
        stop = words[0]
        chunks, result = await collect(backend.complete(completion(12, temperature=0.0, stop=(stop,))))
    text = "".join(c.text for c in chunks)
    assert result.finish_reason == "stop"
    assert result.stop_sequence == stop  # every backend here can say which stop matched
    assert stop not in text
    assert full.startswith(text) and full[len(text) :].lstrip().startswith(stop)


async def test_usage_counts_prompt_and_completion_tokens(backend: Backend) -> None:
    with trio.fail_after(30):
        _, short = await collect(backend.complete(completion(3, prompt="Hi")))
        _, long = await collect(backend.chat(chat(3)))
    assert short.usage.completion_tokens == long.usage.completion_tokens == 3
    assert short.usage.prompt_tokens >= 1 and long.usage.prompt_tokens >= 1
    assert long.usage.total_tokens == long.usage.prompt_tokens + 3


async def test_leaving_a_stream_early_frees_its_slot(backend: Backend) -> None:
    with trio.fail_after(60):
        for _ in range(4):  # more than the slots: each must have been freed
            async with contextlib.aclosing(backend.complete(completion(2000))) as it:
                async for event in it:
                    assert isinstance(event, TokenChunk)
                    break
        _, result = await collect(backend.complete(completion(4)))
    assert result.usage.completion_tokens == 4


async def test_cancelling_the_consumer_stops_generation(backend: Backend) -> None:
    seen = 0
    with trio.move_on_after(0.3):
        async with contextlib.aclosing(backend.chat(chat(2000))) as it:
            async for _ in it:
                seen += 1
    assert seen < 2000
    with trio.fail_after(30):
        _, result = await collect(backend.chat(chat(4)))
    assert result.usage.completion_tokens == 4


async def test_concurrent_requests_all_complete(backend: Backend) -> None:
    results: dict[int, GenerateResult] = {}

    async def one(i: int) -> None:
        _, results[i] = await collect(backend.complete(completion(6 + i, prompt=f"Story number {i}:")))

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for i in range(5):
                nursery.start_soon(one, i)
    assert {i: r.usage.completion_tokens for i, r in results.items()} == {i: 6 + i for i in range(5)}


@pytest.mark.parametrize(
    "request_",
    [
        GenerateRequest("bad1", "m", Task.CHAT, messages=()),
        GenerateRequest("bad2", "m", Task.COMPLETION, prompt=None),
        GenerateRequest("bad3", "m", Task.CHAT, messages=("not an object",)),
        GenerateRequest("bad4", "m", Task.COMPLETION, prompt="x", extra={"best_of": 3}),
        GenerateRequest("bad5", "m", Task.COMPLETION, prompt="x", sampling=SamplingParams(frequency_penalty=7.0)),
        GenerateRequest("bad6", "m", Task.COMPLETION, prompt="x", sampling=SamplingParams(min_p=1.5)),
        GenerateRequest("bad7", "m", Task.COMPLETION, prompt="x", sampling=SamplingParams(stop=("",))),
    ],
    ids=["no-messages", "no-prompt", "message-not-object", "unknown-field", "penalty-range", "min-p-range", "empty-stop"],
)
async def test_bad_parameters_are_rejected_with_invalid_request(backend: Backend, request_: GenerateRequest) -> None:
    stream = backend.chat(request_) if request_.task is Task.CHAT else backend.complete(request_)
    with pytest.raises(InvalidRequest):
        await collect(stream)
    _, result = await collect(backend.complete(completion(2)))
    assert result.usage.completion_tokens == 2


async def test_a_non_streaming_request_gets_the_answer_a_stream_gets(backend: Backend) -> None:
    # A backend may answer stream=False in one result (synthetic, openai_proxy) or in
    # chunks as usual: either way the text, the end and the usage match the stream's.
    streamed = completion(6, temperature=0.0, seed=7)
    whole = dataclasses.replace(streamed, request_id=f"r{next(_ids)}", stream=False)
    with trio.fail_after(30):
        chunks, result = await collect(backend.complete(streamed))
        events = [e async for e in backend.complete(whole)]
    assert isinstance(events[-1], GenerateResult) and events[-1].request_id == whole.request_id
    text = "".join(e.text for e in events[:-1]) + events[-1].text
    assert text == "".join(c.text for c in chunks) + result.text
    assert events[-1].finish_reason == result.finish_reason == "length"
    assert events[-1].usage.completion_tokens == result.usage.completion_tokens == 6


@pytest.mark.parametrize("seed", [-1, -(2**63)])
async def test_a_negative_seed_is_served_as_any_other_seed(backend: Backend, seed: int) -> None:
    # Refused once ("seed must not be negative") though the API takes any 64-bit seed.
    with trio.fail_after(30):
        _, result = await collect(backend.complete(completion(3, temperature=1.0, seed=seed)))
    assert result.usage.completion_tokens == 3
