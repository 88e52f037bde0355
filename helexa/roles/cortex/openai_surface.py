"""OpenAI's API on a portal: an adapter between OpenAI's shapes and the metered path.

Routes::

    POST /v1/chat/completions   streaming (SSE) or not            (metered)
    POST /v1/completions        streaming (SSE) or not            (metered)
    POST /v1/embeddings         encoding_format float or base64   (metered)
    GET  /v1/models             the models this portal serves, under their public names
    GET  /v1/models/{id}        one entry of that list (404 model_not_found otherwise)
                                (both in Anthropic's shape for Anthropic's clients: .anthropic_models)
    GET  /v1/usage              the caller's key: limits, spending, what is left

Each model route parses its body (:mod:`.openai_api`), makes the fabric's request under the
model name the client asked for, and runs it through
:class:`~.portal.metering.Metering`, which authorises the model, reserves and settles the
quotas and writes the ledger record; the final frame of a stream (and the body of a
non-streamed answer) goes out only after that record is durable. A client that
disconnects cancels its request (:meth:`.asgi.Exchange.until_disconnect`).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any

from . import anthropic_api, anthropic_models, choices
from . import openai_answers
from . import openai_api as api
from . import sse
from .asgi import ErrorShape, Exchange, Route, Scope
from .errors import BadRequest, ClientGone, ModelNotFound, embed_error, reraise_named, schema_field
from .orchestrator import WaitStatus
from .portal.metering import Caller, Metering
from .prefix import session_of


class OpenAISurface:
    """The OpenAI routes of a portal (see the module docstring).

    Args:
        metering: the one metered path.
        models: the fabric's ``/v1/models`` listing (the orchestrator's, OpenAI-shaped).
    """

    def __init__(self, metering: Metering, models: Callable[[], list[dict[str, Any]]]) -> None:
        self.metering = metering
        self._models = models
        # Partials rather than methods that await _generate: one frame fewer on every
        # request's await chain (each is entered again whenever the request's task resumes).
        self.chat = functools.partial(self._generate, model=api.ChatCompletionRequest, endpoint="chat",
                                      id_prefix="chatcmpl-")
        """``POST /v1/chat/completions``."""
        self.completions = functools.partial(self._generate, model=api.CompletionRequest, endpoint="completions",
                                             id_prefix="cmpl-")
        """``POST /v1/completions``."""

    def routes(self) -> list[Route]:
        return [
            Route("POST", "/v1/chat/completions", self.chat, metered=True),
            Route("POST", "/v1/completions", self.completions, metered=True),
            Route("POST", "/v1/embeddings", self.embeddings, metered=True),
            *self.model_routes(),
            Route("GET", "/v1/usage", self.usage),
        ]

    def model_routes(self) -> list[Route]:
        """``GET /v1/models`` and ``/v1/models/{id}``, which Anthropic's clients read too (in
        Anthropic's shape, told by their headers): a portal that speaks only Anthropic's API
        serves them as well."""
        return [
            Route("GET", "/v1/models", self.models, errors_by=_models_errors),
            Route("GET", "/v1/models/", self.model, prefix=True, errors_by=_models_errors),
        ]

    # --- generation ------------------------------------------------------------------------

    async def _generate(self, ex: Exchange, model: type, endpoint: str, id_prefix: str) -> None:
        body = api.parse(model, await ex.body())
        request = api.to_generate_request(body, ex.request_id)
        image = api.image_parts(body) if isinstance(body, api.ChatCompletionRequest) else None
        caller = ex.caller
        assert caller is not None
        out = ex.out
        response_id = id_prefix + request.request_id
        # The client's session (x-session-id, else OpenAI's ``user``) routes the request back
        # to the neuron that holds its conversation's cache.
        run = functools.partial(self.metering.generate, caller, session=session_of(ex.scope["headers"], body))

        async def keepalive(status: WaitStatus) -> None:
            # The first tick of a long wait commits to a 200 stream; each tick says what it
            # waits for (an SSE comment: clients ignore it, people read it). The model is
            # named as the client asked for it.
            await out.start()
            await out.body(sse.comment(status.describe().replace(status.model_id, request.model_id)))

        async def stream() -> None:
            encoder = sse.StreamEncoder(request, response_id, include_usage=body.include_usage, n=body.n)
            try:
                async with choices.generate(run, request, body.n, endpoint=endpoint, on_wait=keepalive,
                                            image=image) as gen:
                    await out.start()
                    head = encoder.start()
                    async for index, chunk in gen:
                        frame = encoder.chunk(chunk, index)
                        if head:
                            frame, head = head + frame, b""
                        if frame:
                            await out.body(frame)
                # the records are on disk by now
                await out.body(head + b"".join(encoder.finish(r, i) for i, r in enumerate(gen.results)))
            except ClientGone:
                raise  # the client left: nobody to tell, and no failed generation
            except Exception as exc:
                named = _schema_field(exc, request)  # a schema the neuron could not use: the client's field
                if not out.started:
                    reraise_named(exc, named)
                await out.body(sse.error_event(named))
            await out.body(b"", more=False)

        async def complete() -> None:
            answers = openai_answers.Choices(body.n)
            try:
                async with choices.generate(run, request, body.n, endpoint=endpoint, image=image) as gen:
                    async for index, chunk in gen:
                        answers.add(index, chunk)
            except Exception as exc:
                reraise_named(exc, _schema_field(exc, request))
            for index, result in enumerate(gen.results):
                answers.add(index, result)
            await out.json(openai_answers.completion_body(request, response_id, answers,
                                                          logprobs=request.sampling.logprobs))

        await ex.until_disconnect(stream if request.stream else complete)

    async def embeddings(self, ex: Exchange) -> None:
        body = api.parse(api.EmbeddingRequest, await ex.body())
        request = api.to_embed_request(body, ex.request_id)
        caller = ex.caller
        assert caller is not None

        async def work() -> None:
            try:
                result = await self.metering.embed(caller, request)
            except Exception as exc:
                raise embed_error(exc, "input") from None
            await ex.out.json(openai_answers.embedding_response(request.model_id, result, body.encoding_format))

        await ex.until_disconnect(work)

    # --- reads -----------------------------------------------------------------------------

    def _listing(self, caller: Caller) -> list[dict[str, Any]]:
        portal = caller.portal
        entries = portal.listing(self._models(), full=portal.id == "default")
        if caller.key is not None and caller.key.models is not None:
            entries = [e for e in entries if caller.key.allows(e["id"])]
        return entries

    async def models(self, ex: Exchange) -> None:
        caller = ex.caller
        assert caller is not None
        if anthropic_models.speaks_anthropic(ex.scope["headers"]):
            await ex.out.json(anthropic_models.model_page(self._listing(caller), ex.query()))
            return
        await ex.out.json({"object": "list", "data": self._listing(caller)})

    async def model(self, ex: Exchange) -> None:
        caller = ex.caller
        assert caller is not None
        for entry in self._listing(caller):
            if entry["id"] == ex.path_rest:
                if anthropic_models.speaks_anthropic(ex.scope["headers"]):
                    entry = anthropic_models.model_object(entry)
                await ex.out.json(entry)
                return
        raise ModelNotFound(ex.path_rest)

    async def usage(self, ex: Exchange) -> None:
        caller = ex.caller
        assert caller is not None
        if caller.key is None:
            raise BadRequest("usage is reported per API key, and this portal has none")
        await ex.out.json(await self.metering.usage_of(caller))


_schema_field = functools.partial(schema_field, tools="tools", fmt="response_format")


def _models_errors(scope: Scope) -> ErrorShape | None:
    """Anthropic's error shape for an Anthropic client's model reads; else OpenAI's."""
    return anthropic_api.error_shape if anthropic_models.speaks_anthropic(scope["headers"]) else None


def model_listing(orchestrator_models: list[dict[str, Any]], owned_by: str, created: int | None = None
                  ) -> list[dict[str, Any]]:
    """The orchestrator's listing in OpenAI's shape (``object``, ``created``, ``owned_by``)."""
    created = int(time.time()) if created is None else created
    return [{**m, "object": "model", "created": created, "owned_by": m["owned_by"] or owned_by}
            for m in orchestrator_models]
