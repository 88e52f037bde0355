"""Ollama's model management on a portal, mapped onto the fabric's operator actions.

Routes (every error in Ollama's shape, :func:`.ollama_surface.ollama_errors`)::

    POST   /api/pull     fetch the model into the caches of the neurons that can hold it
                         (the operator's ``helexa models pull``), streaming Ollama's
                         progress lines from the neurons' real download progress
    DELETE /api/delete   unload the model from every neuron that holds it
    POST   /api/copy     400: names are the operator's catalogue and the portal's aliases
    POST   /api/create   400: models come from the operator's catalogue
    POST   /api/push     400: a fabric serves models, it is no registry

``pull`` and ``delete`` move models on the operator's hardware outside any metering
(a pull fills disks; a delete drops what others' requests are using), so they are the
operator's, as ``helexa models`` is: they need the operator's admin token as
``Authorization: Bearer`` (the Ollama client's ``headers=``), from an address in
``gateway.admin_clients``, whatever the portal's keys. A key holder's own requests still
load models on demand (a cold load) within the key's quotas. The model is named as the
portal names it (``name:latest`` is ``name``); a name the portal does not serve is a 404.

A streamed pull (the default) answers ``application/x-ndjson``: per neuron, a
``{"status": "pulling <model> on <neuron>"}`` line, then ``{"status", "digest",
"total", "completed"}`` lines as the neuron reports its download, then
``{"status": "success"}`` once every neuron has it, or ``{"error": ...}`` if one failed
(Ollama's client raises it). ``stream: false`` answers one such object at the end.
The digest is ``sha256:`` and the catalogue's ``sha256`` of the file, or of the name
when the catalogue gives none.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from functools import partial
from typing import Any

import trio

from helexa.protocol import LoadProgress

from .asgi import Exchange, Route
from .errors import BadRequest, GatewayError, ModelNotFound
from .ollama_api import NamedModel
from .ollama_surface import NDJSON, OllamaSurface, ollama_errors
from .openai_api import parse
from .orchestrator import Orchestrator


class ModelBody(NamedModel):
    """``pull``, ``delete`` and ``push`` bodies: ``model`` (or the legacy ``name``)."""

    insecure: bool | None = None
    stream: bool = True


def _line(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"


class OllamaModels:
    """The model management routes of a portal (see the module docstring).

    Args:
        orchestrator: its provisioner pulls and unloads, over its fleet and catalogue.
        authorize: the admin API's check of the operator's token and address; raises
            Unauthorized / Forbidden.
    """

    def __init__(self, orchestrator: Orchestrator, authorize: Callable[[Exchange], None]) -> None:
        self.fleet = orchestrator.fleet
        self.catalogue = orchestrator.catalogue
        self.provisioner = orchestrator.provisioner
        self._authorize = authorize

    def routes(self) -> list[Route]:
        e = ollama_errors
        operator = partial(ollama_errors, operator=True)  # pull and delete need the admin token
        return [
            Route("POST", "/api/pull", self.pull, keyed=False, errors=operator),
            Route("DELETE", "/api/delete", self.delete, keyed=False, errors=operator),
            Route("POST", "/api/copy", self.copy, errors=e),
            Route("POST", "/api/create", self.create, errors=e),
            Route("POST", "/api/push", self.push, errors=e),
        ]

    def _served(self, ex: Exchange, asked: str) -> str:
        """The fabric's model behind the portal's name ``asked`` (404 if it serves none)."""
        caller = ex.caller
        assert caller is not None
        served = caller.portal.serves(OllamaSurface.public_name(caller, asked))
        if served is None:
            raise ModelNotFound(asked)
        return served

    async def pull(self, ex: Exchange) -> None:
        self._authorize(ex)
        body = parse(ModelBody, await ex.body())
        model_id = self._served(ex, body.asked)
        entry = self.catalogue.get(model_id)
        if entry is None:
            raise ModelNotFound(body.asked)
        nodes = [link.node_id for link in self.fleet.usable()
                 if entry.is_feasible_on(link.descriptor.hardware, self.provisioner.settings.memory_headroom)]
        if not nodes:
            raise BadRequest(f"no usable neuron can hold model {body.asked!r}", param="model",
                             code="no_feasible_neuron")
        digest = "sha256:" + (entry.sha256 or hashlib.sha256(model_id.encode()).hexdigest())
        send, receive = trio.open_memory_channel[dict[str, Any]](math.inf)
        failures: list[GatewayError] = []

        async def one(node: str, send: trio.MemorySendChannel[dict[str, Any]]) -> None:
            async with send:
                status = f"pulling {body.asked} on {node}"
                send.send_nowait({"status": status})

                def progress(event: LoadProgress) -> None:
                    line: dict[str, Any] = {"status": status, "digest": digest, "completed": event.done}
                    if event.total is not None:
                        line["total"] = event.total
                    send.send_nowait(line)

                try:
                    await self.provisioner.operator.pull_on(model_id, node, progress)
                except GatewayError as exc:
                    failures.append(exc)

        async def run(emit: Callable[[dict[str, Any]], Any]) -> None:
            async with trio.open_nursery() as nursery:
                async with send:
                    for node in nodes:
                        nursery.start_soon(one, node, send.clone())
                async with receive:
                    async for line in receive:
                        await emit(line)

        if not body.stream:
            async def drop(_: dict[str, Any]) -> None:
                pass

            await run(drop)
            if failures:
                raise failures[0]
            await ex.out.json({"status": "success"})
            return

        await ex.out.start(200, NDJSON)

        async def emit(line: dict[str, Any]) -> None:
            await ex.out.body(_line(line))

        await run(emit)
        end = ({"error": json.loads(ollama_errors(failures[0], operator=True)[2])["error"]} if failures
               else {"status": "success"})
        await ex.out.body(_line(end), more=False)

    async def delete(self, ex: Exchange) -> None:
        self._authorize(ex)
        body = parse(ModelBody, await ex.body())
        model_id = self._served(ex, body.asked)
        holds = self.provisioner.operator.holds
        nodes = [link.node_id for link in self.fleet if holds(model_id, link.node_id)]
        if not nodes:
            raise BadRequest(f"model {body.asked!r} is loaded on no neuron, so there is nothing to delete (it stays "
                             "in the operator's catalogue)", param="model", code="not_loaded")
        for node in nodes:
            await self.provisioner.operator.unload_from(model_id, node)
        await ex.out.full(200, [], b"")

    async def copy(self, ex: Exchange) -> None:
        raise BadRequest("copy is not supported: model names are the operator's catalogue and the portal's "
                         "aliases (ask the operator for an alias)", code="unsupported")

    async def create(self, ex: Exchange) -> None:
        raise BadRequest("create is not supported: models come from the operator's catalogue (a Modelfile cannot "
                         "add one)", code="unsupported")

    async def push(self, ex: Exchange) -> None:
        raise BadRequest("push is not supported: a helexa fabric serves models, it is not a registry",
                         code="unsupported")


__all__ = ["OllamaModels", "ModelBody"]
