"""The neuron's side of the control plane: dial the cortex, join, heartbeat, obey.

:class:`Neuron` keeps one connection to its cortex, reconnecting after any drop with
exponential backoff and jitter. On every (re)join it reports the models it already holds,
so a restarted cortex rebuilds its view without reloading anything.

Exception tree::

    NeuronError
    ├── JoinRefused        the cortex refused the join (``code``: unauthorized,
    │                      version_mismatch, ...); fatal, since retrying cannot help
    └── CortexImpostor     the cortex's counter-proof did not verify
"""

from __future__ import annotations

import logging
import random
import ssl
from collections.abc import Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import TypeVar

import trio

from helexa import __version__
from helexa.protocol import (
    MIN_PROTOCOL_VERSION,
    PROTOCOL_VERSION,
    Cancel,
    Challenge,
    EmbedRequest,
    Fault,
    GenerateRequest,
    Heartbeat,
    Hello,
    InferenceError,
    Join,
    LoadModel,
    LoadProgress,
    ModelStatus,
    ModelStatusChanged,
    NeuronDescriptor,
    Ping,
    Pong,
    ProtocolError,
    ProvisioningResponse,
    Refused,
    Shutdown,
    Task,
    UnloadModel,
    UpsertModelConfig,
    Welcome,
    auth,
)
from helexa.runtime import BackendError, ChatInference, EmbeddingInference, TextInference, Unsupported
from helexa.transport import Channel, ChannelClosed, ConnectFailed
from helexa.transport import websocket as ws_transport

from . import hardware
from .progress import LoadBars
from .registry import ModelRegistry
from .relay import collect, relay

log = logging.getLogger(__name__)

_M = TypeVar("_M")


async def _expect(channel: Channel, kind: type[_M]) -> _M:
    """The cortex's next handshake message, which must be ``kind`` (or a ``Refused``)."""
    msg = await channel.receive()
    if isinstance(msg, Refused):
        raise JoinRefused(msg.code, msg.reason)
    if not isinstance(msg, kind):
        raise ProtocolError(f"expected {kind.__name__.lower()}, got {type(msg).__name__}")
    return msg


class NeuronError(Exception):
    pass


class JoinRefused(NeuronError):
    def __init__(self, code: str, reason: str) -> None:
        super().__init__(f"the cortex refused this neuron ({code}): {reason}")
        self.code = code


class CortexImpostor(NeuronError):
    pass


def _first(group: BaseExceptionGroup) -> BaseException:
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


@dataclass(frozen=True)
class NeuronSettings:
    cortex_url: str
    node_id: str
    token: str
    labels: dict[str, str] = field(default_factory=dict)
    connect_timeout: float = 10.0
    handshake_timeout: float = 10.0
    send_timeout: float = 10.0
    reconnect_initial: float = 0.5
    reconnect_max: float = 30.0
    shutdown_grace: float = 10.0
    max_frame: int = 16 * 1024 * 1024
    ssl_context: ssl.SSLContext | None = None


def backoff_delays(initial: float, maximum: float, rng: random.Random) -> Callable[[], float]:
    """Exponential backoff with full jitter in [d/2, d]: returns a function yielding the next
    delay; the caller makes a new one after a successful join."""
    attempt = 0

    def next_delay() -> float:
        nonlocal attempt
        base = min(maximum, initial * (2**attempt))
        attempt += 1
        return base / 2 + rng.random() * base / 2

    return next_delay


