"""The cortex's configuration (``cortex.toml``; see ``examples/cortex.toml``).

One :class:`CortexConfig` is built at start and passed down whole: each part of the cortex
reads its own table (``gateway``, ``orchestrator``, ``mesh``, ``federation``) and the
top-level fields it needs; nothing copies it into a settings type of its own.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from helexa.config import SocketAddr
from helexa.protocol import DEFAULT_MAX_FRAME


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "helexa" / "cortex"


class GatewayConfig(BaseModel):
    """``[gateway]``: the HTTP API's server and limits (its address is ``gateway_socket``)."""

    model_config = ConfigDict(extra="forbid")

    server: Literal["helexa", "hypercorn"] = "helexa"
    """``helexa``: the lean HTTP/1.1 server (:mod:`.http`, measured several times
    cheaper per request); ``hypercorn``: hypercorn's trio worker (HTTP/2 capable)."""
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    """Request bodies over this get 413."""
    body_timeout: float = Field(30.0, gt=0)
    """Seconds a client may take to send its request head or body."""
    send_timeout: float = Field(60.0, gt=0)
    """Seconds a client may take to accept one write of a response."""
    keep_alive_timeout: float = Field(75.0, gt=0)
    keep_alive_max_requests: int = Field(100_000, ge=1)
    """Requests served on one connection before it is closed (hypercorn's default is 1000)."""
    owned_by: str = "helexa"
    admin_clients: list[str] = Field(default_factory=lambda: ["127.0.0.1", "::1"])
    """Client addresses allowed on /admin/* (the fleet view); loopback only by default."""


class OrchestratorConfig(BaseModel):
    """``[orchestrator]``: cold loads, placement and dispatch deadlines."""

    model_config = ConfigDict(extra="forbid")

    load_timeout: float = Field(600.0, gt=0)
    """How long a neuron may take to answer a LoadModel."""
    command_timeout: float = Field(30.0, gt=0)
    """How long a neuron may take to answer UpsertModelConfig / UnloadModel."""
    cold_load_wait: float = Field(300.0, gt=0)
    """How long a request waits for a cold load before getting 503."""
    memory_headroom: float = Field(0.9, gt=0, le=1)
    """Fraction of a neuron's memory pool the provisioner plans to fill."""
    retry_after: float = Field(5.0, gt=0)
    """Retry-After (seconds) on a 503 for want of capacity."""
    warm_retry: float = Field(30.0, gt=0)
    """Seconds between attempts to load a keep-warm model that failed to load."""
    first_token_timeout: float = Field(120.0, gt=0)
    """Seconds a neuron may take to produce the first output of a generation."""
    idle_timeout: float = Field(60.0, gt=0)
    """Seconds a generation may go without progress (no output from the neuron, or the
    client not taking it) before it is abandoned."""
    embed_timeout: float = Field(60.0, gt=0)
    route_timeout: float = Field(10.0, gt=0)
    """Seconds the federation may take to find a peer for a model."""
    max_attempts: int = Field(3, ge=1)
    """Neurons tried for one request that has not started."""
    keepalive_interval: float = Field(10.0, gt=0)
    """Seconds between keep-alive callbacks while a request waits (a cold load, the queue)."""
    queue_timeout: float = Field(300.0, gt=0)
    """Seconds a request may wait for capacity (a free slot, a swap, its model's load)
    before 503; a request may ask for less."""
    max_queue: int = Field(1000, ge=1)
    """Requests waiting per model; past it, 503 at once."""
    retry_after_max: float = Field(300.0, gt=0)
    """The most a queue's Retry-After says (computed from how fast the queue drains)."""
    default_slots: int = Field(0, ge=0)
    """Requests a neuron runs at once for a model whose config gives no ``n_parallel``
    (llama.cpp's default of 2 is known); 0: no limit at the cortex, the backend queues."""
    swap_policy: Literal["cost", "lru", "fifo"] = "cost"
    """How models give way to the ones the queue waits for: ``cost`` (load time times
    demand, minimum residency, drain first), ``lru`` or ``fifo`` (see placement.py)."""
    min_residency: float = Field(30.0, ge=0)
    """Seconds a loaded model stays before it may be evicted for another (``cost``)."""
    swap_drain: float = Field(10.0, ge=0)
    """Seconds a resident model's queued and running work may hold off its eviction (``cost``)."""
    drain_grace: float = Field(60.0, ge=0)
    """Seconds the requests running on a model being unloaded get to finish before they are cut."""
    routing: Literal["cache", "least_busy"] = "cache"
    """``cache``: to the neuron holding the session or the prompt's longest prefix, within
    ``cache_max_skew``; ``least_busy``: by live load alone."""
    cache_max_skew: int = Field(2, ge=0)
    """A neuron this many requests busier than the least busy one loses its cache preference."""
    prefix_block_chars: int = Field(256, ge=16)
    """Characters of rendered prompt per hashed block of the prefix index."""
    prefix_cache_blocks: int = Field(16384, ge=0)
    """Blocks the prefix index remembers per neuron and model (0: no prefix routing)."""


