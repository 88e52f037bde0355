"""A neuron as the cortex sees it, in memory: a test double of :class:`NeuronLink` only.

It conforms to the Protocol the gateway drives, records what it was told (provisioning
commands, cancellations) and can be killed mid-stream. End-to-end tests with real neuron
processes live with the control plane.
"""

from __future__ import annotations

import struct
import time
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager
from dataclasses import replace

import trio

from helexa.protocol import (
    EmbedRequest,
    EmbedResult,
    GenerateRequest,
    GenerateResult,
    GpuInfo,
    Hardware,
    LoadModel,
    LoadProgress,
    ModelState,
    ModelStatus,
    NeuronDescriptor,
    NeuronMetrics,
    ProvisioningResponse,
    PullModel,
    TokenChunk,
    TokenLogprob,
    TopLogprob,
    UnloadModel,
    UpsertModelConfig,
    Usage,
    decode,
    encode,
)
from helexa.roles.cortex.fleet import Fleet, Health, NeuronGone, RemoteError

GB = 1024**3


def hardware(ram_gb: int = 16, gpus: tuple[int, ...] = ()) -> Hardware:
    return Hardware(cpu_cores=8, ram_total=ram_gb * GB,
                    gpus=tuple(GpuInfo(i, "gpu", v * GB, v * GB) for i, v in enumerate(gpus)))


