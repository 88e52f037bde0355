"""OpenAI's Responses API on a portal: an adapter between its shapes and the metered path.

Routes::

    POST   /v1/responses                    streaming (SSE, named events) or not      (metered)
    GET    /v1/responses/{id}               a stored response, to the key that made it
    GET    /v1/responses/{id}/input_items   its input items, paged (:mod:`.responses_items`)
    DELETE /v1/responses/{id}               deletes it
    POST   /v1/responses/{id}/cancel        400: only background responses can be cancelled,
                                            and helexa runs none (``background`` is refused)

A request is parsed (:mod:`.responses_api`; a malformed one is a 400 naming the field),
continued from its ``previous_response_id``'s stored conversation, made into the
fabric's :class:`GenerateRequest` and run through :class:`~.portal.metering.Metering`
(model authorisation, quotas, the ledger record) exactly as Chat Completions is; the
answer is built by :class:`~.responses_stream.ResponseBuilder`. With ``store`` (the
default) the finished Response and its conversation are kept
(:mod:`.portal.response_store`) for the portal's ``responses_retention`` *before* its
final event or body goes out, so a client may continue it the moment it has it. While a
stream waits (a cold load) it sends SSE comments. Errors are OpenAI's envelope, with the
shared path's field names given as this API names them (``max_output_tokens``, ``input``,
``text.format``).
"""

from __future__ import annotations

import functools
import json
from typing import Any

from . import openai_api
from . import sse
from .asgi import Exchange, Route
from .errors import (BadRequest, ClientGone, NotFound, error_body, reraise_named, schema_field,
                     to_gateway_error)
from .orchestrator import WaitStatus
from .portal.metering import Caller, Metering
from .portal.response_store import ResponseStore, StoredResponse
from .prefix import session_of
from .responses_api import PARAMS, ResponsesRequest, output_messages, to_generate_request
from .responses_items import input_items, item_page
from .responses_stream import ResponseBuilder

_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def frame(event: dict[str, Any]) -> bytes:
    """One named SSE event (``event: <type>`` then its ``data:``)."""
    return b"event: " + event["type"].encode() + b"\n" + sse.data(event)


def responses_errors(exc: BaseException) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """OpenAI's error envelope, its ``param`` named as the Responses API names the field."""
    error = to_gateway_error(exc)
    body = error_body(error)
    if error.param in PARAMS:
        body["error"]["param"] = PARAMS[error.param]
    return error.status, [(b"content-type", b"application/json"), *error.headers()], json.dumps(body).encode()


_schema_field = functools.partial(schema_field, tools="tools", fmt="text.format")


def path_methods(rest: str) -> tuple[str, ...]:
    """The methods of ``/v1/responses/<rest>``: a response (``ID``: GET, DELETE), its
    ``ID/input_items`` (GET) and ``ID/cancel`` (POST), else none (404)."""
    response_id, _, sub = rest.partition("/")
    if not response_id:
        return ()
    return {"": ("GET", "DELETE"), "input_items": ("GET",), "cancel": ("POST",)}.get(sub, ())


