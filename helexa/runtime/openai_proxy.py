"""``openai_proxy``: an OpenAI-style server, supervised by the neuron or already running.

Without ``command`` the backend proxies ``listen_endpoint`` (a base URL such as
``http://127.0.0.1:8000``; ``/v1`` is appended). With ``command`` it also owns the process:

* :meth:`load` starts ``command`` with ``args`` and ``env`` (added to the neuron's own
  environment) and waits until ``listen_endpoint`` answers ``GET /v1/models`` or
  ``GET /health`` with 200, reporting progress in seconds against ``metadata.ready_timeout``
  (default 120). A process that exits first, or a timeout, fails the load (``load_failed``)
  with the exit status or the timeout, and leaves no process behind.
* Its stdout and stderr go, line by line, to the logger ``helexa.runtime.openai_proxy.<model>``.
* If it dies while loaded it is restarted with exponential backoff (``restart_backoff``,
  default 1 s, doubling up to 30 s), at most ``max_restarts`` times in a row (default 5);
  each step is reported to :attr:`Backend.status_listener` (``LOADING`` with the reason,
  ``LOADED`` once it answers again, ``FAILED`` when it gives up). Requests in between fail
  with :class:`BackendCrashed` (retryable elsewhere).
* :meth:`unload` sends SIGTERM, then SIGKILL after ``metadata.stop_grace`` seconds (default 10).
* Each start gets a fresh API key, in the variable ``metadata.api_key_env`` of its
  environment and/or in place of ``{api_key}`` in ``args``; every request to the server,
  probes included, carries it as ``Authorization: Bearer``. The command line is logged at
  each start with the key masked (:mod:`~helexa.runtime.upstream_key`). A server given no
  key is started with a warning: it serves anyone who reaches its port.

Without ``command``, ``metadata.api_key_env`` names a variable of the neuron's environment
holding the server's key (sent the same way); without it no ``Authorization`` is sent.

Why a service nursery: the supervisor must outlive :meth:`load`, and trio has no
fire-and-forget tasks. The owner lends a long-lived nursery (``Backend.service_nursery``);
the supervisor runs there under its own cancel scope, which :meth:`unload` cancels and then
waits on, so the owner's nursery is never cancelled on our behalf.

Other metadata: ``upstream_model`` (the ``model`` field sent; default the model id),
``dialect`` (``"vllm"``, ``"llama.cpp"`` or ``"openai"``: how non-OpenAI sampling fields are
named; to vLLM the request's cache scope goes as ``cache_salt``, so its prefix cache is never
shared between tenants: other servers' caches are theirs to keep apart), ``embeddings``
(true when the server serves ``/v1/embeddings``), ``request_timeout`` (seconds the server
may take to answer, or between two streamed pieces; default 600),
``connect_timeout`` (default 10), ``max_connections`` (to the server at once, default 256).

Requests go through :class:`~helexa.runtime.upstream.Upstream` (pooled keep-alive HTTP/1.1;
its errors are the runtime's own). A streamed answer is read with
:class:`~helexa.runtime.openai_stream.StreamReader`; leaving it early closes its connection,
which stops the generation upstream. The server's HTTP errors map to the runtime's tree:
``429``/``503`` :class:`Overloaded`, ``401``/``403`` a ``backend_error`` (our credentials,
not the client's request), ``501`` :class:`Unsupported`, other ``4xx``
:class:`InvalidRequest` with the server's message, other ``5xx`` :class:`BackendCrashed`.
"""

from __future__ import annotations

import logging
import math
import signal
import subprocess
from collections.abc import AsyncIterator
from typing import Any, NoReturn
from urllib.parse import urlsplit

import numpy as np
import orjson
import trio

from helexa import secret_files
from helexa.protocol import (
    Feature,
    EmbedRequest,
    EmbedResult,
    GenerateRequest,
    GenerateResult,
    ModelConfig,
    ModelState,
    ModelStatus,
    Task,
    Usage,
    Workload,
)

from . import openai_shapes, upstream_key
from .base import (
    Backend,
    BackendCrashed,
    BackendError,
    ChatInference,
    EmbeddingInference,
    GenerationEvent,
    InvalidRequest,
    LoadFailed,
    Overloaded,
    ProgressFn,
    TextInference,
    Unsupported,
)
from .process_output import relay_lines
from .embeddings import pack_vectors
from .openai_stream import StreamReader, loads_object
from .upstream import Upstream, UpstreamProtocolError

_JSON = (("content-type", "application/json"),)
DRAIN_TIMEOUT = 1.0
"""Seconds a stream waits, after ``data: [DONE]``, for the end of the HTTP body."""

log = logging.getLogger(__name__)


