"""Peering: the glue between this cortex's gateway and its :class:`Federation`.

Three adapters, each a thin shell over objects the cortex already has:

* :class:`FleetOffer` — what this cortex offers to peers (``offer_fn`` / ``spare_fn``):
  catalogue models some usable neuron could hold, ``warm`` when one has it loaded, priced
  from the catalogue (``price_in`` / ``price_out``), with the provisioner's last measured
  cold-load time.
* :class:`LocalServing` — runs a peer's request through this cortex's own
  :class:`~.orchestrator.Orchestrator` (scheduling, cold loads and failover included,
  never out to another peer, so requests cannot loop). Failures are mapped through
  :func:`~.errors.to_gateway_error` into an exception with ``code`` and ``retryable``,
  which the federation sends to the asker as an ``InferenceError``.
* :class:`PeerRouter` — the orchestrator's :class:`~.dispatch.RemoteRouter`: ``route``
  hands back a :class:`PeerHandle`, a :class:`~.dispatch.Target` like a neuron link, whose ``generate`` is
  :meth:`Federation.route` and ``embed`` :meth:`Federation.embed`. Federation errors
  propagate as they are and become HTTP statuses in :mod:`.errors`.

  The asking portal's routing preferences (:data:`.portal.routing.ASK_POLICY`, set by
  the metered path around its orchestrator call) narrow the operator's outbound policy
  for that request: which peers and at what price. When a peer has answered, the
  request's receipt (as the federation ledger recorded it) is kept for
  :meth:`PeerRouter.take_receipt`, which links it to the usage ledger's row.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import trio

from helexa.protocol import EmbedRequest, EmbedResult, GenerateRequest, GenerateResult, ModelState, TokenChunk
from helexa.protocol.inference import OutputFormat
from helexa.protocol.federation import OfferedModel, Receipt

from .catalogue import Catalogue, CatalogueEntry
from .dispatch import Generation
from .errors import BadRequest, NoCapacity, to_gateway_error
from .federation.ledger import CONSUMED
from .federation.policy import AskPolicy
from .federation.service import Federation
from .fleet import Fleet
from .neuron_link import NeuronLink
from .orchestrator import Orchestrator
from .portal.routing import ASK_POLICY
from .provisioner import Provisioner
from .schema_check import check_schema

PEER_NODE_ID = "federation"
"""The node id under which requests sent to peers appear in metrics and live load."""


class FleetOffer:
    """``offer_fn`` and ``spare_fn`` of the :class:`Federation`, read from the fleet.

    Args:
        fleet, catalogue, provisioner: the cortex's own.
        slots_per_neuron: requests a usable neuron is counted as able to run at once.
    """

    def __init__(self, fleet: Fleet, catalogue: Catalogue, provisioner: Provisioner, *,
                 slots_per_neuron: int = 4) -> None:
        self.fleet = fleet
        self.catalogue = catalogue
        self.provisioner = provisioner
        self.slots_per_neuron = slots_per_neuron

    def offer(self) -> Sequence[OfferedModel]:
        """Catalogue models a usable neuron could hold (only those: a model loaded outside
        the catalogue is never offered), warm when one has it loaded."""
        usable = self.fleet.usable()
        return [m for entry in self.catalogue if (m := self._offered(entry, usable)) is not None]

    def offered(self, model_id: str) -> OfferedModel | None:
        """:meth:`offer`'s entry for ``model_id`` alone (None: not offered), for the
        check of every request a peer sends, without building the whole offer."""
        entry = self.catalogue.get(model_id)
        return None if entry is None else self._offered(entry, self.fleet.usable())

    def _offered(self, entry: CatalogueEntry, usable: list[NeuronLink]) -> OfferedModel | None:
        warm = any((st := link.models.get(entry.id)) is not None and st.state is ModelState.LOADED
                   for link in usable)
        headroom = self.provisioner.settings.memory_headroom
        if not warm and not any(entry.is_feasible_on(link.descriptor.hardware, headroom) for link in usable):
            return None
        return OfferedModel(entry.id, warm, load_time_s=self.provisioner.load_times.get(entry.id),
                            price_input=entry.price_in, price_output=entry.price_out,
                            workloads=tuple(entry.workloads))

    def spare(self) -> int:
        usable = self.fleet.usable()
        return max(0, self.slots_per_neuron * len(usable) - sum(link.in_flight for link in usable))


class ServeFailure(Exception):
    """A peer's request failed here; ``code`` and ``retryable`` cross the hop."""

    def __init__(self, message: str, *, code: str, retryable: bool) -> None:
        super().__init__(message)
        self.code = code
        self.retryable = retryable


