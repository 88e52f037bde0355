"""One joined neuron's connection, from the cortex's side: state, and the calls that drive it.

A :class:`NeuronLink` owns the reader loop of its channel. Provisioning responses are matched to
commands by command id, inference frames to requests by request id, so any number of
commands and generations share one connection. The reader never blocks on a consumer:
each request has its own :class:`LinkStream`, and text chunks that pile up while its
reader is slow are coalesced into one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import trio

from helexa.protocol import (
    EmbedRequest,
    EmbedResult,
    Fault,
    GenerateRequest,
    GenerateResult,
    Heartbeat,
    InferenceError,
    LoadModel,
    LoadProgress,
    MAX_CACHE_REPORT,
    ModelConfig,
    ModelState,
    ModelStatus,
    ModelStatusChanged,
    NeuronDescriptor,
    NeuronMetrics,
    Ping,
    Pong,
    ProtocolError,
    ProvisioningCommand,
    ProvisioningResponse,
    Shutdown,
    TokenChunk,
    UpsertModelConfig,
)
from helexa.protocol.compat import for_earlier
from helexa.protocol.model import MAX_NEURON_MODELS, bounded_text
from helexa.transport import Channel, ChannelClosed

from .fleet import CommandTimeout, Health, NeuronDraining, NeuronGone, RemoteError
from .link_stream import LinkStream
from .neuron_reports import named_models, sane_descriptor, sane_embed, sane_metrics, sane_result, sane_status

log = logging.getLogger(__name__)

_MAX_PENDING_REPLIES = 256


@dataclass
class _Command:
    done: trio.Event = field(default_factory=trio.Event)
    response: ProvisioningResponse | None = None
    error: Exception | None = None
    on_progress: Callable[[LoadProgress], None] | None = None
    load: bool = False
    """A ``LoadModel``: given up when the neuron says it is going away (:class:`NeuronDraining`)."""


class _Unreadable(ProtocolError):
    """The neuron's :class:`Fault`: it could not read a frame this cortex sent."""



def _cache_report(keys: tuple[str, ...]) -> frozenset[str]:
    """A neuron's cache report as kept: at most :data:`~helexa.protocol.MAX_CACHE_REPORT`
    keys, each of a key's length (a hostile neuron's longer strings are not kept)."""
    return frozenset(k for k in keys[:MAX_CACHE_REPORT] if len(k) == 32)


