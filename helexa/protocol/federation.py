"""Wire types of the federation between operators' cortex nodes.

Gossip (topic ``helexa/federation/1``): each cortex periodically publishes a signed
:class:`Announcement` of what it offers to peers.

A federated request runs over one libp2p stream (protocol ``/helexa/federation/2``, or
``/1`` with a peer of an older release: the same frames, without the request's scope)::

    asker                                  server
      FederatedHello(operator, request_id) ->
      GenerateRequest | EmbedRequest       ->
                                           <- Refusal                       (policy said no)
                                           <- TokenChunk* then GenerateResult | EmbedResult
                                              | InferenceError
                                           <- Receipt                       (signed usage)
      Cancel (at any time)                 ->

Signatures are Ed25519 by the cortex identity key over :func:`signed_payload`: the
canonical codec encoding of the message with an empty ``signature``. The key travels in
the message, and the peer id must be the key's peer id, so a verifier needs nothing else.
Pure data; nothing here imports trio or libp2p.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .codec import decode, encode, message
from .model import ModelId, Workload

ANNOUNCEMENT_VERSION = 1
"""The announcement format this build writes and accepts."""

MAX_ANNOUNCEMENT_BYTES = 64 * 1024
"""Announcements larger than this are dropped unread."""

ANNOUNCE_TOPIC = "helexa/federation/1"
FEDERATION_PROTOCOL = "/helexa/federation/1"
"""Request streams whose ``GenerateRequest`` carries no ``cache_scope`` (a release
before scoped federation refuses the field)."""
SCOPED_FEDERATION_PROTOCOL = "/helexa/federation/2"
"""The same exchange, where the ``GenerateRequest`` may carry the asker's opaque scope of
the tenant it asks for. An asker opens a stream offering both, this one first: the
peer's choice is the negotiation, with no round trip of its own (``docs/mesh.md``)."""
COUNTED_FEDERATION_PROTOCOL = "/helexa/federation/3"
"""The same exchange again, where the answer's first ``TokenChunk`` may carry the prompt's
exact count (``prompt_tokens``, what a cut stream bills), which releases up to helexa 186c5c3
of 2026-12-02 refuse. Offered first, then the two before it."""

FEDERATION_VERSIONS = {FEDERATION_PROTOCOL: 1, SCOPED_FEDERATION_PROTOCOL: 2, COUNTED_FEDERATION_PROTOCOL: 3}
"""Each request-stream protocol's peers, in :func:`~.compat.for_earlier`'s versions: what a
frame leaves out for a peer that chose it."""


@dataclass(frozen=True, slots=True)
class OfferedModel:
    """One model a cortex offers to peers.

    Prices are in the operator's accounting unit per million tokens.
    """

    model_id: ModelId
    warm: bool
    """Loaded on a neuron now (no cold load before the first token)."""
    load_time_s: float | None = None
    """Measured cold-load time, for a model that is not warm."""
    price_input: float = 0.0
    price_output: float = 0.0
    workloads: tuple[Workload, ...] = (Workload.CHAT, Workload.COMPLETION)

    def __post_init__(self) -> None:
        if self.price_input < 0 or self.price_output < 0:
            raise ValueError("prices must not be negative")


@dataclass(frozen=True, slots=True)
class PolicySummary:
    """What a peer may expect from this cortex's serving policy."""

    serves_peers: bool = True
    open_to_all: bool = True
    """False when an allow list restricts who is served."""
    rate_per_minute: float | None = None
    max_concurrent: int | None = None


@message("fed_announcement")
@dataclass(frozen=True, slots=True)
class Announcement:
    operator: str
    peer_id: str
    public_key: bytes
    """The raw 32-byte Ed25519 key; ``peer_id`` must be its peer id."""
    models: tuple[OfferedModel, ...]
    spare_slots: int
    """Requests this cortex could start now (its load signal)."""
    policy: PolicySummary
    addrs: tuple[str, ...]
    """Multiaddrs the peer can be dialled at."""
    issued_at: float
    """Unix time of signing."""
    ttl: float
    """Seconds after ``issued_at`` until the announcement (and what it offers) expires."""
    sequence: int
    """Strictly increasing per peer; an older or equal one is a replay and is dropped."""
    format_version: int = ANNOUNCEMENT_VERSION
    signature: bytes = b""


@message("fed_hello")
@dataclass(frozen=True, slots=True)
class FederatedHello:
    """Opens a federated request: who asks (the peer id comes from the secure channel)."""

    operator: str
    request_id: str
    format_version: int = ANNOUNCEMENT_VERSION


@message("fed_refusal")
@dataclass(frozen=True, slots=True)
class Refusal:
    """The serving cortex's policy refused the request; nothing was run.

    ``code`` is one of ``not_serving``, ``denied``, ``rate_limited``, ``busy``,
    ``model_not_offered``, ``bad_request``.
    """

    request_id: str
    code: str
    message: str
    retry_after: float | None = None


@message("fed_receipt")
@dataclass(frozen=True, slots=True)
class Receipt:
    """Usage of one federated request, signed by the serving cortex."""

    request_id: str
    model_id: ModelId
    prompt_tokens: int
    completion_tokens: int
    price_input: float
    price_output: float
    cost: float
    """``(prompt * price_input + completion * price_output) / 1e6``."""
    started_at: float
    ended_at: float
    server_peer_id: str
    client_peer_id: str
    server_public_key: bytes
    outcome: str = "ok"
    """``ok``, ``error`` or ``cancelled``."""
    signature: bytes = b""


def signed_payload(msg: Any) -> bytes:
    """The bytes a signature covers: ``msg`` encoded with an empty ``signature``.

    Encoded, decoded and encoded again, so that the bytes do not depend on how the
    signer happened to type a value (an ``int`` given for a ``float`` field decodes as a
    float on the verifying side)."""
    return encode(decode(encode(dataclasses.replace(msg, signature=b""))))


def cost_of(prompt_tokens: int, completion_tokens: int, price_input: float, price_output: float) -> float:
    return (prompt_tokens * price_input + completion_tokens * price_output) / 1_000_000