class ResponsesSurface:
    """The Responses routes of a portal (see the module docstring).

    Args:
        metering: the one metered path (its ``blocking`` and ``clock`` serve the store too).
        store: where stored responses are kept.
    """

    def __init__(self, metering: Metering, store: ResponseStore) -> None:
        self.metering = metering
        self.store = store

    def routes(self) -> list[Route]:
        return [
            Route("POST", "/v1/responses", self.create, metered=True, errors=responses_errors),
            Route("GET", "/v1/responses/", self.retrieve, prefix=True, errors=responses_errors, allow=path_methods),
            Route("DELETE", "/v1/responses/", self.delete, prefix=True, errors=responses_errors, allow=path_methods),
            Route("POST", "/v1/responses/", self.cancel, prefix=True, errors=responses_errors, allow=path_methods),
        ]

    async def _stored(self, caller: Caller, response_id: str, param: str | None = None) -> StoredResponse:
        found = None
        if "/" not in response_id:
            found = await self.metering.blocking(self.store.get, response_id, caller.portal.id, caller.key_id,
                                                 self.metering.clock())
        if found is None:
            if param is not None:
                raise NotFound(f"Previous response with id '{response_id}' not found.", param=param,
                               code="previous_response_not_found")
            raise NotFound(f"No response found with id '{response_id}'.", code="not_found")
        return found

    async def create(self, ex: Exchange) -> None:
        body = openai_api.parse(ResponsesRequest, await ex.body())
        caller = ex.caller
        assert caller is not None
        history: list[dict[str, Any]] = []
        if body.previous_response_id is not None:
            history = (await self._stored(caller, body.previous_response_id, "previous_response_id")).history
        request, conversation, image = to_generate_request(body, ex.request_id, history)
        items = input_items(body) if body.stored else []
        builder = ResponseBuilder(body, "resp_" + request.request_id)
        out = ex.out

        def run():  # noqa: ANN202
            return self.metering.generate(caller, request, endpoint="responses", on_wait=keepalive, image=image,
                                          session=session_of(ex.scope["headers"], body))

        async def keepalive(status: WaitStatus) -> None:
            await out.start()
            await out.body(sse.comment(status.describe().replace(status.model_id, request.model_id)))

        async def stream() -> None:
            began = False
            try:
                async with run() as gen:
                    await out.start()
                    await out.body(b"".join(map(frame, builder.start())))
                    began = True
                    async for chunk in gen:
                        events = builder.chunk(chunk)
                        if events:
                            await out.body(b"".join(map(frame, events)))
                result = gen.result
                tail = builder.finish(result)
                if body.stored:
                    await keep_built()
                await out.body(b"".join(map(frame, [*tail, builder.completed()])))
            except ClientGone:
                raise  # the client left: nobody to tell, and no failed generation
            except Exception as exc:
                named = _schema_field(exc, request)  # a schema the neuron could not use: the client's field
                if not out.started:
                    reraise_named(exc, named)
                head = b"" if began else b"".join(map(frame, builder.start()))
                await out.body(head + frame(builder.failed(to_gateway_error(named))))
            await out.body(b"", more=False)

        async def keep_built() -> None:
            now = self.metering.clock()
            response = builder.response
            await self.metering.blocking(self.store.put, StoredResponse(
                response["id"], caller.portal.id, caller.key_id, now, now + caller.portal.config.responses_retention,
                response, [*conversation, *output_messages(response["output"])], items))

        async def complete() -> None:
            try:
                async with run() as gen:
                    async for chunk in gen:
                        builder.chunk(chunk)
            except Exception as exc:
                reraise_named(exc, _schema_field(exc, request))
            builder.finish(gen.result)
            if body.stored:
                await keep_built()
            await out.json(builder.response)

        await ex.until_disconnect(stream if body.stream else complete)

    async def retrieve(self, ex: Exchange) -> None:
        caller = ex.caller
        assert caller is not None
        response_id, _, rest = ex.path_rest.partition("/")
        if rest == "input_items":
            stored = await self._stored(caller, response_id)
            await ex.out.json(item_page(stored.input_items, ex.query()))
        elif not rest:
            stored = await self._stored(caller, response_id)
            if ex.query().get("stream", "false") != "false":
                # OpenAI streams only a background response's events, and helexa runs none: the
                # SDK's retrieve(stream=True) read this JSON as an empty stream, silently.
                raise BadRequest("Streaming a stored response is only for responses created with background=true, "
                                 "and this server does not run background responses: retrieve it without stream.",
                                 param="stream", code="unsupported")
            await ex.out.json(stored.body)
        else:
            raise NotFound(f"no route /v1/responses/{ex.path_rest}")

    async def cancel(self, ex: Exchange) -> None:
        """Only a ``background`` response can be cancelled (OpenAI's rule), and helexa
        refuses ``background``: a stored response is a 400 that says so, anything else 404."""
        caller = ex.caller
        assert caller is not None
        response_id, _, rest = ex.path_rest.partition("/")
        if rest != "cancel":
            raise NotFound(f"no route /v1/responses/{ex.path_rest}")
        await self._stored(caller, response_id)
        raise BadRequest("Cannot cancel a synchronous response: only responses created with background=true can "
                         "be cancelled, and this server does not run background responses.", code="unsupported")

    async def delete(self, ex: Exchange) -> None:
        caller = ex.caller
        assert caller is not None
        response_id = ex.path_rest
        gone = "/" not in response_id and await self.metering.blocking(
            self.store.delete, response_id, caller.portal.id, caller.key_id, self.metering.clock())
        if not gone:
            raise NotFound(f"No response found with id '{response_id}'.", code="not_found")
        await ex.out.json({"id": response_id, "object": "response", "deleted": True})


__all__ = ["ResponsesSurface", "responses_errors", "frame"]
