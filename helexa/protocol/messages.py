"""Control-plane frames between a cortex and its neurons (besides the inference ones in
:mod:`helexa.protocol.inference`).

The session, in order::

    neuron                               cortex
      Hello(node_id, versions, nonce) ->
                                      <- Challenge(nonce, version)   | Refused
      Join(proof, descriptor, models,
           public_key, signature)     ->
                                      <- Welcome(proof, interval)    | Refused
      Heartbeat ...                   ->
                                      <- UpsertModelConfig / LoadModel / UnloadModel / PullModel
      LoadProgress / ProvisioningResponse / ModelStatusChanged ->
                                      <- GenerateRequest / EmbedRequest / Cancel
      TokenChunk / GenerateResult / EmbedResult / InferenceError ->
      Shutdown (either side), Fault (either side, before closing on a protocol error)
"""

from __future__ import annotations

from dataclasses import dataclass

from .codec import added_field, message
from .hardware import NeuronDescriptor, NeuronMetrics
from .model import ModelConfig, ModelId, ModelStatus

MAX_CACHE_REPORT = 1024
"""The most cache keys a :class:`Join` or :class:`Heartbeat` carries (33 bytes each on the
wire): a cache of thousands of files reports its sources, never its files, and no more of
them than a catalogue names; the cortex keeps no more than this of what a neuron sends."""

# --- handshake ---------------------------------------------------------------------------


@message("hello")
@dataclass(frozen=True, slots=True)
class Hello:
    """The neuron's first frame: who it claims to be and which versions it speaks."""

    node_id: str
    min_version: int
    max_version: int
    nonce: bytes
    software: str = ""


@message("challenge")
@dataclass(frozen=True, slots=True)
class Challenge:
    """The cortex's answer: the version chosen and a fresh nonce to prove the token on."""

    nonce: bytes
    version: int
    cortex_id: str = ""


@message("join")
@dataclass(frozen=True, slots=True)
class Join:
    """Proof of the join token, and everything the cortex needs to rebuild its view.

    From handshake version 2 (:data:`helexa.protocol.join.IDENTITY_VERSION`), also the
    neuron's Ed25519 identity key (32 bytes) and its signature over
    :func:`helexa.protocol.auth.identity_statement`; empty from an older neuron, and never
    sent to an older cortex (it would refuse a frame with fields it does not know)."""

    proof: bytes
    descriptor: NeuronDescriptor
    models: tuple[ModelStatus, ...] = ()
    configs: tuple[ModelConfig, ...] = ()
    public_key: bytes = added_field(b"")
    signature: bytes = added_field(b"")
    cached: tuple[str, ...] = added_field(())
    """From handshake version 3 (:data:`helexa.protocol.join.CACHE_REPORT_VERSION`): the
    sources its model cache holds, as :func:`~helexa.protocol.model.cache_key` keys, at most
    :data:`MAX_CACHE_REPORT` (the most recently used), so the cortex knows at once what a
    restarted neuron holds. Never sent to an older cortex."""


@message("welcome")
@dataclass(frozen=True, slots=True)
class Welcome:
    """Accepted. ``proof`` lets the neuron check it joined the cortex holding its token."""

    proof: bytes
    session_id: str
    heartbeat_interval: float
    operator: str = ""


@message("refused")
@dataclass(frozen=True, slots=True)
class Refused:
    code: str
    reason: str


# --- liveness ----------------------------------------------------------------------------


@message("heartbeat")
@dataclass(frozen=True, slots=True)
class Heartbeat:
    seq: int
    metrics: NeuronMetrics
    models: tuple[ModelStatus, ...] = ()
    cached: tuple[str, ...] | None = added_field(None)
    """What the neuron's model cache holds (as :attr:`Join.cached`) when that changed since
    the join or the last heartbeat that said (``None``: unchanged). From handshake version 3
    only: :func:`~helexa.protocol.compat.for_earlier` leaves it out for an older cortex."""


@message("ping")
@dataclass(frozen=True, slots=True)
class Ping:
    nonce: int


@message("pong")
@dataclass(frozen=True, slots=True)
class Pong:
    nonce: int


# --- provisioning ------------------------------------------------------------------------


@message("upsert_model_config")
@dataclass(frozen=True, slots=True)
class UpsertModelConfig:
    command_id: str
    config: ModelConfig


@message("load_model")
@dataclass(frozen=True, slots=True)
class LoadModel:
    command_id: str
    model_id: ModelId
    trace: str = ""
    """The W3C ``traceparent`` of the load's span at the cortex (empty while tracing is off)."""


@message("unload_model")
@dataclass(frozen=True, slots=True)
class UnloadModel:
    """Unload a model: refuse it new work at once, let the requests it runs finish for up to
    ``grace`` seconds, then unload (cutting what is left)."""

    command_id: str
    model_id: ModelId
    grace: float = 30.0


@message("pull_model")
@dataclass(frozen=True, slots=True)
class PullModel:
    """Fetch a configured model's source into the neuron's cache without loading it
    (progress as :class:`LoadProgress`, stage ``download``)."""

    command_id: str
    model_id: ModelId


ProvisioningCommand = UpsertModelConfig | LoadModel | UnloadModel | PullModel


@message("provisioning_response")
@dataclass(frozen=True, slots=True)
class ProvisioningResponse:
    """The outcome of one provisioning command: ``ok``, or an error with its reason."""

    command_id: str
    ok: bool
    error: str | None = None
    code: str | None = None
    status: ModelStatus | None = None


@message("load_progress")
@dataclass(frozen=True, slots=True)
class LoadProgress:
    """Progress of a load: ``done`` of ``total`` ``unit`` (bytes, layers) in ``stage``."""

    command_id: str
    model_id: ModelId
    stage: str
    done: int
    total: int | None = None
    unit: str = "bytes"


@message("model_status")
@dataclass(frozen=True, slots=True)
class ModelStatusChanged:
    """A model changed state outside a command (a supervised process died, say)."""

    status: ModelStatus


# --- endings -----------------------------------------------------------------------------


@message("shutdown")
@dataclass(frozen=True, slots=True)
class Shutdown:
    """The sender is going away: stop sending it new work."""

    reason: str
    grace: float = 0.0


@message("fault")
@dataclass(frozen=True, slots=True)
class Fault:
    """A protocol error; the sender closes the connection after this frame."""

    code: str
    message: str