def _failure(exc: Exception) -> ServeFailure:
    error = to_gateway_error(exc)  # logs unexpected ones; their text never leaves
    return ServeFailure(error.message, code=error.code or "internal_error", retryable=isinstance(error, NoCapacity))


class _Frames:
    """A local :class:`Generation`, its failures turned into :class:`ServeFailure`."""

    def __init__(self, gen: Generation) -> None:
        self._gen = gen

    def __aiter__(self) -> "_Frames":
        return self

    async def __anext__(self) -> TokenChunk | GenerateResult:
        try:
            return await self._gen.__anext__()
        except (StopAsyncIteration, ServeFailure):
            raise
        except Exception as exc:
            raise _failure(exc) from None


class _LocalGeneration:
    """:meth:`LocalServing.generate`'s context manager: a small class rather than an
    ``asynccontextmanager`` generator over an ``AsyncExitStack`` (on every served
    federated request's path)."""

    __slots__ = ("_running",)

    def __init__(self, running: Any) -> None:
        self._running = running

    async def __aenter__(self) -> _Frames:
        try:
            return _Frames(await self._running.__aenter__())
        except Exception as exc:
            raise _failure(exc) from None

    async def __aexit__(self, *exc: Any) -> bool | None:
        return await self._running.__aexit__(*exc)


class LocalServing:
    """``serve_generate`` / ``serve_embed`` of the :class:`Federation`, on the local fleet."""

    def __init__(self, orchestrator: Orchestrator) -> None:
        self.orchestrator = orchestrator

    def generate(self, request: GenerateRequest) -> "_LocalGeneration":
        """Run a peer's generation here (``async with serving.generate(request) as
        frames``). Leaving the context early (the peer cancelled) leaves the
        orchestrator's, which cancels it on the neuron.

        Raises:
            ServeFailure: it could not start (unknown model, no capacity, a failed load).
        """
        # A peer's request skips this cortex's API surfaces, so the edge's checks of what
        # the request carries run here: a schema llama.cpp cannot use (or one whose grammar
        # takes it seconds to build) is refused before it costs a neuron anything.
        try:
            check_peer_request(request, self.orchestrator.catalogue.get(request.model_id))
        except BadRequest as exc:
            raise ServeFailure(exc.message, code="invalid_request", retryable=False) from None
        # A peer's own prompt count is not trusted here: the neuron would skip its context
        # check for it. This cortex's neurons count the prompt themselves.
        if request.prompt_tokens is not None:
            request = replace(request, prompt_tokens=None)
        return _LocalGeneration(self.orchestrator.generate(request, endpoint="federation", allow_peers=False))

    async def embed(self, request: EmbedRequest) -> EmbedResult:
        """Run a peer's embedding request here. Raises :class:`ServeFailure`."""
        try:
            return await self.orchestrator.embed(request, allow_peers=False)
        except Exception as exc:
            raise _failure(exc) from None


def check_peer_request(request: GenerateRequest, entry: CatalogueEntry | None) -> None:
    """The edge's checks of a generation request that came from a peer (pure): its
    structured-output schema and its tools' parameters (:func:`.schema_check.check_schema`),
    and ``max_tokens`` within the model's ``max_output``. Raises :class:`BadRequest`."""
    fmt = request.response_format
    if fmt is not None and fmt.kind is OutputFormat.JSON_SCHEMA and fmt.schema is not None:
        check_schema(fmt.schema, "response_format.json_schema.schema")
    for i, tool in enumerate(request.tools):
        if tool.parameters is not None:
            check_schema(tool.parameters, f"tools[{i}].function.parameters")
    max_tokens = request.sampling.max_tokens
    if entry is not None and entry.max_output and max_tokens and max_tokens > entry.max_output:
        raise BadRequest(f"max_tokens {max_tokens} is over model {request.model_id!r}'s limit of {entry.max_output}",
                         param="max_tokens")


_RECEIPTS_KEPT = 10_000


class PeerHandle:
    """A peer cortex as a :class:`~.dispatch.Target`, driven like a neuron link.

    ``also`` narrows the outbound policy (the asking portal's preferences); ``router``
    keeps each request's receipt once it ended.
    """

    def __init__(self, federation: Federation, router: "PeerRouter | None" = None, also: AskPolicy | None = None
                 ) -> None:
        self.federation = federation
        self.node_id = PEER_NODE_ID
        self.peer_id: str | None = None
        """The peer that served the last request, once it answered."""
        self._router = router
        self._also = also

    def generate(self, request: GenerateRequest) -> "_PeerGeneration":
        """:meth:`Federation.route` (``async with handle.generate(request) as frames``);
        raises the federation's errors (see its docstring)."""
        return _PeerGeneration(self, request)

    async def embed(self, request: EmbedRequest, *, timeout: float) -> EmbedResult:
        try:
            with trio.fail_after(timeout):
                return await self.federation.embed(request, also=self._also)
        finally:
            if self._router is not None:
                with trio.CancelScope(shield=True):
                    await self._router.keep_receipt(request.request_id)