class NeuronDouble:
    """Answers every generation with ``tokens`` chunks ``"t0 "``, ``"t1 "`` ... (certain ones,
    log-probability 0, when logprobs are asked for, as the synthetic backend answers)

    Knobs: ``load_delay`` (seconds a LoadModel takes), ``token_delay`` (between chunks),
    ``refuse_load`` (answer LoadModel ok=False with ``load_error``), ``pull_bytes`` (a PullModel reports its
    download in three steps of a third each, as a neuron's download progress), ``fail_before_start`` (die as soon as a
    generation arrives, with nothing produced), ``retryable_error`` (answer with a
    retryable RemoteError), ``error`` (answer each generation with this RemoteError: what a
    real neuron's backend refused).

    An UnloadModel drains as a neuron's registry does: the model turns ``unloading`` (new
    generations are refused as retryable), the ones running get the command's ``grace`` to
    finish, then it is gone. ``unloaded_at`` records when each unload completed.
    """

    def __init__(self, node_id: str, fleet: Fleet, *, hw: Hardware | None = None, loaded: tuple[str, ...] = (),
                 tokens: int = 3, token_delay: float = 0.0, load_delay: float = 0.0) -> None:
        self.node_id = node_id
        self.descriptor = NeuronDescriptor(node_id=node_id, hardware=hw or hardware())
        self.health = Health.HEALTHY
        self.metrics = NeuronMetrics()
        self.models: dict[str, ModelStatus] = {m: ModelStatus(m, ModelState.LOADED) for m in loaded}
        self.loaded_since: dict[str, float] = {m: float("-inf") for m in loaded}  # loaded before anything failed
        self.configs = {}
        self.joined_at = time.time()
        self.last_heartbeat = time.time()
        self.in_flight = 0
        self.tokens = tokens
        self.token_delay = token_delay
        self.load_delay = load_delay
        self.prompt_count: int | None = None
        """The prompt's count a stream's first chunk carries (``TokenChunk.prompt_tokens``), as a real neuron's."""
        self.refuse_load = False
        self.load_error = "no"
        self.load_code = "load_failed"
        self.pull_bytes = 3000
        self.load_progress = False
        """Report a load's progress (a ``load`` stage of one step) as a real neuron does."""
        self.collect = False
        """Answer a non-streamed generation as one result holding its text, as a real neuron
        does (:func:`helexa.roles.neuron.relay.collect`): no event comes before its end."""
        self.embed_delay = 0.0
        """How long an embedding takes (cancelled before its end: its id in :attr:`cancelled`)."""
        self.fail_before_start = False
        self.retryable_error = False
        self.error: RemoteError | None = None
        self.commands: list[object] = []
        self.generations: list[str] = []
        self.requests: list[GenerateRequest] = []
        self.cancelled: list[str] = []
        self.finished: list[str] = []
        self.unloaded_at: list[tuple[str, float]] = []
        self.model_in_flight: dict[str, int] = {}
        self._idle = trio.Event()
        self._dead = trio.Event()
        self._fleet = fleet
        fleet.add(self)

    def kill(self) -> None:
        """The connection drops: streams fail with NeuronGone, the link turns unhealthy."""
        self.health = Health.UNHEALTHY
        self._dead.set()
        self._fleet.notify()

    async def provision(self, command, *, timeout, on_progress=None) -> ProvisioningResponse:  # noqa: ANN001
        if self._dead.is_set():
            raise NeuronGone(f"{self.node_id} is gone")
        self.commands.append(command)
        match command:
            case UpsertModelConfig(config=config):
                self.configs[config.model_id] = config
            case LoadModel(model_id=mid):
                self.models[mid] = ModelStatus(mid, ModelState.LOADING)
                if self.load_progress and on_progress is not None:
                    on_progress(LoadProgress(command.command_id, mid, "load", 0, 1, "steps"))
                with trio.fail_after(timeout):
                    await trio.sleep(self.load_delay)
                if self.load_progress and on_progress is not None:
                    on_progress(LoadProgress(command.command_id, mid, "load", 1, 1, "steps"))
                if self.refuse_load:
                    del self.models[mid]
                    return ProvisioningResponse(command.command_id, ok=False, error=self.load_error,
                                                code=self.load_code)
                self.models[mid] = ModelStatus(mid, ModelState.LOADED)
                self.loaded_since[mid] = trio.current_time()
                self._fleet.notify()
            case PullModel(model_id=mid):
                if self.refuse_load:
                    return ProvisioningResponse(command.command_id, ok=False, error="disk full", code="disk_full")
                for step in range(4):
                    if on_progress is not None:
                        on_progress(LoadProgress(command.command_id, mid, "download", self.pull_bytes * step // 3,
                                                 self.pull_bytes))
                    await trio.sleep(0)
            case UnloadModel(model_id=mid, grace=grace):
                if mid in self.models:
                    self.models[mid] = ModelStatus(mid, ModelState.UNLOADING)
                    self._fleet.notify()
                    with trio.move_on_after(grace):
                        while self.model_in_flight.get(mid, 0):
                            self._idle = trio.Event()
                            await self._idle.wait()
                self.models.pop(mid, None)
                self.unloaded_at.append((mid, trio.current_time()))
                self._fleet.notify()
        return ProvisioningResponse(command.command_id, ok=True)

    def loads(self) -> list[str]:
        return [c.model_id for c in self.commands if isinstance(c, LoadModel)]

    def unloads(self) -> list[str]:
        return [c.model_id for c in self.commands if isinstance(c, UnloadModel)]

    @asynccontextmanager
    async def generate(self, request: GenerateRequest) -> AsyncIterator[AsyncIterator[TokenChunk | GenerateResult]]:
        if self._dead.is_set():
            raise NeuronGone(f"{self.node_id} is gone")
        request = decode(encode(request))  # as the real link does: what cannot travel fails here
        self.generations.append(request.request_id)
        self.requests.append(request)
        self.in_flight += 1
        self.model_in_flight[request.model_id] = self.model_in_flight.get(request.model_id, 0) + 1
        done = False

        async def events() -> AsyncIterator[TokenChunk | GenerateResult]:
            nonlocal done
            if self.fail_before_start:
                self.kill()
                raise NeuronGone(f"{self.node_id} died", started=False)
            if self.retryable_error:
                raise RemoteError("model_not_loaded", "not here", retryable=True)
            if self.error is not None:
                raise self.error
            status = self.models.get(request.model_id)
            if status is None or status.state is not ModelState.LOADED:
                # What a real neuron answers (its registry's ModelNotReady).
                raise RemoteError("model_not_loaded", f"model {request.model_id!r} is not loaded on {self.node_id}",
                                  retryable=True)
            limit = request.sampling.max_tokens or self.tokens
            for i in range(min(self.tokens, limit)):
                if self.token_delay:
                    with trio.move_on_after(self.token_delay):
                        await self._dead.wait()
                if self._dead.is_set():
                    raise NeuronGone(f"{self.node_id} died", started=i > 0)
                text = f"t{i} "
                hit = min(((text.find(s), s) for s in request.sampling.stop if s in text), default=None)
                if hit is not None:  # as a backend does: the text up to the stop, which it names
                    if hit[0]:
                        yield TokenChunk(request.request_id, text[:hit[0]])
                    done = True
                    yield GenerateResult(request.request_id, "stop", Usage(prompt_tokens=5, completion_tokens=i + 1),
                                         stop_sequence=hit[1])
                    return
                lp = (TokenLogprob(text, 0.0, text.encode(), (TopLogprob(text, 0.0, text.encode()),)
                                   [:request.sampling.top_logprobs]),) if request.sampling.logprobs else None
                yield TokenChunk(request.request_id, text, logprobs=lp, prompt_tokens=None if i else self.prompt_count)
            done = True
            yield GenerateResult(request.request_id, "stop" if limit >= self.tokens else "length",
                                 Usage(prompt_tokens=5, completion_tokens=min(self.tokens, limit)))

        async def collected() -> AsyncIterator[TokenChunk | GenerateResult]:
            parts = []
            async with aclosing(events()) as each:
                async for event in each:
                    if isinstance(event, GenerateResult):
                        yield replace(event, text="".join(parts) + event.text)
                        return
                    parts.append(event.text)

        try:
            yield collected() if self.collect and not request.stream else events()
        finally:
            self.in_flight -= 1
            self.model_in_flight[request.model_id] -= 1
            self._idle.set()
            (self.finished if done else self.cancelled).append(request.request_id)

    async def embed(self, request: EmbedRequest, *, timeout: float) -> EmbedResult:
        if self._dead.is_set():
            raise NeuronGone(f"{self.node_id} is gone")
        if self.embed_delay:
            try:
                await trio.sleep(self.embed_delay)
            except trio.Cancelled:
                self.cancelled.append(request.request_id)
                raise
            self.finished.append(request.request_id)
        dim = 3
        values = [float(i + j) for i in range(len(request.inputs)) for j in range(dim)]
        return EmbedResult(request.request_id, dim, struct.pack(f"<{len(values)}f", *values),
                           Usage(prompt_tokens=len(request.inputs)))

    def set_loaded(self, model_id: str) -> None:
        self.models[model_id] = ModelStatus(model_id, ModelState.LOADED)


def with_in_flight(status: ModelStatus, n: int) -> ModelStatus:
    return replace(status, in_flight=n)