class Neuron:
    """A neuron process's control-plane service.

    Args:
        settings: where the cortex is, who we are, timeouts.
        registry: the models held (a fresh one by default).
        connector: opens a channel to the cortex URL (the websocket transport by default;
            tests pass an in-memory connector that still goes through the codec).
    """

    def __init__(
        self,
        settings: NeuronSettings,
        *,
        registry: ModelRegistry | None = None,
        connector: Callable | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self.registry = registry or ModelRegistry(on_status=self._status_changed)
        if registry is not None:
            registry._on_status = self._status_changed
        self._connector = connector or self._ws_connect
        self._rng = rng or random.Random()
        self._hardware = hardware.discover()
        self._sampler = hardware.MetricsSampler()
        self._channel: Channel | None = None
        self._requests: dict[str, trio.CancelScope] = {}
        self._draining = False
        self._events: trio.Nursery | None = None
        self._bars = LoadBars()
        self.joined = trio.Event()
        self.joins = 0
        self.heartbeat_interval = 1.0

    def _ws_connect(self, url: str):
        return ws_transport.connect(
            url,
            timeout=self.settings.connect_timeout,
            ssl_context=self.settings.ssl_context,
            max_frame=self.settings.max_frame,
        )

    def descriptor(self) -> NeuronDescriptor:
        return NeuronDescriptor(
            node_id=self.settings.node_id,
            hardware=self._hardware,
            hostname=hardware.hostname(),
            software=f"helexa {__version__}",
            labels=dict(self.settings.labels),
        )

    # --- the connection loop --------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Stay joined to the cortex until cancelled. Raises :class:`JoinRefused` when the
        cortex refuses us for a reason a retry cannot fix."""
        try:
            async with trio.open_nursery() as services:
                # Backends with background work (supervised processes) live here, so they
                # survive reconnects to the cortex.
                self.registry.service_nursery = services
                task_status.started()
                await self._connect_loop()
        except BaseExceptionGroup as group:
            # A refusal is the one way out of the loop: raise it plainly for callers.
            refused, rest = group.split(NeuronError)
            if refused is not None and rest is None:
                raise _first(refused) from None
            raise

    async def _connect_loop(self) -> None:
        delays = backoff_delays(self.settings.reconnect_initial, self.settings.reconnect_max, self._rng)
        while True:
            joined_before = self.joins
            try:
                async with self._connector(self.settings.cortex_url) as channel:
                    await self._session(channel)
            except (ConnectFailed, ChannelClosed, ProtocolError, trio.TooSlowError) as exc:
                log.info("connection to cortex lost: %s", exc or type(exc).__name__)
            finally:
                self._channel = None
                if self.joined.is_set():
                    self.joined = trio.Event()
            if self.joins > joined_before:
                delays = backoff_delays(self.settings.reconnect_initial, self.settings.reconnect_max, self._rng)
            delay = delays()
            log.info("reconnecting to %s in %.2fs", self.settings.cortex_url, delay)
            await trio.sleep(delay)

    async def _join(self, channel: Channel) -> Welcome:
        s = self.settings
        nonce = auth.new_nonce()
        await channel.send(Hello(s.node_id, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION, nonce, f"helexa {__version__}"))
        challenge = await _expect(channel, Challenge)
        proof = auth.join_proof(s.token, challenge.nonce, nonce, s.node_id)
        await channel.send(
            Join(proof, self.descriptor(), self.registry.statuses(), self.registry.configs())
        )
        welcome = await _expect(channel, Welcome)
        expected = auth.welcome_proof(s.token, challenge.nonce, nonce, s.node_id)
        if not auth.verify(expected, welcome.proof):
            raise CortexImpostor("the cortex could not prove it holds our join token")
        return welcome

    async def _session(self, channel: Channel) -> None:
        with trio.fail_after(self.settings.handshake_timeout):
            welcome = await self._join(channel)
        self.heartbeat_interval = welcome.heartbeat_interval
        self._channel = channel
        self.joins += 1
        log.info(
            "joined cortex %s as %s (operator %s, %d models held)",
            self.settings.cortex_url, self.settings.node_id, welcome.operator, len(self.registry.statuses()),
        )
        self.joined.set()
        lost: Exception | None = None
        async with trio.open_nursery() as nursery:
            self._events = nursery
            nursery.start_soon(self._heartbeats, channel)
            try:
                while True:
                    msg = await channel.receive()
                    self._dispatch(msg, nursery)
            except (ChannelClosed, ProtocolError) as exc:
                lost = exc  # raised below, outside the nursery, as itself
            finally:
                self._events = None
                nursery.cancel_scope.cancel()
        if lost is not None:
            raise lost

    async def _heartbeats(self, channel: Channel) -> None:
        seq = 0
        try:
            while True:
                seq += 1
                metrics = self._sampler.sample(in_flight=self.registry.in_flight)
                await self._send(Heartbeat(seq, metrics, self.registry.statuses()), channel)
                await trio.sleep(self.heartbeat_interval)
        except (ChannelClosed, trio.TooSlowError):
            # The link is dead or stuck: closing it ends the reader, which reconnects.
            await channel.aclose(1001, "heartbeat could not be sent")

    async def _send(self, msg: object, channel: Channel | None = None) -> None:
        channel = channel or self._channel
        if channel is None:
            raise ChannelClosed("not connected")
        # move_on_after, not fail_after: fail_after stacks two generator context managers per call
        # (a cost paid on every relayed frame).
        with trio.move_on_after(self.settings.send_timeout) as scope:
            await channel.send(msg)
        if scope.cancelled_caught:
            raise trio.TooSlowError

    def _status_changed(self, status: ModelStatus) -> None:
        if self._channel is not None and self._events is not None:
            self._events.start_soon(self._send_quietly, ModelStatusChanged(status))

    async def _send_quietly(self, msg: object) -> None:
        try:
            await self._send(msg)
        except (ChannelClosed, trio.TooSlowError):
            pass

    # --- commands from the cortex ---------------------------------------------------------

    def _dispatch(self, msg: object, nursery: trio.Nursery) -> None:
        match msg:
            case GenerateRequest() | EmbedRequest():
                if self._draining:
                    nursery.start_soon(
                        self._send_quietly,
                        InferenceError(msg.request_id, "draining", "this neuron is shutting down", retryable=True),
                    )
                else:
                    nursery.start_soon(self._serve_request, msg)
            case Cancel(request_id=rid):
                if (scope := self._requests.get(rid)) is not None:
                    scope.cancel()
            case UpsertModelConfig(command_id=cid, config=config):
                status = self.registry.upsert(config)
                nursery.start_soon(self._send_quietly, ProvisioningResponse(cid, True, status=status))
            case LoadModel():
                nursery.start_soon(self._load, msg)
            case UnloadModel():
                nursery.start_soon(self._unload, msg)
            case Ping(nonce=n):
                nursery.start_soon(self._send_quietly, Pong(n))
            case Shutdown(reason=why):
                log.info("the cortex is going away: %s", why)
            case Fault(code=code, message=text):
                log.warning("the cortex reported a protocol error (%s): %s", code, text)
            case _:
                raise ProtocolError(f"unexpected {type(msg).__name__} from the cortex", code="unexpected")

    async def _load(self, cmd: LoadModel) -> None:
        last = [-1.0]

        def progress(stage: str, done: int, total: int | None, unit: str) -> None:
            self._bars.update(cmd.model_id, stage, done, total, unit)
            frac = done / total if total else 0.0
            if frac - last[0] >= 0.05 or (total and done >= total):
                last[0] = frac
                if self._events is not None:
                    self._events.start_soon(
                        self._send_quietly, LoadProgress(cmd.command_id, cmd.model_id, stage, done, total, unit)
                    )

        try:
            status = await self.registry.load(cmd.model_id, progress)
            self._bars.close(cmd.model_id)
            await self._send_quietly(ProvisioningResponse(cmd.command_id, True, status=status))
        except BackendError as exc:
            self._bars.close(cmd.model_id)
            status = self._maybe_status(cmd.model_id)
            await self._send_quietly(ProvisioningResponse(cmd.command_id, False, str(exc), exc.code, status))

    async def _unload(self, cmd: UnloadModel) -> None:
        try:
            status = await self.registry.unload(cmd.model_id)
            await self._send_quietly(ProvisioningResponse(cmd.command_id, True, status=status))
        except BackendError as exc:
            await self._send_quietly(ProvisioningResponse(cmd.command_id, False, str(exc), exc.code))

    def _maybe_status(self, model_id: str) -> ModelStatus | None:
        try:
            return self.registry.status(model_id)
        except BackendError:
            return None

    async def _serve_request(self, req: GenerateRequest | EmbedRequest) -> None:
        rid = req.request_id
        started_now: list[bool] = []
        with trio.CancelScope() as scope:
            self._requests[rid] = scope
            try:
                backend = self.registry.acquire(req.model_id)
                try:
                    if isinstance(req, EmbedRequest):
                        if not isinstance(backend, EmbeddingInference):
                            raise Unsupported(f"model {req.model_id!r} does not do embeddings")
                        await self._send(await backend.embed(req))
                        return
                    if req.task is Task.CHAT and isinstance(backend, ChatInference):
                        events = backend.chat(req)
                    elif req.task is Task.COMPLETION and isinstance(backend, TextInference):
                        events = backend.complete(req)
                    else:
                        raise Unsupported(f"model {req.model_id!r} does not do {req.task.value} requests")
                    async with aclosing(events) as it:
                        if req.stream:
                            await relay(it, self._send, on_first=lambda: started_now.append(True))
                        else:
                            await collect(it, self._send, on_first=lambda: started_now.append(True))
                finally:
                    self.registry.release(req.model_id)
            except BackendError as exc:
                await self._send_quietly(
                    InferenceError(rid, exc.code, str(exc), retryable=exc.retryable and not started_now)
                )
            except (ChannelClosed, trio.TooSlowError):
                pass
            except Exception as exc:
                log.exception("request %s failed", rid)
                await self._send_quietly(InferenceError(rid, "internal_error", f"the neuron failed: {type(exc).__name__}"))
            finally:
                del self._requests[rid]

    # --- shutdown -------------------------------------------------------------------------

    async def drain(self, reason: str = "neuron stopping") -> None:
        """Graceful stop: announce Shutdown, refuse new work, let in-flight work finish within
        the grace period, then unload every model."""
        self._draining = True
        grace = self.settings.shutdown_grace
        with trio.CancelScope(shield=True):
            if self._channel is not None:
                with trio.move_on_after(2):
                    await self._send_quietly(Shutdown(reason, grace))
            with trio.move_on_after(grace):
                while self._requests:
                    await trio.sleep(0.05)
            for scope in list(self._requests.values()):
                scope.cancel()
            with trio.move_on_after(max(grace, 5.0)):
                await self.registry.unload_all()
