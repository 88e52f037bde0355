"""Both ExLlama backends' shell (:mod:`helexa.runtime.exllama_backend`) over a scripted
engine, without a GPU: the job a request becomes in each engine's own terms (its prompt's
tokens, its budget, its sampling, its stops) and the stream it gives, and the requests
refused before any job. The engines themselves run the same code in the GPU-gated tests."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import trio

from helexa.protocol import GenerateRequest, GenerateResult, ModelConfig, SamplingParams, Task, TokenChunk
from helexa.runtime import InvalidRequest, Unsupported, create_backend
from helexa.runtime.exllama import GeneratorWorker, inspect_model_dir
from helexa.runtime.exllama_backend import Engine

from exllama_support import model_dir
from test_exllama import ScriptedGenerator, ScriptedJob, _Ids

CONTEXT = 64


class Job(ScriptedJob):
    """An engine's job as the scripted generator runs it, keeping what it was made with."""

    def __init__(self, **made_with: Any) -> None:
        super().__init__(made_with["max_new_tokens"])
        self.made_with = made_with


class Tokenizer:
    """One token a word."""

    def __init__(self) -> None:
        self.asked: list[tuple[str, bool, bool]] = []

    def encode(self, text: str, *, add_bos: bool, encode_special_tokens: bool) -> _Ids:
        self.asked.append((text, add_bos, encode_special_tokens))
        return _Ids(len(text.split()))


class V2Sampler:
    """ExLlamaV2's sampler: its settings are an object whose attributes the job sets."""

    Settings = SimpleNamespace


SAMPLERS = {"exllamav2": V2Sampler, "exllamav3": SimpleNamespace}  # ExLlamaV3's ComboSampler takes keywords
ACCEPTED = {"exllamav2": "exl2", "exllamav3": "exl3"}


@contextlib.asynccontextmanager
async def loaded(kind: str, tmp_path: Path) -> AsyncIterator[tuple[Any, Engine, list[Job]]]:
    """A ``kind`` backend whose engine is scripted (as its load would leave it), and the
    jobs its requests become."""
    path = model_dir(tmp_path / "m", quant=ACCEPTED[kind])
    backend = create_backend(ModelConfig("m", kind, metadata={"path": str(path)}))
    jobs: list[Job] = []

    def job_class(**made_with: Any) -> Job:
        jobs.append(Job(**made_with))
        return jobs[-1]

    generator = ScriptedGenerator()
    accepted = {None: "unquantised", ACCEPTED[kind]: ACCEPTED[kind].upper()}
    engine = Engine(torch=None, model_dir=inspect_model_dir(path, accepted=accepted, engine=kind),
                    tokenizer=Tokenizer(), generator=generator, sampler=SAMPLERS[kind], job_class=job_class,
                    context=CONTEXT, stops=(2,))
    engine.worker = GeneratorWorker(generator, "test-worker")
    engine.worker.start()
    backend._engine = engine
    try:
        yield backend, engine, jobs
    finally:
        backend._engine = None
        engine.worker.stop()
        assert await trio.to_thread.run_sync(engine.worker.join, 10.0)


async def generate(backend: Any, request: GenerateRequest) -> list:
    with trio.fail_after(10):
        stream = backend.chat(request) if request.task is Task.CHAT else backend.complete(request)
        async with contextlib.aclosing(stream) as events:
            return [event async for event in events]


def completion(prompt: str, **sampling: Any) -> GenerateRequest:
    return GenerateRequest("r1", "m", Task.COMPLETION, prompt=prompt, sampling=SamplingParams(**sampling))


def sampled(kind: str, job: Job) -> dict[str, Any]:
    """The job's sampling as the engine reads it, in ExLlamaV3's names."""
    if kind == "exllamav3":
        return vars(job.made_with["sampler"])
    settings = job.made_with["gen_settings"]
    return {"temperature": settings.temperature, "top_k": settings.top_k, "top_p": settings.top_p,
            "min_p": settings.min_p, "rep_p": settings.token_repetition_penalty,
            "freq_p": settings.token_frequency_penalty, "pres_p": settings.token_presence_penalty}


@pytest.mark.parametrize("kind", ["exllamav2", "exllamav3"])
async def test_a_completion_becomes_one_job_and_streams_its_tokens(kind: str, tmp_path: Path) -> None:
    async with loaded(kind, tmp_path) as (backend, engine, jobs):
        events = await generate(backend, completion("once upon a time", max_tokens=3, temperature=0.5, top_p=0.9,
                                                    presence_penalty=0.25, stop=("END",), seed=7))
    assert [type(e) for e in events] == [TokenChunk, TokenChunk, TokenChunk, GenerateResult]
    assert "".join(e.text for e in events[:-1]) == "t1 t2 t3 " and events[-1].finish_reason == "length"
    assert engine.tokenizer.asked == [("once upon a time", engine.model_dir.add_bos, True)]
    (job,) = jobs
    made = job.made_with
    assert made["input_ids"].shape == (1, 4) and made["max_new_tokens"] == 3
    assert made["stop_conditions"] == [2, "END"] and made["seed"] == 7 and made["identifier"] == "r1"
    assert sampled(kind, job) == {"temperature": 0.5, "top_k": 0, "top_p": 0.9, "min_p": 0.0, "rep_p": 1.0,
                                  "freq_p": 0.0, "pres_p": 0.25}


@pytest.mark.parametrize(("kind", "greedy"), [
    ("exllamav2", {"temperature": 1.0, "top_k": 1}),  # ExLlamaV2's greedy: the top token, temperature unused
    ("exllamav3", {"temperature": 0.0, "top_k": 0}),
])
async def test_temperature_0_is_each_engines_greedy_and_no_max_tokens_fills_the_context(
        kind: str, greedy: dict, tmp_path: Path) -> None:
    async with loaded(kind, tmp_path) as (backend, _, jobs):
        await generate(backend, completion("a b", temperature=0.0))
    (job,) = jobs
    assert job.made_with["max_new_tokens"] == CONTEXT - 2
    assert {k: sampled(kind, job)[k] for k in greedy} == greedy


@pytest.mark.parametrize("kind", ["exllamav2", "exllamav3"])
async def test_requests_the_engine_cannot_serve_are_refused_before_any_job(kind: str, tmp_path: Path) -> None:
    chat = GenerateRequest("c", "m", Task.CHAT, messages=({"role": "user", "content": "hi"},))
    async with loaded(kind, tmp_path) as (backend, _, jobs):
        with pytest.raises(InvalidRequest, match="the prompt is empty"):
            await generate(backend, completion(""))
        with pytest.raises(Unsupported, match="has no chat template"):  # the directory has none
            await generate(backend, chat)
        with pytest.raises(Unsupported, match=f"the {kind} backend does not support logit_bias"):
            await generate(backend, GenerateRequest("x", "m", Task.COMPLETION, prompt="a", extra={"logit_bias": {}}))
        with pytest.raises(InvalidRequest, match="fills the model's context"):
            await generate(backend, completion("w " * CONTEXT))
    assert jobs == []