class _PeerGeneration:
    """:meth:`PeerHandle.generate`'s context manager: a small class rather than an
    ``asynccontextmanager`` generator (a generator, its frames and contextlib's wrapper
    on every federated request's path, ~3% of the asking cortex's CPU)."""

    __slots__ = ("_handle", "_request", "_route", "_frames")

    def __init__(self, handle: PeerHandle, request: GenerateRequest) -> None:
        self._handle = handle
        self._request = request
        self._frames: Any = None

    async def __aenter__(self) -> Any:
        handle = self._handle
        self._route = handle.federation.route(self._request, also=handle._also)
        self._frames = frames = await self._route.__aenter__()
        handle.peer_id = frames.peer_id
        return frames

    async def __aexit__(self, *exc: Any) -> None:
        try:
            await self._route.__aexit__(*exc)
        finally:
            # The receipt the route recorded, kept from memory: reading it back from the
            # ledger cost a worker-thread hop on every federated answer's path.
            frames, router = self._frames, self._handle._router
            if frames.receipt is not None and router is not None:
                router.remember(self._request.request_id, frames.receipt)


class PeerRouter:
    """The orchestrator's :class:`~.dispatch.RemoteRouter` over a :class:`Federation`,
    under the asking portal's routing preferences (see the module docstring)."""

    def __init__(self, federation: Federation) -> None:
        self.federation = federation
        self._receipts: OrderedDict[str, tuple[str, str]] = OrderedDict()

    def can_route(self, model_id: str) -> bool:
        return self.federation.can_route(model_id, also=ASK_POLICY.get())

    def fail_streams(self, error: Exception) -> None:
        """The cortex's stop, past its grace: every peer's answer being read ends with
        ``error`` at its next frame (``Cancel`` sent, the receipt collected), as a local
        neuron's stream does, so its surface ends the answer before the connections close."""
        fed = self.federation
        fed.cut_error = error
        for remote in list(fed.answering):
            remote.fail(error)
        for stream in list(fed.first_waits):  # waiting for the first frame: now (StreamTimeout)
            interrupt = getattr(stream, "interrupt", None)
            if interrupt is not None:
                interrupt()

    def unavailable(self, model_id: str) -> float | None:
        return self.federation.unavailable(model_id, also=ASK_POLICY.get())

    async def keep_receipt(self, request_id: str) -> None:
        """Keep the consumed receipt of ``request_id`` (as recorded in the federation
        ledger) for :meth:`take_receipt`; the oldest are dropped past a bound."""
        entry = await trio.to_thread.run_sync(self.federation.ledger.get, CONSUMED, request_id)
        if entry is not None:
            self.remember(request_id, entry.receipt)

    def remember(self, request_id: str, receipt: Receipt) -> None:
        """Keep ``receipt`` (as the ledger recorded it) for :meth:`take_receipt`."""
        self._receipts[request_id] = (receipt.server_peer_id, receipt.signature.hex())
        while len(self._receipts) > _RECEIPTS_KEPT:
            self._receipts.popitem(last=False)

    async def take_receipt(self, request_id: str) -> tuple[str, str] | None:
        """``(peer id, receipt signature hex)`` of a request a peer served, once (None if
        no peer served it)."""
        return self._receipts.pop(request_id, None)

    def listing(self) -> dict[str, dict[str, Any]]:
        """``/v1/models`` fields of each model peers offer us: ``federated``, the
        ``operators`` and ``peers`` serving it (best offer first), and ``loaded`` (warm
        on at least one of them)."""
        out: dict[str, dict[str, Any]] = {}
        for model_id, offers in self.federation.remote_models().items():
            out[model_id] = {
                "loaded": any(o.model.warm for o in offers),
                "federated": True,
                "operators": list(dict.fromkeys(o.operator for o in offers)),
                "peers": [o.peer_id for o in offers],
            }
        return out

    async def route(self, request: GenerateRequest | EmbedRequest) -> PeerHandle | None:
        """A handle that sends ``request`` to the best peer; None when no peer offers the
        model (a 404). A peer is chosen, and the ask policy applied, when the handle runs:
        a model peers offer but our policy excludes raises ``OutboundRefused`` (403) there."""
        also = ASK_POLICY.get()
        if not self.federation.can_route(request.model_id, also=also) and not self._offered(request.model_id):
            return None
        return PeerHandle(self.federation, self, also)

    def _offered(self, model_id: str) -> bool:
        return bool(self.federation.table.offers(model_id, time.time()))
