"""Ollama's API on a portal: an adapter between its shapes and the metered path, so that
the tools that speak Ollama (chat front-ends, editor plugins, its Python client) work
against helexa unchanged.

Routes::

    GET  /api/version          the Ollama API version implemented (:data:`.ollama_api.VERSION`)
    GET  /api/tags             the portal's models, under their public names
    POST /api/show             one model: details, capabilities, context length
    GET  /api/ps               the portal's models loaded on some neuron now
    POST /api/chat             NDJSON stream (the default) or one object     (metered)
    POST /api/generate         NDJSON stream (the default) or one object     (metered)
    POST /api/embed            ``input`` a string or strings                 (metered)
    POST /api/embeddings       the legacy form: one ``prompt``               (metered)

(``pull``, ``delete``, ``copy``, ``create`` and ``push`` are :mod:`.ollama_models`'.)

A generation is parsed (:mod:`.ollama_api`), made into the fabric's request and run
through :class:`~.portal.metering.Metering` (model authorisation, quotas, the ledger
record) exactly as Chat Completions is. A stream is one JSON object a line: the text as it
comes, then (when the model called tools) one line with the whole ``tool_calls``, then
the final ``done: true`` line with ``done_reason``, the token counts and durations in
nanoseconds; it goes out only once the ledger record is durable. While the request waits
(a cold load, a queue) the stream sends an empty piece (``content`` / ``response`` ``""``,
``done: false``) every keep-alive interval, as the other surfaces send their keep-alives. An empty ``prompt`` /
``messages`` loads the model, as Ollama does (the way its clients preload one): the
cortex's cold load, admitted by the caller's limits as any request, then one
``done_reason: "load"`` object once it is loaded, or the load's error; with ``keep_alive``
0 (Ollama's unload) it answers ``done_reason: "unload"`` and unloads nothing (a tenant of a
shared fabric never unloads a model others use). Errors are Ollama's
``{"error": "message"}`` with its status codes, the field named
in the message (a schema the backend cannot turn into a grammar too: ``'format'`` or
``'tools'``, as the other surfaces name theirs); a stream that fails after it began ends
with such a line.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import re
import struct
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from helexa.protocol import EmbedResult, Feature, GenerateRequest, GenerateResult, Task, Workload

from . import ollama_api as api
from .asgi import Exchange, Route
from .catalogue import CatalogueEntry
from .errors import (BadRequest, ClientGone, ModelNotFound, embed_error, reraise_named, schema_field,
                     to_gateway_error)
from .ollama_keep_alive import unloads
from .openai_answers import merge_tool_calls
from .openai_api import parse
from .orchestrator import WaitStatus
from .portal.metering import Caller, Metering
from .prefix import session_of

NDJSON = [(b"content-type", b"application/x-ndjson")]
PARAMS = {"max_tokens": "options.num_predict", "response_format": "format"}
"""The shared path's field names (Chat Completions') as Ollama names them, for errors."""
_schema_field = functools.partial(schema_field, tools="tools", fmt="format")
"""A schema the backend refused as a grammar, as the 400 naming the Ollama field it came in."""
_FORMATS = {"llama_cpp": "gguf", "embeddings": "onnx", "exllamav2": "exl2", "exllamav3": "exl3"}


def _line(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"


def ollama_errors(exc: BaseException, *, operator: bool = False) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """Ollama's error shape, ``{"error": "message"}``, the field named in the message
    (``operator``: a route only the operator may use, where a failed load keeps its detail)."""
    error = to_gateway_error(exc, operator=operator)
    message = error.message
    param = PARAMS.get(error.param or "", error.param)
    if param and param != error.param:  # the shared path's word for the field, which an Ollama client never sent
        message = re.sub(rf"(?<![\w.]){re.escape(error.param or '')}(?!\w)", param, message)
    if param and param not in message:
        message = f"{param}: {message}"
    return error.status, [(b"content-type", b"application/json"), *error.headers()], json.dumps(
        {"error": message}).encode()


def _ns(seconds: float) -> int:
    return max(0, int(seconds * 1e9))


class OllamaSurface:
    """The Ollama routes of a portal (see the module docstring).

    Args:
        metering: the one metered path (its catalogue and limits describe the models).
        models: the fabric's model listing (the orchestrator's).
    """

    def __init__(self, metering: Metering, models: Callable[[], list[dict[str, Any]]]) -> None:
        self.metering = metering
        self._models = models
        self._created = time.time()

    def routes(self) -> list[Route]:
        e = ollama_errors
        return [
            Route("GET", "/api/version", self.version, keyed=False, errors=e),
            Route("GET", "/api/tags", self.tags, errors=e),
            Route("POST", "/api/show", self.show, errors=e),
            Route("GET", "/api/ps", self.ps, errors=e),
            Route("POST", "/api/chat", self.chat, metered=True, errors=e),
            Route("POST", "/api/generate", self.generate, metered=True, errors=e),
            Route("POST", "/api/embed", self.embed, metered=True, errors=e),
            Route("POST", "/api/embeddings", self.embeddings, metered=True, errors=e),
        ]

    # --- models ----------------------------------------------------------------------------

    @staticmethod
    def public_name(caller: Caller, asked: str) -> str:
        """The public name behind an Ollama model name (``name:latest`` is ``name``)."""
        named = caller.portal.config
        if asked.endswith(":latest") and asked not in named.aliases and asked not in (named.models or ()):
            return asked.removesuffix(":latest")
        return asked

    def _listing(self, caller: Caller) -> list[dict[str, Any]]:
        entries = caller.portal.listing(self._models(), full=False)
        if caller.key is not None and caller.key.models is not None:
            entries = [e for e in entries if caller.key.allows(e["id"])]
        return entries

    def _entry(self, caller: Caller, public: str) -> CatalogueEntry | None:
        served = caller.portal.serves(public)
        return self.metering.catalogue.get(served) if served is not None else None

    def _model(self, caller: Caller, listed: dict[str, Any]) -> dict[str, Any]:
        public = listed["id"]
        entry = self._entry(caller, public)
        backend = entry.backend if entry is not None else ""
        details = {"parent_model": "", "format": _FORMATS.get(backend, backend), "family": "", "families": None,
                   "parameter_size": "", "quantization_level": ""}
        return {"name": public, "model": public, "modified_at": api.timestamp(self._created),
                "size": (entry.memory_mb if entry is not None else 0) * 1024 * 1024,
                "digest": hashlib.sha256(public.encode()).hexdigest(), "details": details}

    async def version(self, ex: Exchange) -> None:
        await ex.out.json({"version": api.VERSION})

    async def tags(self, ex: Exchange) -> None:
        caller = ex.caller
        assert caller is not None
        await ex.out.json({"models": [self._model(caller, m) for m in self._listing(caller)]})

    async def ps(self, ex: Exchange) -> None:
        caller = ex.caller
        assert caller is not None
        out = []
        for listed in self._listing(caller):
            if listed.get("loaded"):
                model = self._model(caller, listed)
                out.append({**model, "expires_at": None, "size_vram": 0,
                            "context_length": self._context(caller, listed["id"])})
        await ex.out.json({"models": out})

    def _context(self, caller: Caller, public: str) -> int | None:
        served = caller.portal.serves(public)
        limits = self.metering.limits
        return limits.context_length(served) if served is not None and limits is not None else None

    async def show(self, ex: Exchange) -> None:
        body = parse(api.ShowBody, await ex.body())
        caller = ex.caller
        assert caller is not None
        public = self.public_name(caller, body.asked)
        listed = next((m for m in self._listing(caller) if m["id"] == public), None)
        if listed is None:
            raise ModelNotFound(body.asked)
        model = self._model(caller, listed)
        entry = self._entry(caller, public)
        workloads = entry.workloads if entry is not None else (Workload.CHAT, Workload.COMPLETION)
        features = entry.feature_set if entry is not None else frozenset()
        capabilities = []
        if Workload.CHAT in workloads or Workload.COMPLETION in workloads:
            capabilities.append("completion")
        if Feature.TOOLS in features:
            capabilities.append("tools")
        if Workload.EMBEDDING in workloads:
            capabilities.append("embedding")
        if Workload.VISION in workloads:
            capabilities.append("vision")
        info: dict[str, Any] = {"general.architecture": "helexa", "general.basename": public}
        context = self._context(caller, public)
        if context:
            info["helexa.context_length"] = context
        await ex.out.json({"modelfile": "", "parameters": "", "template": "", "license": "",
                           "details": model["details"], "model_info": info, "capabilities": capabilities,
                           "modified_at": model["modified_at"]})

    # --- generation ------------------------------------------------------------------------

    async def chat(self, ex: Exchange) -> None:
        body = parse(api.ChatBody, await ex.body())
        caller = ex.caller
        assert caller is not None
        asked = body.model
        if not body.messages:
            head = {"model": asked, "message": {"role": "assistant", "content": ""}}
            if unloads(body.keep_alive):
                await self._unloaded(ex, body.stream, head)
            else:
                await self._loaded(ex, body.stream, head)
            return
        request, image = api.chat_request(body, ex.request_id, self.public_name(caller, asked))
        await self._run(ex, body, request, image, asked, chat=True)

    async def generate(self, ex: Exchange) -> None:
        body = parse(api.GenerateBody, await ex.body())
        caller = ex.caller
        assert caller is not None
        asked = body.model
        if not body.prompt and unloads(body.keep_alive):  # as Ollama: its images do not matter
            await self._unloaded(ex, body.stream, {"model": asked, "response": ""})
            return
        if not body.prompt and not body.images:
            await self._loaded(ex, body.stream, {"model": asked, "response": ""})
            return
        request, image = api.generate_request(body, ex.request_id, self.public_name(caller, asked))
        await self._run(ex, body, request, image, asked, chat=False)

    async def _unloaded(self, ex: Exchange, stream: bool, head: dict[str, Any]) -> None:
        """Ollama's unload (``keep_alive`` 0, nothing to generate), answered as Ollama answers
        it (``done_reason: "unload"``) once the model is known to be one the caller may use,
        and nothing done: on a shared fabric one tenant never unloads a model others use,
        and where a model stays loaded is the orchestrator's decision. Nothing loads, runs,
        or counts against a limit."""
        caller = ex.caller
        assert caller is not None
        caller.portal.resolve(self.public_name(caller, head["model"]), caller.key)  # 404 as a request's
        obj = {**head, "created_at": api.timestamp(), "done": True, "done_reason": "unload"}
        if stream:
            await ex.out.full(200, NDJSON, _line(obj))
        else:
            await ex.out.json(obj)

    async def _loaded(self, ex: Exchange, stream: bool, head: dict[str, Any]) -> None:
        """What Ollama does with nothing to generate: load the model (the cortex's cold load,
        admitted as any request of it) and answer ``done_reason: "load"`` once it is loaded;
        a failed load is an error in Ollama's shape (a line, once the stream began)."""
        caller = ex.caller
        assert caller is not None
        out = ex.out
        request = GenerateRequest(ex.request_id, self.public_name(caller, head["model"]), Task.CHAT)

        async def keepalive(status: WaitStatus) -> None:  # as a generation's wait: an empty piece
            await out.start(200, NDJSON)
            await out.body(_line({**head, "created_at": api.timestamp(), "done": False}))

        async def load() -> None:
            try:
                await self.metering.preload(caller, request, on_wait=keepalive if stream else None)
            except ClientGone:
                raise
            except Exception as exc:
                if not out.started:
                    raise
                await out.body(_line({"error": json.loads(ollama_errors(exc)[2])["error"]}), more=False)
                return
            obj = {**head, "created_at": api.timestamp(), "done": True, "done_reason": "load"}
            if not stream:
                await out.json(obj)
            elif out.started:
                await out.body(_line(obj), more=False)
            else:
                await out.full(200, NDJSON, _line(obj))

        await ex.until_disconnect(load)

    async def _run(self, ex: Exchange, body: api.GenerateCommon, request: GenerateRequest, image: str | None,
                   asked: str, *, chat: bool) -> None:
        caller = ex.caller
        assert caller is not None
        out = ex.out
        if not body.stream:
            # One object at the end: the fabric's answer need not stream either, and one that
            # does not can be tried again elsewhere until it ends (a worker killed mid-answer).
            request = dataclasses.replace(request, stream=False)
        t0 = trio.current_time()
        first: list[float] = []
        logprobs = request.sampling.logprobs
        endpoint = "ollama_chat" if chat else "ollama_generate"

        def piece(text: str, lps: Any = None, calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
            obj: dict[str, Any] = {"model": asked, "created_at": api.timestamp()}
            if chat:
                obj["message"] = {"role": "assistant", "content": text}
                if calls:
                    obj["message"]["tool_calls"] = calls
            else:
                obj["response"] = text
            obj["done"] = False
            if logprobs and lps:
                obj["logprobs"] = api.logprobs_body(lps)
            return obj

        def final(result: GenerateResult) -> dict[str, Any]:
            end = trio.current_time()
            if first:
                start = first[0]
            else:  # not streamed: the neuron says when its first text came
                start = min(end, t0 + result.first_token_s) if result.first_token_s is not None else t0
            obj = piece("")
            obj.update(done=True, done_reason=api.done_reason(result.finish_reason),
                       total_duration=_ns(end - t0), load_duration=0,
                       prompt_eval_count=result.usage.prompt_tokens, prompt_eval_duration=_ns(start - t0),
                       eval_count=result.usage.completion_tokens, eval_duration=_ns(end - start))
            if not chat:
                obj["context"] = []
            return obj

        def run(on_wait: Callable[[WaitStatus], Awaitable[None]] | None = None):  # noqa: ANN202
            return self.metering.generate(caller, request, endpoint=endpoint, image=image, on_wait=on_wait,
                                          session=session_of(ex.scope["headers"]))

        async def keepalive(status: WaitStatus) -> None:
            # NDJSON has no comment line: an empty, unfinished piece is what Ollama's client
            # (and a front-end adding up the pieces) takes without a change.
            await out.start(200, NDJSON)
            await out.body(_line(piece("")))

        async def stream() -> None:
            parts: list[Any] = []
            try:
                async with run(keepalive) as gen:
                    await out.start(200, NDJSON)
                    async for chunk in gen:
                        if not first:
                            first.append(trio.current_time())
                        parts.extend(chunk.tool_calls or ())
                        if chunk.text or (logprobs and chunk.logprobs):
                            await out.body(_line(piece(chunk.text, chunk.logprobs)))
                result = gen.result
                assert result is not None
                lines = [piece(result.text, result.logprobs)] if result.text else []
                parts.extend(result.tool_calls or ())
                if parts and chat:
                    lines.append(piece("", calls=api.tool_calls_body(merge_tool_calls(parts))))
                lines.append(final(result))
                await out.body(b"".join(map(_line, lines)))
            except ClientGone:
                raise  # the client left: nobody to tell, and no failed generation
            except Exception as exc:
                named = _schema_field(exc, request)  # a schema the neuron could not use: the client's field
                if not out.started:
                    reraise_named(exc, named)
                await out.body(_line({"error": json.loads(ollama_errors(named)[2])["error"]}))
            await out.body(b"", more=False)

        async def complete() -> None:
            text: list[str] = []
            parts: list[Any] = []
            lps: list[Any] = []
            try:
                async with run() as gen:
                    async for chunk in gen:
                        if not first:
                            first.append(trio.current_time())
                        text.append(chunk.text)
                        parts.extend(chunk.tool_calls or ())
                        lps.extend(chunk.logprobs or ())
            except Exception as exc:
                reraise_named(exc, _schema_field(exc, request))
            result = gen.result
            assert result is not None
            text.append(result.text)
            parts.extend(result.tool_calls or ())
            lps.extend(result.logprobs or ())
            obj = final(result)
            if chat:
                obj["message"]["content"] = "".join(text)
                if parts:
                    obj["message"]["tool_calls"] = api.tool_calls_body(merge_tool_calls(parts))
            else:
                obj["response"] = "".join(text)
            if logprobs:
                obj["logprobs"] = api.logprobs_body(tuple(lps))
            await out.json(obj)

        await ex.until_disconnect(stream if body.stream else complete)

    # --- embeddings ------------------------------------------------------------------------

    async def embed(self, ex: Exchange) -> None:
        body = parse(api.EmbedBody, await ex.body())
        if body.dimensions is not None:
            raise BadRequest("dimensions is not supported: each model answers in its own size",
                             param="dimensions", code="unsupported")

        async def work() -> None:
            truncate = body.truncate is not False  # Ollama's default: cut to the context
            vectors, result, took = await self._embed(ex, body.model, body.input, "input", truncate)
            await ex.out.json({"model": body.model, "embeddings": vectors, "total_duration": took,
                               "load_duration": 0, "prompt_eval_count": result.usage.prompt_tokens})

        await ex.until_disconnect(work)

    async def embeddings(self, ex: Exchange) -> None:
        body = parse(api.EmbeddingsBody, await ex.body())

        async def work() -> None:
            vectors, _, _ = await self._embed(ex, body.model, body.prompt, "prompt", True)
            await ex.out.json({"embedding": vectors[0]})

        await ex.until_disconnect(work)

    async def _embed(self, ex: Exchange, asked: str, inputs: str | list[str], param: str, truncate: bool
                     ) -> tuple[list[list[float]], EmbedResult, int]:
        caller = ex.caller
        assert caller is not None
        request = api.embed_request(inputs, ex.request_id, self.public_name(caller, asked), param, truncate=truncate)
        t0 = trio.current_time()
        try:
            result = await self.metering.embed(caller, request)
        except Exception as exc:
            raise embed_error(exc, param) from None
        values = struct.unpack(f"<{len(result.vectors) // 4}f", result.vectors)
        dim = result.dim or 1
        vectors = [list(values[i:i + dim]) for i in range(0, len(values), dim)]
        return vectors, result, _ns(trio.current_time() - t0)