class MeshConfig(BaseModel):
    """The libp2p mesh between operators' cortex nodes."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = False
    listen: str = "/ip4/127.0.0.1/tcp/0"
    bootstrap: list[str] = Field(default_factory=list)
    announce_interval: float = Field(5.0, gt=0)
    mdns: bool = False


class FederationConfig(BaseModel):
    """Whom this cortex serves over the mesh, and where it may send requests out
    (``[federation]``; used only when the mesh is enabled).

    Defaults, chosen to be safe without being useless: peers are served, but only the
    models in this operator's catalogue that its own neurons can hold (never a model a
    neuron happens to have loaded outside the catalogue), each peer at most
    ``rate_per_second`` (burst ``burst``) and ``max_concurrent_per_peer`` at a time.
    Requests go out to any peer (``outbound = "any"``) only for models the local fleet
    cannot serve; the mesh itself is off unless asked for, so nothing leaves a cortex
    whose operator did not join it. Set ``outbound = "listed"`` with ``peers`` /
    ``operators`` to trust only some operators, or ``"never"``.
    """

    model_config = ConfigDict(extra="forbid")

    serve_peers: bool = True
    allow_peers: list[str] = Field(default_factory=list)
    """Peer ids served; when this or ``allow_operators`` is non-empty, only those."""
    allow_operators: list[str] = Field(default_factory=list)
    deny_peers: list[str] = Field(default_factory=list)
    """Never served (checked before the allow lists)."""
    deny_operators: list[str] = Field(default_factory=list)
    rate_per_second: float = Field(5.0, gt=0)
    """Sustained requests per second per peer (a token bucket of ``burst``)."""
    burst: int = Field(10, ge=1)
    max_concurrent_per_peer: int = Field(4, ge=1)
    models: list[str] | None = None
    """Models offered to peers; unset: every catalogue model the fleet can hold."""
    spare_slots_per_neuron: int = Field(4, ge=0)
    """Requests a neuron is counted as able to run at once, for the announced spare capacity."""
    outbound: Literal["any", "listed", "never"] = "any"
    peers: list[str] = Field(default_factory=list)
    """With ``outbound = "listed"``: the peer ids requests may go to."""
    operators: list[str] = Field(default_factory=list)
    """With ``outbound = "listed"``: the operators requests may go to."""
    max_price_input: float | None = Field(None, ge=0)
    """Never send to a peer asking more per million prompt tokens."""
    max_price_output: float | None = Field(None, ge=0)
    """Never send to a peer asking more per million completion tokens."""


class CortexConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    data_dir: Path = Field(default_factory=default_data_dir)
    operator: str = "local"
    control_socket: SocketAddr = "127.0.0.1:7070"
    gateway_socket: SocketAddr = "127.0.0.1:8080"
    tls_cert_file: Path | None = None
    """Serve the control plane as ``wss://`` with this certificate (PEM)."""
    tls_key_file: Path | None = None
    models_file: Path | None = None
    """The model catalogue (``models.toml``); the built-in default models when unset."""
    heartbeat_interval: float = Field(1.0, gt=0)
    missed_heartbeats: int = Field(3, ge=1)
    remove_after: float = Field(30.0, gt=0)
    busy_silence: float = Field(120.0, gt=0)
    """Heartbeat silence tolerated while a provisioning command is outstanding: some engines
    (llama.cpp through xllamacpp) hold the interpreter lock for a whole model load, so a
    loading neuron cannot heartbeat. A dead process still shows at once (its socket closes)."""
    handshake_timeout: float = Field(10.0, gt=0)
    send_timeout: float = Field(10.0, gt=0)
    max_frame_bytes: int = Field(DEFAULT_MAX_FRAME, ge=1024)
    shutdown_grace: float = Field(10.0, ge=0)
    log_level: str = "info"
    mesh: MeshConfig = Field(default_factory=MeshConfig)
    federation: FederationConfig = Field(default_factory=FederationConfig)
    """Serving and asking peers over the mesh (only when ``mesh.enabled``)."""
    gateway: GatewayConfig = Field(default_factory=GatewayConfig)
    """Gateway tuning; its address is ``gateway_socket``."""
    orchestrator: OrchestratorConfig = Field(default_factory=OrchestratorConfig)
    """Cold loads, placement and dispatch deadlines."""

    @model_validator(mode="after")
    def _tls_pair(self) -> "CortexConfig":
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file must be given together")
        return self
