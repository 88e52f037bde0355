"""What the two ExLlama backends share: the model directory, sampling, loading, and the
thread that owns a dynamic generator.

ExLlamaV2 (:mod:`helexa.runtime.exllamav2`) and ExLlamaV3 (:mod:`helexa.runtime.exllamav3`)
read the same Hugging Face model directories and drive generators with the same job API:
``enqueue(job)``, ``cancel(job)`` (which frees the job's cache pages) and ``iterate()``,
which returns result dicts (``job``, ``stage``, ``eos``, ``text``, ``token_ids``, and at
the end ``eos_reason``, ``new_tokens``, ``prompt_tokens``, ``cached_tokens``). Everything
here is plain Python: neither torch nor either engine is imported, so all of it runs and is
tested on machines without a GPU.

Pieces:

* :func:`inspect_model_dir` checks a model directory before the engine sees it and reads
  what serving needs (stop tokens, whether prompts start with BOS, the chat template, see
  :mod:`helexa.runtime.chat_template`).
* :func:`sampling_of` turns :class:`~helexa.protocol.SamplingParams` into one set of values
  with OpenAI's defaults, so both engines sample alike for the same request.
* :class:`GeneratorWorker` is the one thread per loaded model that calls the generator;
  :func:`stream_job` is the trio side of one request.
* :func:`require_cuda`, :func:`load_error` and the ``metadata_*`` readers give both loads
  the same precise :class:`~helexa.runtime.LoadFailed` codes.

The backend class both build on, their load, unload and generation around an engine, is
:class:`~helexa.runtime.exllama_backend.ExLlamaBackend`.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from helexa.protocol import GenerateResult, SamplingParams, TokenChunk, Usage

from . import cpu_policy
from .base import BackendError, GenerationEvent, InvalidRequest, LoadFailed
from .chat_template import ChatTemplate, read_json

log = logging.getLogger(__name__)

CANCEL_GRACE_S = 30.0
"""How long leaving a stream waits for the generator thread to drop the job."""

FINISH_REASONS = {"stop_token": "stop", "stop_string": "stop", "max_new_tokens": "length", "end_filter": "stop"}

Post = Callable[[tuple[str, Any]], None]


# --- the model directory -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ModelDir:
    """What :func:`inspect_model_dir` found in a model directory."""

    path: Path
    architecture: str
    quant_method: str | None
    """``"exl2"``, ``"exl3"``, ``"gptq"``..., or ``None`` for unquantised weights."""
    bits: float | None
    context: int | None
    """``max_position_embeddings`` from ``config.json``."""
    stop_token_ids: tuple[int, ...]
    """``eos_token_id`` from ``config.json`` and ``generation_config.json``."""
    add_bos: bool
    """Whether a raw prompt starts with the BOS token (as the Hugging Face tokenizer would)."""
    chat_template: ChatTemplate | None


def _ids(value: Any) -> list[int]:
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def inspect_model_dir(path: Path, *, accepted: dict[str | None, str], engine: str) -> ModelDir:
    """Check that ``path`` is a model directory ``engine`` can load and read its serving facts.

    Args:
        path: the directory (metadata ``path``).
        accepted: quantisation methods the engine loads (``None``: unquantised), each with
            a word for messages.
        engine: the backend's name, for messages.

    Raises:
        LoadFailed: ``model_not_found`` (no such directory), ``corrupt_model`` (no or
            unreadable ``config.json``, no architecture, no ``*.safetensors``, no tokenizer,
            or weights quantised in a format this engine does not load).
    """
    if not path.exists():
        raise LoadFailed(f"no model directory at {path}", code="model_not_found")
    if not path.is_dir():
        raise LoadFailed(f"{path} is not a directory", code="model_not_found")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise LoadFailed(f"{path} holds no config.json: not a model directory", code="corrupt_model")
    config = read_json(config_file)
    architectures = config.get("architectures")
    if not isinstance(architectures, list) or len(architectures) != 1 or not isinstance(architectures[0], str):
        raise LoadFailed(f"{config_file} must name exactly one architecture", code="corrupt_model")
    qcfg = config.get("quantization_config")
    method = qcfg.get("quant_method") if isinstance(qcfg, dict) else None
    if method not in accepted:
        hint = {"exl2": "exllamav2", "exl3": "exllamav3"}.get(str(method))
        suffix = f"; serve it with backend_kind {hint!r}" if hint else ""
        raise LoadFailed(f"{path} holds {method} weights, which {engine} does not load{suffix}", code="corrupt_model")
    if not any(path.glob("*.safetensors")):
        raise LoadFailed(f"{path} holds no *.safetensors weights", code="corrupt_model")
    if not (path / "tokenizer.json").is_file() and not (path / "tokenizer.model").is_file():
        raise LoadFailed(f"{path} holds no tokenizer.json or tokenizer.model", code="corrupt_model")
    bits = qcfg.get("bits") if isinstance(qcfg, dict) else None
    context = config.get("max_position_embeddings")
    stops = _ids(config.get("eos_token_id"))
    generation_file = path / "generation_config.json"
    if generation_file.is_file():
        stops += _ids(read_json(generation_file).get("eos_token_id"))
    tokenizer_config = read_json(path / "tokenizer_config.json") if (path / "tokenizer_config.json").is_file() else {}
    return ModelDir(
        path=path,
        architecture=architectures[0],
        quant_method=method,
        bits=float(bits) if isinstance(bits, int | float) else None,
        context=context if isinstance(context, int) and context > 0 else None,
        stop_token_ids=tuple(dict.fromkeys(stops)),
        add_bos=_adds_bos(path, tokenizer_config),
        chat_template=ChatTemplate.from_model_dir(path, tokenizer_config),
    )


def _adds_bos(path: Path, tokenizer_config: dict[str, Any]) -> bool:
    """``add_bos_token`` from ``tokenizer_config.json``, else whether ``tokenizer.json``'s
    post-processor puts the BOS token first (how Hugging Face's fast tokenizers decide)."""
    flag = tokenizer_config.get("add_bos_token")
    if isinstance(flag, bool):
        return flag
    tokenizer_file = path / "tokenizer.json"
    if not tokenizer_file.is_file():
        return False
    with suppress(LoadFailed):
        processor = read_json(tokenizer_file).get("post_processor") or {}
        steps = processor.get("processors", [processor]) if isinstance(processor, dict) else []
        for step in steps:
            if isinstance(step, dict) and step.get("type") == "TemplateProcessing":
                first = (step.get("single") or [{}])[0]
                return "SpecialToken" in first
    return False


# --- sampling ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Sampling:
    """Sampling values for both engines; the defaults are OpenAI's (no truncation, no
    penalties, temperature 1)."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


def sampling_of(params: SamplingParams) -> Sampling:
    """The request's values, OpenAI's defaults for those it leaves unset."""
    given = {name: getattr(params, name) for name in Sampling.__slots__ if getattr(params, name) is not None}
    return Sampling(**given)


# --- the generator thread ------------------------------------------------------------------


class GeneratorWorker:
    """The one thread that calls a dynamic generator (V2's or V3's).

    It blocks while no job runs; otherwise it applies every queued command, then runs one
    ``iterate()`` (one forward pass for all running jobs) and posts each result to its job's
    ``post`` without blocking. Commands come from any thread.

    Args:
        generator: the engine's dynamic generator.
        name: the thread's name.

    Resource handling: :meth:`stop` cancels every job (each job's ``post`` gets
    ``("done", None)``) and ends the thread; the generator is the caller's to free after
    :meth:`join`.
    """

    def __init__(self, generator: Any, name: str) -> None:
        self._generator = generator
        self._commands: queue.SimpleQueue[tuple[str, Any, Any]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def enqueue(self, job: Any, post: Post) -> None:
        """Start ``job``; its results go to ``post`` as ``("result", dict)``, a failure as
        ``("error", exception)``, an unload as ``("done", None)``."""
        with self._lock:
            if not self._closed:
                self._commands.put(("enqueue", job, post))
                return
        post(("done", None))

    def cancel(self, job: Any, acknowledge: Callable[[], None]) -> None:
        """Drop ``job`` (freeing its cache pages); ``acknowledge()`` is called, from the
        worker thread, once it is gone, or at once if the worker has stopped."""
        with self._lock:
            if not self._closed:
                self._commands.put(("cancel", job, acknowledge))
                return
        acknowledge()

    def stop(self) -> None:
        self._commands.put(("stop", None, None))

    def join(self, timeout: float) -> bool:
        """Wait for the thread to end; False if it is still running after ``timeout``."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        cpu_policy.engine_thread()  # the generator's own thread: relays never preempt it
        generator = self._generator
        routes: dict[Any, Post] = {}
        while True:
            command = self._commands.get() if not routes else self._next()
            while command is not None:
                kind, job, arg = command
                if kind == "stop":
                    self._close(routes)
                    return
                if kind == "enqueue":
                    try:
                        generator.enqueue(job)
                    except Exception as exc:  # the engines assert on jobs that cannot fit
                        arg(("error", exc))
                    else:
                        routes[job] = arg
                else:
                    if routes.pop(job, None) is not None:
                        self._drop(job)
                    arg()
                command = self._next()
            if not routes:
                continue
            try:
                results = generator.iterate()
            except Exception as exc:
                log.exception("the generator's iterate() failed; failing its %d jobs", len(routes))
                for job, post in routes.items():
                    self._drop(job)
                    post(("error", exc))
                routes.clear()
                continue
            for result in results:
                job = result.get("job")
                post = routes.get(job)
                if post is None:
                    continue
                if result.get("stage") == "error":  # ExLlamaV3 fails one job and goes on
                    del routes[job]
                    post(("error", result.get("error")))
                elif result.get("stage") == "streaming":
                    post(("result", result))
                    if result.get("eos"):
                        del routes[job]

    def _next(self) -> tuple[str, Any, Any] | None:
        try:
            return self._commands.get_nowait()
        except queue.Empty:
            return None

    def _drop(self, job: Any) -> None:
        try:
            self._generator.cancel(job)
        except Exception:
            log.exception("cancelling a job failed")

    def _close(self, routes: dict[Any, Post]) -> None:
        with self._lock:
            self._closed = True
        for job, post in routes.items():
            self._drop(job)
            post(("done", None))
        routes.clear()
        while (command := self._next()) is not None:
            kind, _, arg = command
            if kind == "enqueue":
                arg(("done", None))
            elif kind == "cancel":
                arg()
        self._generator = None  # so that unloading frees the model even if this object lingers


async def stream_job(worker: GeneratorWorker, job: Any, request_id: str, prompt_tokens: int,
                     engine: str, stops: tuple[str, ...] = ()) -> AsyncIterator[GenerationEvent]:
    """Run ``job`` on ``worker`` and stream it: :class:`TokenChunk` items (results that
    arrived while the reader was busy are joined into one), then one :class:`GenerateResult`
    (naming the one of ``stops``, the request's stop sequences, that ended the text: the
    generator's ``eos_triggering_string``).

    Leaving early (``aclose``, or cancelling the reading task) cancels the job and returns
    only once the worker has dropped it, so its cache pages are free (bounded by
    :data:`CANCEL_GRACE_S`). Raises :class:`BackendError` if the engine fails the job, or
    with ``model_not_loaded`` if the model is unloaded under it."""
    send, receive = trio.open_memory_channel[tuple[str, Any]](math.inf)
    token = trio.lowlevel.current_trio_token()

    def post(item: tuple[str, Any]) -> None:
        with suppress(trio.RunFinishedError):
            token.run_sync_soon(send.send_nowait, item)

    worker.enqueue(job, post)
    finished = False
    try:
        while not finished:
            batch = [await receive.receive()]
            with suppress(trio.WouldBlock):
                while True:
                    batch.append(receive.receive_nowait())
            text, tokens, end = "", 0, None
            for kind, payload in batch:
                if kind == "error":
                    finished = True
                    raise BackendError(f"{engine}: {payload}")
                if kind == "done":
                    finished = True
                    raise BackendError("the model was unloaded", code="model_not_loaded")
                text += payload.get("text") or ""
                ids = payload.get("token_ids")
                tokens += int(ids.shape[-1]) if ids is not None else 0
                if payload.get("eos"):
                    finished, end = True, payload
            if text:
                yield TokenChunk(request_id, text, max(tokens, 1))
            if end is not None:
                usage = Usage(
                    prompt_tokens=int(end.get("prompt_tokens") or prompt_tokens),
                    completion_tokens=int(end.get("new_tokens") or 0),
                    cached_tokens=int(end.get("cached_tokens") or 0),
                )
                word = end.get("eos_triggering_string") if end.get("eos_reason") == "stop_string" else None
                yield GenerateResult(request_id, FINISH_REASONS.get(end.get("eos_reason", ""), "stop"), usage,
                                     stop_sequence=word if word in stops else None)
    finally:
        if not finished:
            dropped = trio.Event()

            def acknowledge() -> None:
                with suppress(trio.RunFinishedError):
                    token.run_sync_soon(dropped.set)

            worker.cancel(job, acknowledge)
            with trio.CancelScope(shield=True), trio.move_on_after(CANCEL_GRACE_S) as waited:
                await dropped.wait()
            if waited.cancelled_caught:
                log.error("%s kept request %s past %ss after cancel", engine, request_id, CANCEL_GRACE_S)


def room_for(request_max: int | None, prompt_tokens: int, context: int) -> int:
    """Tokens a job may generate: the request's ``max_tokens`` bounded by what the context
    leaves after the prompt. Raises :class:`InvalidRequest` if the prompt fills it."""
    room = context - prompt_tokens
    if room < 1:
        raise InvalidRequest(f"the prompt ({prompt_tokens} tokens) fills the model's context of {context} tokens")
    return min(request_max or room, room)


# --- loading -------------------------------------------------------------------------------


def require_cuda(engine: str, extra: str) -> Any:
    """Import torch and check that ``engine`` is installed and a CUDA GPU is visible,
    without importing the engine (its first import may compile CUDA code for minutes).
    Returns the ``torch`` module.

    Raises :class:`LoadFailed`: ``missing_extra`` (no torch or no ``engine``), ``no_gpu``."""
    import importlib.util

    try:
        import torch
    except ImportError as exc:
        raise LoadFailed(f"the {engine} backend needs the {extra!r} extra (torch and {engine}): {exc}",
                         code="missing_extra") from None
    if importlib.util.find_spec(engine) is None:
        raise LoadFailed(f"the {engine} backend needs the {extra!r} extra: {engine} is not installed",
                         code="missing_extra")
    if not torch.cuda.is_available():
        raise LoadFailed(f"the {engine} backend needs a CUDA GPU and torch sees none", code="no_gpu")
    return torch


def load_error(exc: BaseException, torch: Any, path: Path, engine: str) -> LoadFailed:
    """The :class:`LoadFailed` an engine's exception during a load stands for:
    ``out_of_memory`` (CUDA out of memory, or the engine's own "insufficient VRAM"),
    ``missing_extra`` (a module the engine imports is absent), ``corrupt_model`` (the
    engine refused the files), ``load_failed`` otherwise (e.g. its CUDA extension did not
    build)."""
    if isinstance(exc, LoadFailed):
        return exc
    text = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, torch.cuda.OutOfMemoryError) or "insufficient vram" in text.lower():
        return LoadFailed(f"out of GPU memory loading {path}: {text}", code="out_of_memory")
    if isinstance(exc, ImportError):
        return LoadFailed(f"{engine} cannot be imported: {text}", code="missing_extra")
    if isinstance(exc, AssertionError | ValueError | KeyError | OSError) or type(exc).__name__ == "SafetensorError":
        return LoadFailed(f"{engine} cannot load {path}: {text}", code="corrupt_model")
    return LoadFailed(f"{engine} failed loading {path}: {text}", code="load_failed")


def metadata_int(md: dict[str, Any], key: str, default: int | None, *, minimum: int = 1,
                 multiple_of: int = 1) -> int | None:
    """An integer from model metadata. Raises :class:`LoadFailed` (``invalid_config``)
    naming the key."""
    value = md.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum or value % multiple_of:
        rule = f"an integer >= {minimum}" + (f" and a multiple of {multiple_of}" if multiple_of > 1 else "")
        raise LoadFailed(f"metadata {key!r} must be {rule}, not {value!r}", code="invalid_config")
    return value


def metadata_split(md: dict[str, Any]) -> list[float] | None:
    """``gpu_split``: GiB per GPU. Raises :class:`LoadFailed` (``invalid_config``)."""
    split = md.get("gpu_split")
    if split is None:
        return None
    if not isinstance(split, list) or not split or not all(
        isinstance(g, int | float) and not isinstance(g, bool) and g >= 0 for g in split
    ):
        raise LoadFailed(f"metadata 'gpu_split' must be a list of GiB per GPU, not {split!r}", code="invalid_config")
    return [float(g) for g in split]