class OpenAIProxyBackend(Backend, ChatInference, TextInference, EmbeddingInference):
    """Proxy to (and optionally supervise) an OpenAI-style server; see the module docstring."""

    kind = "openai_proxy"
    features = frozenset({Feature.STRUCTURED_OUTPUT, Feature.TOOLS, Feature.LOGPROBS})

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        if not config.listen_endpoint:
            raise LoadFailed("openai_proxy needs listen_endpoint", code="invalid_config")
        md = config.metadata
        self._base = config.listen_endpoint.rstrip("/")
        self._api = self._base if self._base.endswith("/v1") else self._base + "/v1"
        self._ready_timeout = float(md.get("ready_timeout", 120))
        self._backoff = float(md.get("restart_backoff", 1.0))
        self._max_restarts = int(md.get("max_restarts", 5))
        self._stop_grace = float(md.get("stop_grace", 10))
        self._upstream_model = str(md.get("upstream_model", config.model_id))
        self._dialect = str(md.get("dialect", "vllm"))
        self._embeddings = bool(md.get("embeddings", False))
        self._request_timeout = float(md.get("request_timeout", 600))
        self._connect_timeout = float(md.get("connect_timeout", 10))
        self._max_connections = int(md.get("max_connections", 256))
        self._path = urlsplit(self._api).path.rstrip("/")
        try:
            self._key_env = upstream_key.env_name(md)
        except ValueError as exc:
            raise LoadFailed(f"openai_proxy: {exc}", code="invalid_config") from None
        self._auth: tuple[tuple[str, str], ...] = ()  # the current key's header
        self._client: Upstream | None = None
        self._supervisor: trio.CancelScope | None = None
        self._supervisor_done = trio.Event()
        self._process: trio.Process | None = None
        self._output_log = logging.getLogger(f"{__name__}.{config.model_id}")

    @property
    def needs_service_nursery(self) -> bool:  # type: ignore[override]
        return self.config.command is not None

    @property
    def workloads(self) -> frozenset[Workload]:
        found = {Workload.CHAT, Workload.COMPLETION}
        if self._embeddings:
            found.add(Workload.EMBEDDING)
        return frozenset(found)

    # --- lifecycle ------------------------------------------------------------------------

    async def load(self, progress: ProgressFn) -> None:
        """Start (when there is a ``command``) and wait for the server. Raises
        :class:`LoadFailed` (``load_failed``) when it exits, never answers in time, or
        cannot be started; nothing is left running then."""
        if self._client is not None:
            return
        try:
            if self.config.command is None:
                self._auth = upstream_key.headers(upstream_key.static_key(self._key_env))
            self._client = Upstream(self._base, connect_timeout=self._connect_timeout,
                                    read_timeout=self._request_timeout, write_timeout=self._connect_timeout,
                                    max_connections=self._max_connections, headers=self._auth)
        except ValueError as exc:
            raise LoadFailed(f"openai_proxy: {exc}", code="invalid_config") from None
        try:
            if self.config.command is None:
                await self._wait_ready(None, progress)
            else:
                if self.service_nursery is None:
                    raise LoadFailed(
                        "openai_proxy with a command needs Backend.service_nursery set by its owner",
                        code="load_failed",
                    )
                if not upstream_key.takes_key(self.config.args, self._key_env):
                    log.warning("%s: its server is started without an API key (name its variable in "
                                "metadata.api_key_env, or put {api_key} in args): whoever reaches %s can use it "
                                "past the cortex", self.config.model_id, self._base)
                self._supervisor_done = trio.Event()
                await self.service_nursery.start(self._supervise, progress)
        except BaseException:
            await self._close_client()
            raise

    async def unload(self) -> None:
        """Stop the supervised process (SIGTERM, SIGKILL after the grace) and the client."""
        if self._supervisor is not None:
            self._supervisor.cancel()
            with trio.CancelScope(shield=True):
                await self._supervisor_done.wait()
        await self._close_client()

    def kill(self) -> None:
        """SIGKILL the server now (the neuron is stopping): an unload waiting out its
        ``stop_grace`` returns once it is reaped."""
        if self._process is not None and self._process.returncode is None:
            self._process.kill()

    async def _close_client(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with trio.CancelScope(shield=True):
                await client.aclose()

    # --- supervision ----------------------------------------------------------------------

    async def _supervise(self, progress: ProgressFn, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        with trio.CancelScope() as scope:
            self._supervisor = scope
            try:
                failures, started = 0, False
                while True:
                    reason, was_ready = await self._run_once(progress, None if started else task_status)
                    started = True
                    failures = 1 if was_ready else failures + 1
                    if failures > self._max_restarts:
                        log.error("%s: giving up after %d restarts: %s", self.config.model_id, failures - 1, reason)
                        self._report(ModelState.FAILED, f"{reason}; gave up after {failures - 1} restarts")
                        return
                    delay = min(30.0, self._backoff * 2 ** (failures - 1))
                    log.warning("%s: %s; restarting in %.1fs", self.config.model_id, reason, delay)
                    self._report(ModelState.LOADING, f"{reason}; restarting in {delay:.1f}s")
                    await trio.sleep(delay)
            finally:
                self._supervisor = None
                self._supervisor_done.set()

    async def _run_once(self, progress: ProgressFn, task_status: Any) -> tuple[str, bool]:
        """Run the process once; returns why it ended and whether it had become ready
        (restarts that never get ready add up towards ``max_restarts``). On the first run
        (``task_status`` given) a failure raises :class:`LoadFailed` instead."""
        key = upstream_key.draw()  # a fresh one at each start
        command = upstream_key.command(self.config.command or "", self.config.args, key)
        self._auth = upstream_key.headers(key)
        if self._client is not None:
            self._client.set_headers(self._auth)
        log.info("%s: starting %s", self.config.model_id, upstream_key.masked_command(command, key))
        try:
            process = await trio.lowlevel.open_process(
                command,
                # The catalogue's env wins over the neuron's; the key over both.
                env=upstream_key.child_env({**secret_files.child_env(), **self.config.env}, self._key_env, key),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError as exc:
            if task_status is not None:
                raise LoadFailed(f"cannot start {command[0]!r}: {exc}", code="load_failed") from None
            return f"cannot start {command[0]!r}: {exc}", False
        self._process = process
        failure: LoadFailed | None = None
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(relay_lines, process.stdout,
                                   lambda line: self._output_log.info("%s", upstream_key.mask(line, key)))
                try:
                    await self._wait_ready(process, progress if task_status is not None else None)
                except LoadFailed as exc:
                    # Stop it and let the pump drain: its last lines say why it failed.
                    failure = exc
                    with trio.CancelScope(shield=True):
                        await self._stop(process)
                    nursery.cancel_scope.deadline = trio.current_time() + 2.0
                else:
                    if task_status is not None:
                        task_status.started()
                    else:
                        self._report(ModelState.LOADED, None)
                    code = await process.wait()
            if failure is None:
                return f"process exited with status {code}", True
            if task_status is not None:
                raise failure
            return str(failure), False
        finally:
            with trio.CancelScope(shield=True):
                await self._stop(process)
            self._process = None

    async def _stop(self, process: trio.Process) -> None:
        if process.returncode is not None:
            return
        process.send_signal(signal.SIGTERM)
        with trio.move_on_after(self._stop_grace):
            await process.wait()
            return
        log.warning("%s: no exit %ss after SIGTERM; sending SIGKILL", self.config.model_id, self._stop_grace)
        process.kill()
        await process.wait()

    async def _wait_ready(self, process: trio.Process | None, progress: ProgressFn | None) -> None:
        # Its own short-lived connections with short deadlines: a probe must not wait
        # request_timeout for a server that is still starting.
        probe = Upstream(self._base, connect_timeout=2.0, read_timeout=2.0, write_timeout=2.0,
                         max_connections=1, idle_timeout=0.0, headers=self._auth)
        timeout_s = int(math.ceil(self._ready_timeout))
        if progress is not None:
            progress("starting", 0, timeout_s, "seconds")
        start, delay, last = trio.current_time(), 0.05, "no answer yet"
        try:
            while (elapsed := trio.current_time() - start) < self._ready_timeout:
                if process is not None and process.poll() is not None:
                    raise LoadFailed(f"{self.config.command!r} exited with status {process.returncode} before answering", code="load_failed")
                for path in (f"{self._path}/models", urlsplit(self._base).path.rstrip("/") + "/health"):
                    try:
                        response = await probe.request("GET", path, max_body=1 << 20)
                    except BackendError as exc:
                        last = str(exc)
                        break
                    if response.status == 200:
                        if progress is not None:
                            progress("starting", timeout_s, timeout_s, "seconds")
                        return
                    last = f"{path} answered {response.status}"
                if progress is not None:
                    progress("starting", int(elapsed), timeout_s, "seconds")
                await trio.sleep(delay)
                delay = min(1.0, delay * 2)
        finally:
            await probe.aclose()
        raise LoadFailed(f"{self._base} did not answer within {self._ready_timeout}s ({last})", code="load_failed")

    def _report(self, state: ModelState, error: str | None) -> None:
        if self.status_listener is not None:
            self.status_listener(ModelStatus(self.config.model_id, state, self.kind, error=error))

    # --- inference ------------------------------------------------------------------------

    def chat(self, request: GenerateRequest) -> AsyncIterator[GenerationEvent]:
        return self._generate(request)

    def complete(self, request: GenerateRequest) -> AsyncIterator[GenerationEvent]:
        return self._generate(request)

    def _require_client(self) -> Upstream:
        if self._client is None:
            raise BackendError(f"model {self.config.model_id!r} is not loaded", code="model_not_loaded")
        return self._client

    async def _generate(self, request: GenerateRequest) -> AsyncIterator[GenerationEvent]:
        openai_shapes.validate(request, features=self.features,
                               vision=Workload.VISION in self.config.capability.workloads)
        client = self._require_client()
        body = openai_shapes.request_body(request, dialect=self._dialect, model=self._upstream_model,
                                          stream=request.stream)
        path = self._path + ("/chat/completions" if request.task is Task.CHAT else "/completions")
        if not request.stream:
            # Nobody waits for single tokens: ask the upstream for one JSON answer (one
            # parse instead of one per token, on both sides of the hop).
            yield await self._complete_once(request, path, body)
            return
        response = await client.stream("POST", path, _dumps(body), _JSON)
        try:
            if response.status != 200:
                _raise_for_status(response.status, await response.read(64 << 10))
            reader = StreamReader(request.request_id, request.sampling.stop)
            while True:
                data = await response.receive()
                for event in reader.feed(data):  # b"" at the body's end
                    yield event
                if reader.done or not data:
                    break
            yield reader.result()
            if reader.done:
                # What follows [DONE] is the body's end: read it, so that the connection
                # can serve again; a server that sends more is not waited for long.
                with trio.move_on_after(DRAIN_TIMEOUT):
                    while await response.receive():
                        pass
        finally:
            # Before its end (the consumer left, an error) this closes the connection,
            # which is how the upstream learns to stop generating.
            response.close()

    async def _complete_once(self, request: GenerateRequest, path: str, body: dict[str, Any]) -> GenerateResult:
        response = await self._require_client().request("POST", path, _dumps(body), _JSON)
        if response.status != 200:
            _raise_for_status(response.status, response.body)
        view = openai_shapes.parse_completion(loads_object(response.body, f"{self._base}'s answer"),
                                              request.sampling.stop)
        return GenerateResult(request.request_id, view.finish_reason or "stop", view.usage or Usage(), view.text,
                              tuple(view.tool_calls) if view.tool_calls else None, stop_sequence=view.stop_sequence)

    async def embed(self, request: EmbedRequest) -> EmbedResult:
        """Embed through ``/v1/embeddings`` (metadata ``embeddings: true``); vectors are
        re-normalised here, since not every server normalises."""
        if not self._embeddings:
            raise Unsupported(f"model {self.config.model_id!r} is not configured for embeddings")
        body = {"model": self._upstream_model, "input": list(request.inputs)}
        response = await self._require_client().request("POST", self._path + "/embeddings", _dumps(body), _JSON)
        if response.status != 200:
            _raise_for_status(response.status, response.body)
        answer = loads_object(response.body, f"{self._base}'s embeddings")
        try:
            vectors = np.asarray([d["embedding"] for d in sorted(answer["data"], key=lambda d: d["index"])],
                                 dtype=np.float32)
        except (KeyError, TypeError, ValueError):
            raise UpstreamProtocolError(f"{self._base}'s embeddings have an unexpected shape") from None
        vectors /= np.clip(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12, None)
        dim, blob = pack_vectors(vectors)
        return EmbedResult(request.request_id, dim, blob, openai_shapes.usage_of(answer) or Usage())


def _dumps(body: dict[str, Any]) -> bytes:
    try:
        return orjson.dumps(body)
    except TypeError as exc:  # only what the request carried in ``extra`` can get here
        raise InvalidRequest(f"a request field cannot be sent as JSON: {exc}") from None


def _raise_for_status(status: int, raw: bytes) -> NoReturn:
    """Raise the runtime error for an upstream's non-200 answer (module docstring)."""
    message = raw.decode(errors="replace")[:500]
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        body = None
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            message = err["message"]
        elif isinstance(err, str):
            message = err
    text = f"upstream answered {status}: {message}"
    if status in (429, 503):
        raise Overloaded(text)
    if status in (401, 403, 407):
        raise BackendError(f"upstream refused the neuron's credentials ({status}): {message}")
    if status == 501:
        raise Unsupported(text)
    if 400 <= status < 500:
        raise InvalidRequest(message)
    if status >= 500:
        raise BackendCrashed(text)
    raise UpstreamProtocolError(f"upstream answered with an unexpected status {status}")
