"""Anthropic's Messages API on a portal: an adapter between Anthropic's shapes and the metered path.

Routes (every error in Anthropic's shape, :func:`.anthropic_api.error_shape`)::

    POST /v1/messages                streaming (SSE) or not                       (metered)
    POST /v1/messages/count_tokens   the prompt's tokens, by the edge's tokenizer

``POST /v1/messages`` parses its body (:mod:`.anthropic_requests`), makes the fabric's
request under the model name the client asked for (:mod:`.anthropic_api`), and runs it
through :class:`~.portal.metering.Metering`, which authorises the model, checks what it
can take (an image for a model that cannot see is a 400 naming the models that can),
reserves and settles the quotas and writes the ledger record; the last events of a stream
(and the body of a non-streamed answer) go out only after that record is durable, with the
usage it records. While the request waits (a cold load, a queue) the stream sends
``ping`` events. A client that disconnects cancels its request.

The API key comes as ``x-api-key`` or ``Authorization: Bearer`` (the portal app reads
both); ``anthropic-version`` and ``anthropic-beta`` are informational and accepted
whatever they say.

``count_tokens`` runs no model: it resolves the portal's name for the model (404 as
a generation would; 404 too for a model neither the catalogue nor the fleet nor a peer
has), and counts the prompt as the fabric's request would carry it with the
model's own tokenizer (:mod:`.token_counter`): exact for the vocabularies the edge mirrors
(SmolLM2's), tools included when the model's template has no tool syntax (the tools then
reach the model as a system message the neuron writes, which the count renders too); for a
template with its own tool syntax, the count leaves out the tool instructions llama.cpp
adds (a lower bound). A model this cortex has no tokenizer for is
counted by estimate (a quarter of its UTF-8 bytes, plus a few per message), as Anthropic's
own counts are documented to be estimates. The ``x-helexa-token-count`` header says which
(``exact``, ``lower_bound``, ``estimate``).
"""

from __future__ import annotations

import json
import math
from typing import Any

from helexa.protocol import GenerateRequest, Task, ToolSpec

from . import anthropic_api as api
from .anthropic_requests import CountTokensRequest, MessagesRequest
from .anthropic_stream import MessageStream, error_event
from .asgi import JSON, Exchange, Route
from .errors import ClientGone, ModelNotFound, reraise_named, schema_field
from .openai_api import parse
from .orchestrator import WaitStatus
from .portal.metering import Metering
from .prefix import session_of

ENDPOINT = "messages"
"""The ledger's ``endpoint`` for a Messages request."""


class AnthropicSurface:
    """The Anthropic routes of a portal (see the module docstring).

    Args:
        metering: the one metered path (its ``limits`` count tokens for ``count_tokens``).
    """

    def __init__(self, metering: Metering) -> None:
        self.metering = metering

    def routes(self) -> list[Route]:
        return [
            Route("POST", "/v1/messages", self.messages, metered=True, errors=api.error_shape),
            Route("POST", "/v1/messages/count_tokens", self.count_tokens, errors=api.error_shape),
        ]

    async def messages(self, ex: Exchange) -> None:
        body = parse(MessagesRequest, await ex.body())
        if body.thread is not None:
            raise api.ThreadUnsupported()
        request = api.to_generate_request(body, ex.request_id)
        image = api.image_location(body)
        caller = ex.caller
        assert caller is not None
        out = ex.out
        message_id = "msg_" + request.request_id
        session = session_of(ex.scope["headers"])  # x-session-id: back to the neuron holding the cache

        async def stream() -> None:
            encoder = MessageStream(message_id, request.model_id)

            async def ping(status: WaitStatus) -> None:
                # The first tick of a long wait commits to a 200 stream.
                await out.start()
                await out.body(encoder.ping())

            head = b""  # message_start, held back to go out with the first content
            try:
                async with self.metering.generate(caller, request, endpoint=ENDPOINT, on_wait=ping,
                                                  image=image, session=session) as gen:
                    await out.start()
                    head = encoder.start()
                    async for chunk in gen:
                        frame = encoder.chunk(chunk)
                        if head:
                            frame, head = head + frame, b""
                        if frame:
                            await out.body(frame)
                assert gen.result is not None  # the record is on disk by now
                await out.body(head + encoder.finish(gen.result))
            except ClientGone:
                raise  # the client left: nobody to tell, and no failed generation
            except Exception as exc:
                # a tool schema the neuron refused
                named = schema_field(exc, request, tools="tools", fmt=api.FORMAT_PARAM)
                if not out.started:
                    reraise_named(exc, named)
                await out.body(head + error_event(named))
            await out.body(b"", more=False)

        async def complete() -> None:
            parts: list[str] = []
            calls: list[object] = []
            try:
                async with self.metering.generate(caller, request, endpoint=ENDPOINT, image=image,
                                                  session=session) as gen:
                    async for chunk in gen:
                        parts.append(chunk.text)
                        calls.extend(chunk.tool_calls or ())
            except Exception as exc:
                reraise_named(exc, schema_field(exc, request, tools="tools", fmt=api.FORMAT_PARAM))
            result = gen.result
            assert result is not None
            parts.append(result.text)
            calls.extend(result.tool_calls or ())
            await out.json(api.message_body(message_id, request.model_id, "".join(parts), calls, result))

        await ex.until_disconnect(stream if request.stream else complete)

    async def count_tokens(self, ex: Exchange) -> None:
        body = parse(CountTokensRequest, await ex.body())
        assert ex.caller is not None
        # its key as it is now that the body is in, not at its head: a revoke between them is a 401
        caller = self.metering.current(ex.caller, self.metering.clock())
        served = caller.portal.resolve(body.model, caller.key)
        if self.metering.catalogue.get(served) is None and all(
                m["id"] != served for m in self.metering.orchestrator.models()):
            raise ModelNotFound(body.model)  # as a generation would find it: nowhere
        image = api.image_location(body)
        limits = self.metering.limits
        if limits is not None and image is not None:
            limits.check_image(served, image, named=body.model)
        messages = api.to_messages(body)
        tools, choice, _ = api.to_tools(body)
        # counted as the generation's prompt would be, tools and all
        request = GenerateRequest(ex.request_id, served, Task.CHAT, messages=tuple(messages), tools=tools,
                                  tool_choice=choice)
        count = None if limits is None else await limits.counter.count(request)
        if count is None:
            tokens, kind = estimate(messages, tools if request.wants_tools else ()), "estimate"
        else:
            tokens, kind = count.tokens, "exact" if count.exact else "lower_bound"
        await ex.out.full(200, [*JSON, (COUNT_HEADER, kind.encode())], json.dumps({"input_tokens": tokens}).encode())


COUNT_HEADER = b"x-helexa-token-count"
"""How exact a ``count_tokens`` answer is: ``exact``, ``lower_bound`` (tools offered to a
template with its own tool syntax: llama.cpp adds its own instructions for them) or ``estimate`` (no tokenizer here)."""
_MESSAGE_TOKENS = 4
"""What a chat template adds per message, about (role markers, separators), in an estimate."""


def estimate(messages: list[dict[str, Any]], tools: tuple[ToolSpec, ...]) -> int:
    """Tokens of a prompt this cortex has no tokenizer for, estimated: a quarter of its
    UTF-8 bytes (tool definitions included), plus a few per message."""
    size = sum(len(json.dumps([m.get("content"), m.get("tool_calls")], ensure_ascii=False).encode())
               for m in messages)
    size += sum(len(json.dumps([t.name, t.description, t.parameters], ensure_ascii=False).encode()) for t in tools)
    return math.ceil(size / 4) + _MESSAGE_TOKENS * len(messages)
