"""The admin API's model routes (``helexa models``): the catalogue against the fleet, and
moving models onto and off neurons. Served with the rest of :mod:`.admin`, behind the
admin token.

Routes::

    GET   /admin/models                  every catalogue model: where it is feasible (neurons
                                         that can take work now, as /v1/models), loaded,
                                         loading (with progress), cached (state "cached" where
                                         only a neuron's model cache holds it), pinned, where
                                         its loads failed lately ("load_failed": per neuron,
                                         failures in a row, the error, "retry_in" seconds of
                                         backoff left); then models loaded outside the catalogue
    GET   /admin/models/ID               one of them
    POST  /admin/models/ID/pull          {neuron?}  fetch into the cache without loading
                                         (every feasible neuron when none is named)
    POST  /admin/models/ID/load          {neuron?}  load there (or where a cold load would)
    POST  /admin/models/ID/unload        {neuron?}  unload there (or everywhere)
    POST  /admin/models/ID/pin           {neuron}   keep it loaded there (until restart); 409
                                         where it cannot fit beside the neuron's other pins
    POST  /admin/models/ID/unpin         {neuron}

``pull`` and ``load`` answer ``application/x-ndjson``: one JSON object a line as the work
goes, ``{"event": "progress", "neuron", "stage", "done", "total", "unit"}`` (from the
neuron's download and load progress), then ``{"event": "done", "neuron": ...}`` per neuron
or ``{"event": "error", "neuron", "code", "message"}``, and last ``{"event": "end", "ok"}``;
``{"event": "keepalive"}`` after every :data:`KEEPALIVE_INTERVAL` seconds without another line.
What can be refused before any work (an unknown model or neuron) is a plain 4xx.
"""

from __future__ import annotations

import json
import math
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from pydantic import BaseModel, ConfigDict, Field

from helexa.logs import redact_url
from helexa.protocol import LoadProgress, cache_key

from ..asgi import Exchange, Route
from ..errors import BadRequest, GatewayError, ModelNotFound, NotFound
from ..fleet import cached_view, holds_source, model_view
from ..orchestrator import Orchestrator
from .admin_fields import parse_body

NDJSON = [(b"content-type", b"application/x-ndjson"), (b"cache-control", b"no-cache")]


KEEPALIVE_INTERVAL = 10.0
"""Seconds of silence after which a streamed action sends :data:`KEEPALIVE`: a load's last
stage can report nothing for minutes, and the client tells a quiet cortex from a gone one
(a partition, a host down) by these lines."""
KEEPALIVE = b'{"event": "keepalive"}\n'

MODEL_ACTIONS = ("pull", "load", "unload", "pin", "unpin")
"""``POST /admin/models/MODEL/<action>``."""


def model_path_methods(rest: str) -> tuple[str, ...]:
    """The methods of ``/admin/models/<rest>``: a model (GET), and where ``rest`` ends in
    an action, that action (POST) too (a model's id may hold ``/``, so ``org/pull`` may be
    a model as well as ``org``'s pull)."""
    model_id, _, action = rest.rpartition("/")
    return ("GET", "POST") if model_id and action in MODEL_ACTIONS else ("GET",)


_Work = Callable[[Callable[[LoadProgress], None], str | None, Callable[[str], None]], Awaitable[str]]
"""A streamed action on one neuron (``None``: wherever it goes): ``(on_progress, node,
placed)``, returning the node it was done on."""


class _Target(BaseModel):
    model_config = ConfigDict(extra="forbid")

    neuron: str | None = Field(None, min_length=1)


def _parse_target(raw: bytes) -> _Target:
    body = parse_body(_Target, raw)
    assert isinstance(body, _Target)
    return body


