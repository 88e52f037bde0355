"""What the two ExLlama backends share as backends: one loaded model's engine and the trio
shell around it, a load, an unload and a generation.

:class:`~helexa.runtime.exllamav2.ExLlamaV2Backend` and
:class:`~helexa.runtime.exllamav3.ExLlamaV3Backend` differ only in what runs on the load's
thread (:meth:`ExLlamaBackend._load_sync`: the engine's own imports, model, cache and
generator), in the job a request becomes (:meth:`ExLlamaBackend._new_job`: the engine's own
sampler) and in how the engine is freed (:meth:`ExLlamaBackend._free`). Everything else,
the checks before the engine is imported, the generator thread, the prompt and its token
budget, is here once. Neither torch nor either engine is imported by this module.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from contextlib import suppress
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar

import trio

from helexa.protocol import GenerateRequest, ModelConfig, Task

from . import openai_shapes
from .base import (
    Backend,
    BackendError,
    ChatInference,
    GenerationEvent,
    InvalidRequest,
    ProgressFn,
    TextInference,
    Unsupported,
)
from .exllama import (
    GeneratorWorker,
    ModelDir,
    Sampling,
    inspect_model_dir,
    load_error,
    require_cuda,
    room_for,
    sampling_of,
    stream_job,
)

Report = Callable[[str, int, "int | None", str], None]
"""``report(stage, done, total, unit)``: load progress, callable from the load's thread."""


@dataclass(slots=True)
class Engine:
    """One loaded model: everything ``unload`` frees."""

    torch: Any
    model_dir: ModelDir
    model: Any = None
    cache: Any = None
    tokenizer: Any = None
    generator: Any = None
    sampler: Any = None
    """The engine's sampler (ExLlamaV2's ``ExLlamaV2Sampler``, ExLlamaV3's ``ComboSampler``)."""
    job_class: Any = None
    worker: GeneratorWorker | None = None
    context: int = 0
    stops: tuple[int, ...] = ()
    memory: int = 0


class ExLlamaBackend(Backend, ChatInference, TextInference):
    """A model served by an ExLlama engine's generator (see the module docstring).

    Subclasses name their ``kind`` (also the engine's package and the extra), their
    ``engine`` (as messages name it), the quantisations they accept (``accepted``, see
    :func:`~.exllama.inspect_model_dir`) and their ``settings_class``, whose
    ``from_metadata`` checks the metadata (a ``path`` among it)."""

    engine: ClassVar[str]
    accepted: ClassVar[dict[str | None, str]]
    settings_class: ClassVar[Any]

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.settings = self.settings_class.from_metadata(config.metadata)
        self._engine: Engine | None = None

    def memory_bytes(self) -> int:
        return self._engine.memory if self._engine is not None else 0

    # --- lifecycle ------------------------------------------------------------------------

    async def load(self, progress: ProgressFn) -> None:
        """Check torch, the GPU and the model directory, then run :meth:`_load_sync` on a
        thread and start the generator's thread.

        Raises :class:`~.base.LoadFailed` (see :func:`~.exllama.require_cuda`,
        :func:`~.exllama.inspect_model_dir` and :func:`~.exllama.load_error`)."""
        if self._engine is not None:
            return
        torch = require_cuda(self.kind, self.kind)
        model_dir = await trio.to_thread.run_sync(
            partial(inspect_model_dir, self.settings.path, accepted=self.accepted, engine=self.engine)
        )
        token = trio.lowlevel.current_trio_token()

        def report(stage: str, done: int, total: int | None, unit: str) -> None:
            with suppress(trio.RunFinishedError):
                token.run_sync_soon(progress, stage, done, total, unit)

        engine = Engine(torch=torch, model_dir=model_dir)
        try:
            await trio.to_thread.run_sync(self._load_sync, engine, report)
        except BaseException as exc:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self._free, engine)
            if isinstance(exc, Exception):
                raise load_error(exc, torch, self.settings.path, self.engine) from None
            raise
        engine.worker = GeneratorWorker(engine.generator, f"{self.kind}-{self.config.model_id}")
        engine.worker.start()
        self._engine = engine

    def _load_sync(self, engine: Engine, report: Report) -> None:
        """Import the engine and fill ``engine``: model, cache, tokenizer, generator,
        sampler, job class, context, stop tokens and memory. Runs on a thread."""
        raise NotImplementedError

    @staticmethod
    def _free(engine: Engine) -> None:
        """Drop what ``engine`` holds and hand its VRAM back to the driver. Runs on a thread."""
        raise NotImplementedError

    async def unload(self) -> None:
        """Cancel every job, stop the generator thread, and free weights, cache and VRAM."""
        engine, self._engine = self._engine, None
        if engine is None:
            return
        if engine.worker is not None:
            engine.worker.stop()
            await trio.to_thread.run_sync(engine.worker.join, 60.0)
        await trio.to_thread.run_sync(self._free, engine)

    # --- inference ------------------------------------------------------------------------

    def chat(self, request: GenerateRequest) -> AsyncIterator[GenerationEvent]:
        return self._generate(request)

    def complete(self, request: GenerateRequest) -> AsyncIterator[GenerationEvent]:
        return self._generate(request)

    async def _generate(self, request: GenerateRequest) -> AsyncIterator[GenerationEvent]:
        engine = self._engine
        openai_shapes.validate(request, max_context=engine.context if engine else None, features=self.features)
        if request.extra:
            raise Unsupported(f"the {self.kind} backend does not support {', '.join(sorted(request.extra))}")
        if engine is None or engine.worker is None:
            raise BackendError(f"model {self.config.model_id!r} is not loaded", code="model_not_loaded")
        job, prompt_tokens = await trio.to_thread.run_sync(self._job, engine, request)
        stream = stream_job(engine.worker, job, request.request_id, prompt_tokens, self.engine,
                            request.sampling.stop)
        async with contextlib.aclosing(stream) as events:
            async for event in events:
                yield event

    def _job(self, engine: Engine, request: GenerateRequest) -> tuple[Any, int]:
        """The request's job and its prompt's token count. Runs on a thread."""
        if request.task is Task.COMPLETION:
            text, add_bos = request.prompt or "", engine.model_dir.add_bos
        elif engine.model_dir.chat_template is None:
            raise Unsupported(f"model {self.config.model_id!r} has no chat template")
        else:
            text, add_bos = engine.model_dir.chat_template.render(request.messages), False
        ids = engine.tokenizer.encode(text, add_bos=add_bos, encode_special_tokens=True)
        prompt_tokens = int(ids.shape[-1])
        if prompt_tokens == 0:
            raise InvalidRequest("the prompt is empty")
        max_new = room_for(request.sampling.max_tokens, prompt_tokens, engine.context)
        return self._new_job(engine, request, ids, max_new, sampling_of(request.sampling)), prompt_tokens

    def _new_job(self, engine: Engine, request: GenerateRequest, ids: Any, max_new: int, s: Sampling) -> Any:
        """The engine's job for ``request``: its prompt ``ids``, at most ``max_new`` tokens,
        sampled as ``s`` says."""
        raise NotImplementedError


def allocated(torch: Any) -> int:
    """The bytes torch holds on every visible GPU."""
    return sum(torch.cuda.memory_allocated(i) for i in range(torch.cuda.device_count()))