class NeuronLink:
    """The cortex's handle on one joined neuron: its state, and the calls that drive it."""

    scopes_cache = True
    """False for a neuron that joined at handshake version 1, of an earlier release: its
    codec refuses the fields added since (a request's ``cache_scope``, an embedding's
    ``truncate``), which are then left out (:func:`helexa.protocol.compat.for_earlier`;
    its prompt cache stays shared by every tenant)."""

    public_key = b""
    """The identity key the neuron proved at its join (empty: an older neuron sent none)."""

    def __init__(
        self,
        channel: Channel,
        descriptor: NeuronDescriptor,
        *,
        models: tuple[ModelStatus, ...] = (),
        configs: tuple[ModelConfig, ...] = (),
        cached: tuple[str, ...] = (),
        on_change: Callable[[], None] = lambda: None,
        send_timeout: float = 10.0,
    ) -> None:
        self.channel = channel
        self.node_id = descriptor.node_id
        self.descriptor = descriptor = sane_descriptor(descriptor)
        self.health = Health.HEALTHY
        self.connected = True
        self.metrics = NeuronMetrics(ram_total=descriptor.hardware.ram_total)
        self._dropped_logged = False
        models = [self._sane(m, "its join's models") for m in self._named(models, "its join's models")]
        configs = self._named(configs, "its join's model configs")
        self.models: dict[str, ModelStatus] = {m.model_id: m for m in models}
        now = trio.current_time()
        self.loaded_since: dict[str, float] = {m.model_id: now for m in models if m.state is ModelState.LOADED}
        """When each model last became loaded here, as this cortex saw it (a reload after its
        process died is a new instance: :func:`.admission.excluded`)."""
        self.configs: dict[str, ModelConfig] = {c.model_id: c for c in configs}
        self.cached = _cache_report(cached)
        """The sources its model cache holds, as :func:`~helexa.protocol.cache_key` keys
        (from its join and heartbeats; empty from a neuron before handshake version 3)."""
        self.joined_at = time.time()
        self.last_heartbeat = time.time()
        self.last_seen = trio.current_time()
        self.disconnected_at: float | None = None
        self.in_flight = 0
        self.heartbeats = 0
        self._on_change = on_change
        self._send_timeout = send_timeout
        self._commands: dict[str, _Command] = {}
        self._streams: dict[str, LinkStream] = {}
        self._pings: dict[int, trio.Event] = {}
        # Bounded: a neuron that floods pings without reading the pongs loses pongs, not memory.
        self._replies_in, self._replies_out = trio.open_memory_channel[Pong](_MAX_PENDING_REPLIES)

    # --- the reader ----------------------------------------------------------------------

    async def serve(self) -> None:
        """Read frames until the connection ends; then fail everything still waiting.

        Replies the reader owes the neuron (``Pong``) go out from a sender task beside it,
        so a slow socket never stalls the reading of heartbeats and results.
        """
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._send_replies)
            try:
                await self._read()
            finally:
                nursery.cancel_scope.cancel()

    async def _send_replies(self) -> None:
        async for msg in self._replies_out:
            try:
                await self._send(msg)
            except (NeuronGone, CommandTimeout):
                return

    async def _read(self) -> None:
        reason: Exception = NeuronGone(f"neuron {self.node_id} disconnected")
        try:
            while True:
                msg = await self.channel.receive()
                self.last_seen = trio.current_time()
                self._dispatch(msg)
        except ChannelClosed as exc:
            reason = NeuronGone(f"neuron {self.node_id} disconnected ({exc})")
        except _Unreadable as exc:
            # Its codec refused a frame of ours (a field it does not know): it is of a
            # release older than this cortex can drive, and it closes the connection.
            log.warning("neuron %s could not read a frame of this cortex's (%s); connection closed: a neuron of an "
                        "earlier release than this cortex can drive? upgrade it", self.node_id, exc)
            with trio.move_on_after(2) as scope:
                scope.shield = True
                await self.channel.aclose(1002, exc.code)
            reason = NeuronGone(f"neuron {self.node_id} could not read a frame of this cortex's")
        except ProtocolError as exc:
            log.warning("neuron %s sent a bad frame: %s; connection closed", self.node_id, exc)
            with trio.move_on_after(2) as scope:
                scope.shield = True
                try:
                    await self.channel.send(Fault(exc.code, str(exc)))
                except ChannelClosed:
                    pass
                await self.channel.aclose(1002, exc.code)
            reason = NeuronGone(f"neuron {self.node_id} dropped after a protocol error")
        finally:
            self._lost(reason)

    def _lost(self, reason: Exception) -> None:
        if self.health is Health.DRAINING:
            # It said it was going away, and a stopping neuron unloads every model (its
            # workers end with it): nothing is loaded or unloading there any more, whatever
            # its last report said, until it joins again and reports what it holds.
            self.models = {}
        self.connected = False
        self.health = Health.UNHEALTHY
        self.disconnected_at = trio.current_time()
        for cmd in self._commands.values():
            cmd.error = reason
            cmd.done.set()
        for stream in self._streams.values():
            stream.fail(NeuronGone(str(reason), started=stream.started))
        self._on_change()

    def fail_streams(self, error: Exception) -> None:
        """Every request running here ends with ``error`` (the cortex's stop, past its grace):
        its consumer raises it at its next event, so its surface can still end the answer
        with an error of its own shape."""
        for stream in list(self._streams.values()):
            stream.fail(error)

    async def drop_silent(self, reason: str) -> None:
        """The neuron went silent (missed heartbeats): mark it unhealthy at once, so no new
        work goes there, and close the connection so that its requests fail fast."""
        self.health = Health.UNHEALTHY
        self.disconnected_at = trio.current_time()
        self._on_change()
        await self.close(1001, reason)

    def _dispatch(self, msg: object) -> None:
        match msg:
            case TokenChunk(request_id=rid):
                if (stream := self._streams.get(rid)) is not None:
                    stream.push(msg)
            case GenerateResult(request_id=rid):
                if (stream := self._streams.get(rid)) is not None:
                    if not stream.generating:
                        raise ProtocolError(f"a generation's result for the embedding request {rid}", code="unexpected")
                    stream.finish(sane_result(msg, stream.request, stream.seen))  # type: ignore[arg-type]
            case EmbedResult(request_id=rid):
                if (stream := self._streams.get(rid)) is not None:
                    if stream.generating:
                        raise ProtocolError(f"an embedding for the generation request {rid}", code="unexpected")
                    stream.finish(sane_embed(msg, stream.request))  # type: ignore[arg-type]
            case InferenceError(request_id=rid):
                if (stream := self._streams.get(rid)) is not None:
                    if msg.code == "backend_crashed":
                        self._crashed(stream.request.model_id, msg.message)
                    stream.fail(RemoteError(msg.code, msg.message, retryable=msg.retryable))
            case Heartbeat():
                self.heartbeats += 1
                self.metrics = sane_metrics(msg.metrics)
                self.last_heartbeat = time.time()
                changed = self._set_models(msg.models)
                if msg.cached is not None and (cached := _cache_report(msg.cached)) != self.cached:
                    self.cached, changed = cached, True
                if self.health is Health.UNHEALTHY and self.connected:
                    self.health = Health.HEALTHY
                    changed = True
                if changed:
                    self._on_change()
            case ProvisioningResponse(command_id=cid):
                if msg.status is not None:
                    self._set_model(msg.status)
                    self._on_change()
                if (cmd := self._commands.get(cid)) is not None:
                    cmd.response = msg
                    cmd.done.set()
            case LoadProgress(command_id=cid):
                cur = self.models.get(msg.model_id)
                if cur is not None and msg.total:
                    self.models[msg.model_id] = replace(cur, progress=min(1.0, max(0.0, msg.done / msg.total)))
                if (cmd := self._commands.get(cid)) is not None and cmd.on_progress is not None:
                    cmd.on_progress(msg)
            case ModelStatusChanged(status=status):
                self._set_model(status)
                self._on_change()
            case Ping(nonce=n):
                try:
                    self._replies_in.send_nowait(Pong(n))
                except trio.WouldBlock:
                    log.debug("neuron %s: too many unanswered pings; pong %d dropped", self.node_id, n)
            case Pong(nonce=nonce):
                if (ev := self._pings.pop(nonce, None)) is not None:
                    ev.set()
            case Shutdown(reason=why):
                log.info("neuron %s is shutting down: %s", self.node_id, why)
                self.health = Health.DRAINING
                for cmd in self._commands.values():
                    if cmd.load and not cmd.done.is_set():  # it stops loading as it goes: waiting helps no one
                        cmd.error = NeuronDraining(f"neuron {self.node_id} is shutting down")
                        cmd.done.set()
                self._on_change()
            case Fault(code=code, message=text):
                raise _Unreadable(f"{code[:40]!r}: {text[:300]!r}", code="malformed")
            case _:
                raise ProtocolError(f"unexpected {type(msg).__name__} from a neuron", code="unexpected")

    def _set_models(self, models: tuple[ModelStatus, ...]) -> bool:
        """Take the models a heartbeat reports; True when a model came, went or changed state.

        On every heartbeat of every neuron: one pass, no second dict of states."""
        old = self.models
        new: dict[str, ModelStatus] = {}
        changed = False
        for m in self._named(models, "a heartbeat's models", old):
            m = self._sane(m, "a heartbeat's models")
            new[m.model_id] = m
            if (prev := old.get(m.model_id)) is None or prev.state is not m.state:
                changed = True
                if m.state is ModelState.LOADED:
                    self.loaded_since[m.model_id] = trio.current_time()
        self.models = new
        if len(self.loaded_since) > len(new):  # only the reported models' (a neuron naming new ones each beat grew it)
            self.loaded_since = {k: t for k, t in self.loaded_since.items() if k in new}
        return changed or len(new) != len(old)

    def _crashed(self, model_id: str, reason: str) -> None:
        """The model's process died under a request (the neuron says so with the request's
        error): it is not loaded here from now on, whichever of that error and the model's
        own status frame comes first. A retry of the request, picked the moment the error
        comes, must not find it loaded here still (and give up as if only a neuron it failed
        on could serve it); the provisioner loads it again."""
        cur = self.models.get(model_id)
        if cur is not None and cur.state is ModelState.LOADED:
            self.models[model_id] = replace(cur, state=ModelState.FAILED, error=bounded_text(reason))
            self._on_change()

    def _named(self, items, what: str, known=()):  # noqa: ANN001, ANN202 (statuses or configs, as given)
        """``items`` less what :func:`.neuron_reports.named_models` drops (logged)."""
        kept, problems = named_models(items, known)
        if problems:
            self._dropped(what, problems)
        return kept

    def _sane(self, status: ModelStatus, what: str) -> ModelStatus:
        """``status`` as :func:`.neuron_reports.sane_status` keeps it (what it cut, logged)."""
        kept, problem = sane_status(status)
        if problem is not None:
            self._dropped(what, [problem])
        return kept

    def _dropped(self, what: str, problems: list[str]) -> None:
        """The first time a report from this neuron loses models, one WARNING says what and why."""
        level = logging.DEBUG if self._dropped_logged else logging.WARNING
        self._dropped_logged = True
        log.log(level, "neuron %s: %s: %s (logged once a connection)", self.node_id, what, "; ".join(problems))

    def _set_model(self, status: ModelStatus) -> None:
        prev = self.models.get(status.model_id)
        if prev is None:
            if len(self.models) >= MAX_NEURON_MODELS:
                self._dropped("a model status", [f"it holds {MAX_NEURON_MODELS} models already, at most that many "
                                                 f"are taken: {status.model_id[:64]!r} dropped"])
                return
            if not self._named((status,), "a model status"):
                return
        status = self._sane(status, "a model status")
        if status.state is ModelState.LOADED and (prev is None or prev.state is not ModelState.LOADED):
            self.loaded_since[status.model_id] = trio.current_time()
        self.models[status.model_id] = status

    @property
    def provisioning(self) -> bool:
        """True while a provisioning command (a model load, say) awaits its answer."""
        return bool(self._commands)

    # --- calls ----------------------------------------------------------------------------

    async def _send(self, msg: object) -> None:
        if not self.connected:
            raise NeuronGone(f"neuron {self.node_id} is not connected")
        try:
            # The channel applies the deadline only if it has to wait: no cancel scope per request.
            await self.channel.send(msg, timeout=self._send_timeout)
        except ChannelClosed as exc:
            raise NeuronGone(f"neuron {self.node_id} disconnected ({exc})") from None
        except trio.TooSlowError:
            raise CommandTimeout(f"sending to neuron {self.node_id} timed out") from None

    async def provision(
        self,
        command: ProvisioningCommand,
        *,
        timeout: float,
        on_progress: Callable[[LoadProgress], None] | None = None,
    ) -> ProvisioningResponse:
        cmd = _Command(on_progress=on_progress, load=isinstance(command, LoadModel))
        self._commands[command.command_id] = cmd
        try:
            await self._send(command)
            if isinstance(command, UpsertModelConfig):
                self.configs[command.config.model_id] = command.config
            with trio.move_on_after(timeout):
                await cmd.done.wait()
            if cmd.error is not None:
                raise cmd.error
            if cmd.response is None:
                raise CommandTimeout(
                    f"neuron {self.node_id} did not answer {type(command).__name__} within {timeout:g}s"
                )
            return cmd.response
        finally:
            del self._commands[command.command_id]

    def generate(self, request: GenerateRequest) -> LinkStream:
        """``async with link.generate(request) as events``: send ``request``, then iterate
        its chunks and result. Leaving early sends ``Cancel`` to the neuron.

        Raises (on entry): :class:`NeuronGone`, :class:`CommandTimeout` (the send).
        Raises (iterating): :class:`NeuronGone`, :class:`RemoteError`.
        """
        if not self.scopes_cache:
            request = for_earlier(request)
        return LinkStream(self, request)

    async def embed(self, request: EmbedRequest, *, timeout: float) -> EmbedResult:
        """Embed on this neuron. Raises :class:`NeuronGone`, :class:`RemoteError`, or
        :class:`CommandTimeout` when no answer comes within ``timeout`` seconds. Left with
        no answer (cancelled: the client left, its key was revoked; or timed out), the
        neuron is told to stop (``Cancel``), as a generation's."""
        async with LinkStream(self, request if self.scopes_cache else for_earlier(request)) as stream:
            with trio.move_on_after(timeout):
                while stream.final is None and stream.error is None:
                    await stream.wait()
            if stream.error is not None:
                raise stream.error
            if not isinstance(stream.final, EmbedResult):
                raise CommandTimeout(f"neuron {self.node_id} did not answer an embedding within {timeout:g}s")
            return stream.final

    async def _open(self, stream: LinkStream) -> None:
        rid = stream.request.request_id
        self._streams[rid] = stream
        self.in_flight += 1
        try:
            await self._send(stream.request)
        except BaseException:
            self._close(stream)
            raise

    def _close(self, stream: LinkStream) -> None:
        if self._streams.pop(stream.request.request_id, None) is stream:
            self.in_flight -= 1

    def expire(self, now: float) -> None:
        """End the streams past their deadline (:meth:`.LinkStream.expire`); the control
        server's watchdog calls this every ``heartbeat_interval / 2``."""
        for stream in list(self._streams.values()):
            if now >= stream.deadline:
                stream.expire(now)

    async def ping(self, nonce: int, *, timeout: float) -> None:
        """Round trip one Ping/Pong with the neuron (a liveness probe). Raises
        :class:`NeuronGone`, or ``trio.TooSlowError`` after ``timeout``."""
        ev = trio.Event()
        self._pings[nonce] = ev
        await self._send(Ping(nonce))
        with trio.fail_after(timeout):
            await ev.wait()

    async def part(self, reason: str, grace: float) -> None:
        """Tell the neuron this cortex is going away, then close (best effort, bounded)."""
        with trio.move_on_after(2) as scope:
            scope.shield = True
            try:
                await self.channel.send(Shutdown(reason, grace))
            except ChannelClosed:
                pass
            # Closed while the reader still runs, so the close handshake completes instead
            # of waiting out its timeout.
            await self.close(1001, "cortex stopping")

    async def close(self, code: int = 1000, reason: str = "") -> None:
        await self.channel.aclose(code, reason)