class ModelsAdmin:
    """The model routes (see the module docstring) over ``orchestrator``'s fleet,
    catalogue and provisioner. ``guard`` wraps each handler with the admin checks."""

    def __init__(self, orchestrator: Orchestrator) -> None:
        self.fleet = orchestrator.fleet
        self.catalogue = orchestrator.catalogue
        self.provisioner = orchestrator.provisioner
        self._streams: set[trio.CancelScope] = set()
        """The streamed actions (load, pull) under way, for :meth:`cut`."""
        self._cut: GatewayError | None = None

    def cut(self, error: GatewayError) -> None:
        """The cortex's stop, past its grace: each streamed action under way ends now with an
        ``error`` event for every neuron it had not finished on, and its ``end`` line (``ok``
        false), so its client reads a whole answer that says why (``helexa models load``
        prints it) instead of a connection cut mid-body; one started after this ends so at once."""
        self._cut = error
        for scope in self._streams:
            scope.cancel()

    def routes(self, guard: Callable[[Callable[[Exchange], Awaitable[None]]], Any]) -> list[Route]:
        return [
            Route("GET", "/admin/models", guard(self.list_models), keyed=False),
            Route("GET", "/admin/models/", guard(self.show_model), keyed=False, prefix=True,
                  allow=model_path_methods),
            Route("POST", "/admin/models/", guard(self.model_action), keyed=False, prefix=True,
                  allow=model_path_methods),
        ]

    # --- views -------------------------------------------------------------------------------

    def view(self) -> list[dict[str, Any]]:
        """Every catalogue model against the fleet, then models loaded outside it."""
        pins = self.provisioner.operator.pins()
        headroom = self.provisioner.settings.memory_headroom
        links = sorted(self.fleet, key=lambda link: link.node_id)
        # Feasible on: neurons that can take work now, as /v1/models and the console count
        # them (an offline one still shows its state under "neurons").
        usable = sorted(link.node_id for link in self.fleet.usable())
        out = []
        for entry in self.catalogue:
            progress = self.provisioner.load_progress.get(entry.id)
            out.append({
                "id": entry.id, "catalogued": True, "backend": entry.backend,
                "source": redact_url(entry.source) if entry.source else None,
                "memory_mb": entry.memory_mb, "on_gpu": entry.on_gpu, "keep_warm": entry.keep_warm,
                "priority": entry.priority.name.lower(), "pinned_on": sorted(pins.get(entry.id, ())),
                "feasible_on": [link.node_id for link in links if link.node_id in usable
                                and entry.is_feasible_on(link.descriptor.hardware, headroom)],
                "loading": None if progress is None else {"stage": progress[0], "fraction": progress[1]},
                "load_failed": self.provisioner.backoff.view(entry.id, trio.current_time()),
                "neurons": self._on_neurons(entry.id, links, cache_key(entry.source, entry.sha256)),
            })
        known = {e.id for e in self.catalogue}
        others = sorted({mid for link in links for mid in link.models} - known)
        for model_id in others:
            out.append({"id": model_id, "catalogued": False, "backend": None, "source": None, "memory_mb": None,
                        "on_gpu": None, "keep_warm": False, "priority": None, "pinned_on": [], "feasible_on": [],
                        "loading": None, "load_failed": {}, "neurons": self._on_neurons(model_id, links)})
        return out

    @staticmethod
    def _on_neurons(model_id: str, links: list[Any], key: str | None = None) -> dict[str, Any]:
        """Its status on each neuron that reports it; a neuron that holds its source in its
        model cache without the model configured (restarted since) shows it ``cached``."""
        return {link.node_id: model_view(link, link.models[model_id]) if model_id in link.models
                else cached_view(link, model_id) for link in links
                if model_id in link.models or holds_source(link, key)}

    async def list_models(self, ex: Exchange) -> None:
        await ex.out.json({"object": "list", "data": self.view()})

    async def show_model(self, ex: Exchange) -> None:
        for model in self.view():
            if model["id"] == ex.path_rest:
                await ex.out.json(model)
                return
        raise ModelNotFound(ex.path_rest)

    # --- actions -----------------------------------------------------------------------------

    async def model_action(self, ex: Exchange) -> None:
        model_id, _, action = ex.path_rest.rpartition("/")
        if action not in MODEL_ACTIONS or not model_id:
            raise NotFound(f"no route /admin/models/{ex.path_rest}")
        target = _parse_target(await ex.body())
        entry = self.catalogue.get(model_id)
        if entry is None and action != "unload":
            raise ModelNotFound(model_id)
        if target.neuron is not None and self.fleet.get(target.neuron) is None:
            raise NotFound(f"no neuron {target.neuron!r}", param="neuron", code="neuron_not_found")
        if action in ("pin", "unpin"):
            if target.neuron is None:
                raise BadRequest("neuron: required to pin or unpin", param="neuron")
            if action == "pin":
                self.provisioner.operator.pin(model_id, target.neuron)
                changed = True
            else:
                changed = self.provisioner.operator.unpin(model_id, target.neuron)
            await ex.out.json({"model": model_id, "neuron": target.neuron, "pinned": action == "pin",
                               "changed": changed})
        elif action == "unload":
            holds = self.provisioner.operator.holds
            nodes = [target.neuron] if target.neuron else [l.node_id for l in self.fleet if holds(model_id, l.node_id)]
            if not nodes:
                raise BadRequest(f"model {model_id!r} is loaded on no neuron", param="model", code="not_loaded")
            for node_id in nodes:
                await self.provisioner.operator.unload_from(model_id, node_id)
            await ex.out.json({"model": model_id, "unloaded_from": nodes})
        elif action == "load":
            node = target.neuron

            async def load(on_progress: Callable[[LoadProgress], None], _node: str | None,
                           placed: Callable[[str], None]) -> str:
                return await self.provisioner.operator.load_on(model_id, node, on_progress, on_plan=placed)

            await self._stream(ex, [node], load)
        else:
            nodes = [target.neuron] if target.neuron else [
                l.node_id for l in self.fleet.usable() if entry is not None
                and entry.is_feasible_on(l.descriptor.hardware, self.provisioner.settings.memory_headroom)]
            if not nodes:
                raise BadRequest(f"no usable neuron can hold model {model_id!r}", param="neuron",
                                 code="no_feasible_neuron")

            async def pull(on_progress: Callable[[LoadProgress], None], node_id: str | None,
                           _placed: Callable[[str], None]) -> str:
                assert node_id is not None
                await self.provisioner.operator.pull_on(model_id, node_id, on_progress)
                return node_id

            await self._stream(ex, nodes, pull)

    async def _stream(self, ex: Exchange, nodes: list[str | None], work: _Work) -> None:
        """Run ``work`` for each node at once, streaming its progress and outcome as NDJSON.
        ``work`` names the neuron it chose (a load where a cold load would go) through its
        third argument, so the progress events that follow name it too."""
        send, receive = trio.open_memory_channel[dict[str, Any]](math.inf)
        ok = True
        unfinished: dict[int, str | None] = dict(enumerate(nodes))
        """Each action not finished yet: the neuron it runs on (None: not placed yet)."""

        async def one(index: int, send: trio.MemorySendChannel[dict[str, Any]]) -> None:
            nonlocal ok
            node = current = nodes[index]

            def placed(node_id: str) -> None:
                nonlocal current
                current = unfinished[index] = node_id

            async with send:
                def progress(event: LoadProgress) -> None:
                    send.send_nowait({"event": "progress", "neuron": current, "stage": event.stage,
                                      "done": event.done, "total": event.total, "unit": event.unit})
                try:
                    where = await work(progress, node, placed)
                except GatewayError as exc:
                    ok = False
                    unfinished.pop(index, None)
                    code = getattr(exc, "reason", None) or exc.code or exc.type  # the neuron's own, if it said
                    await send.send({"event": "error", "neuron": current, "code": code, "message": exc.message})
                else:
                    unfinished.pop(index, None)
                    await send.send({"event": "done", "neuron": where})

        await ex.out.start(200, NDJSON)
        with trio.CancelScope() as scope:
            self._streams.add(scope)
            if self._cut is not None:
                scope.cancel()
            try:
                async with trio.open_nursery() as nursery:
                    async with send:
                        for index in range(len(nodes)):
                            nursery.start_soon(one, index, send.clone())
                    async with receive:
                        while True:
                            with trio.move_on_after(KEEPALIVE_INTERVAL) as quiet:
                                try:
                                    event = await receive.receive()
                                except trio.EndOfChannel:
                                    break
                            await ex.out.body(KEEPALIVE if quiet.cancelled_caught
                                              else json.dumps(event).encode() + b"\n")
            finally:
                self._streams.discard(scope)
        if scope.cancelled_caught and self._cut is not None:
            ok = False
            for neuron in unfinished.values():
                await ex.out.body(json.dumps({"event": "error", "neuron": neuron, "code": self._cut.code,
                                              "message": self._cut.message}).encode() + b"\n")
        await ex.out.body(json.dumps({"event": "end", "ok": ok}).encode() + b"\n", more=False)
