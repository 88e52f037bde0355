"""The cortex's configuration (``cortex.toml``; see ``examples/cortex.toml``).

One :class:`CortexConfig` is built at start and passed down whole: each part of the cortex
reads its own table (``gateway``, ``orchestrator``, ``mesh``, ``federation``, ``portals``)
and the top-level fields it needs; nothing copies it into a settings type of its own.

Portals (``[portals.NAME]``, :class:`~.portal.config.PortalConfig`) are the gateway's
front doors: each has its sockets, auth, models, prices, quotas and routing preferences.
The ``default`` portal always exists and listens on ``gateway_socket`` (a
``[portals.default]`` table configures it); with no ``[portals]`` at all it is open and
behaves as the single gateway always did. A portal listening on anything but loopback must
say ``auth = "keys"`` or, explicitly, ``auth = "none"``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from helexa.config import KEY_CTX, SocketAddr
from helexa.protocol import DEFAULT_MAX_FRAME
from helexa.telemetry import TelemetryConfig

from .portal.config import DEFAULT_PORTAL, PortalConfig, is_loopback


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
    """Seconds a client may take to send its request head or body (and, on a TLS portal,
    its TLS handshake); never applied to a response."""
    send_timeout: float = Field(60.0, gt=0)
    """Seconds a client may take to accept one write of a response."""
    keep_alive_timeout: float = Field(75.0, gt=0)
    keep_alive_max_requests: int = Field(100_000, ge=1)
    """Requests served on one connection before it is closed (hypercorn's default is 1000)."""
    max_connections: int = Field(0, ge=0)
    """Client connections open at once on one listening socket; past it a new one is closed
    at once. 0: the process's open-file limit less 256, shared evenly by the gateway's
    sockets, so that clients of one portal's socket (a slowloris, idle keep-alives) cannot
    take the files every other socket, the control plane and the ledger need."""
    owned_by: str = "helexa"
    admin_clients: list[str] = Field(default_factory=lambda: ["127.0.0.1", "::1"])
    """Client addresses allowed on ``/admin/*`` (besides the admin token, which is always
    required); loopback only by default, ``["*"]`` for any address."""
    allowed_origins: list[str] = Field(default_factory=list)
    """Web origins (``https://app.example``; ``"*"``: any) whose pages may call the gateway
    from a browser. A request carrying an ``Origin`` that is neither its own (the console, a
    portal's pages) nor listed here is refused with 403 before any work, so that a page the
    operator visits cannot use their gateway; requests without ``Origin`` (SDKs, curl) are not
    affected. Listed origins get ``Access-Control-Allow-Origin`` and their preflights answered."""
    allowed_hosts: list[str] = Field(default_factory=list)
    """``Host`` names (no port; ``"*"``: any) served besides loopback ones. On a socket bound
    to loopback every other ``Host`` is refused with 403 (a DNS-rebinding page's requests name
    its own domain): list the name a reverse proxy in front passes on. Sockets on other
    addresses check ``Host`` only when this is set."""
    metrics_public: bool = False
    """Serve ``/metrics`` (on the admin socket) to anyone who can reach it, without the
    admin token or the ``admin_clients`` check; by default a scraper presents the token
    (Prometheus: ``authorization: {credentials_file: .../admin-token}``)."""
    ledger_timeout: float = Field(10.0, gt=0)
    """Seconds a usage record may take to become durable before its request fails (500)."""
    ledger_sync: Literal["full", "normal"] = "full"
    """How durable a usage record is when its answer ends: ``full`` (SQLite
    ``synchronous=FULL``: on disk, survives a power cut) or ``normal`` (in the WAL through
    the OS: survives ``kill -9`` of the cortex, not an OS crash; several times cheaper, see
    ``docs/benchmarks.md``)."""


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
    load_backoff: float = Field(5.0, gt=0)
    """Seconds a model whose load failed on a neuron is not loaded there again (requests
    for it get 503 ``load_failed`` at once meanwhile); doubled with each failure in a row."""
    load_backoff_max: float = Field(300.0, gt=0)
    """The most one ``load_backoff`` wait lasts."""
    warm_start_delay: float = Field(5.0, ge=0)
    """Seconds after the cortex starts before keep-warm models are loaded: after a restart
    the neurons rejoin and report what they hold first, so nothing is loaded twice (a
    request meanwhile still loads what it needs)."""
    first_token_timeout: float = Field(120.0, gt=0)
    """Seconds a neuron may take to produce the first output of a generation."""
    idle_timeout: float = Field(60.0, gt=0)
    """Seconds a generation may go without progress (no output from the neuron, or the
    client not taking it) before it is abandoned (after at most a sixteenth more: the
    deadline is not moved on every token, see ``dispatch.Generation``)."""
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
    interactive_slots: int = Field(0, ge=0)
    """Slots of each model on each neuron that only ``interactive`` requests may take:
    ``normal`` and ``bulk`` ones start only while more than that many are free (counting
    every request running there, interactive ones too; with no interactive request
    running, one slot is always open to them), so that an interactive request starts at
    once rather than waiting for a long generation to end. 0 (the default): every class
    may fill every slot, and priority only orders the queue. Needs the model's slots known
    (``n_parallel``, a backend's default, or ``default_slots``)."""
    swap_policy: Literal["cost", "lru", "fifo"] = "cost"
    """How models give way to the ones the queue waits for: ``cost`` (load time times
    demand, minimum residency, drain first), ``lru`` or ``fifo`` (see placement.py)."""
    min_residency: float = Field(30.0, ge=0)
    """Seconds a loaded model stays before it may be evicted for another (``cost``)."""
    swap_drain: float = Field(10.0, ge=0)
    """Seconds a resident model's queued and running work may hold off its eviction (``cost``)."""
    swap_hold_loads: float = Field(1.0, ge=0)
    """Caps ``min_residency`` and ``swap_drain`` (``cost``) at this many of the resident's
    measured load times: a model that loads in 2 s is not held 30 s (0: no cap; a model
    never measured is held the configured times)."""
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
    liveness_timeout: float = Field(3.0, gt=0)
    """A peer that does not answer a ping (sent every second) within this is dropped: its
    streams fail at once and it is redialled (a frozen peer is detected in seconds)."""
    announce_interval: float = Field(5.0, gt=0)
    unavailable_grace: float | None = Field(None, ge=0)
    """Seconds after the last offer of a model only peers serve expired during which its
    requests get 503 with Retry-After (temporarily unavailable: a partition, a peer
    restarting) instead of 404 model_not_found. Unset: six announcement periods."""
    mdns: bool = False
    direct: bool = True
    """Carry federated requests over the mesh's direct channel (TCP sealed with keys
    granted over libp2p) where the peer has one; off: always over libp2p's streams."""
    direct_port: int = Field(0, ge=0, le=65535)
    """TCP port of the direct channel, on the ``listen`` address (0: any free port)."""


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
    idle_streams: int = Field(8, ge=0)
    """Mesh streams kept open to each peer between requests and reused (0: a new stream
    per request, ~10 ms more a federated request)."""


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
    handshake_timeout: float = Field(10.0, gt=0)
    """Seconds a neuron's connection may take from its accept to its join verdict (the
    websocket upgrade, then the join, each within it)."""
    max_pending_handshakes: int = Field(1024, ge=1)
    """Control connections accepted but not yet joined at once; past it new connections
    are closed at once (a flood of half-open connections cannot exhaust the cortex)."""
    max_handshake_bytes: int = Field(64 * 1024 * 1024, ge=2 * 1024 * 1024)
    """Bytes read from control connections not yet joined, all of them together; past it a
    pending connection is closed "try again later" (1013; the neuron redials on its
    backoff). Each may send frames of at most 1 MiB before its join (a join with 256 models'
    configs is about 115 KiB), so without this bound ``max_pending_handshakes`` strangers
    could make the cortex hold a gigabyte."""
    failed_joins_burst: int = Field(10, ge=1)
    """Refused join proofs an address may send in a row before its joins are screened (a
    join without the token refused unread, one with it still admitted:
    :mod:`helexa.protocol.join_screen`); its allowance comes back at ``failed_joins_per_minute``."""
    failed_joins_per_minute: float = Field(6.0, gt=0)
    enrolment: Literal["first_join", "strict"] = "first_join"
    """How a node id comes to be bound to a neuron's identity key: ``first_join`` binds it to
    the key of its first join (trust on first use); ``strict`` refuses the join of a node id
    bound to no key, which the operator binds beforehand (``helexa neurons enrol``). Applied
    live on reload, to the joins that follow (a neuron joined stays)."""
    send_timeout: float = Field(10.0, gt=0)
    max_frame_bytes: int = Field(DEFAULT_MAX_FRAME, ge=1024)
    shutdown_grace: float = Field(10.0, ge=0)
    log_level: str = "info"
    log_format: Literal["text", "json"] = "text"
    """``text`` for a terminal; ``json``: one JSON object a line, with the request's fields
    (:mod:`helexa.logs`)."""
    telemetry: TelemetryConfig = Field(default_factory=TelemetryConfig)
    """OpenTelemetry traces (off by default; :mod:`helexa.telemetry`)."""
    mesh: MeshConfig = Field(default_factory=MeshConfig)
    federation: FederationConfig = Field(default_factory=FederationConfig)
    """Serving and asking peers over the mesh (only when ``mesh.enabled``)."""
    gateway: GatewayConfig = Field(default_factory=GatewayConfig)
    """Gateway tuning; its address is ``gateway_socket``."""
    orchestrator: OrchestratorConfig = Field(default_factory=OrchestratorConfig)
    """Cold loads, placement and dispatch deadlines."""
    portals: dict[str, PortalConfig] = Field(default_factory=dict)
    """The gateway's front doors, by id (``[portals.NAME]``); ``default`` always exists."""
    admin_socket: SocketAddr | None = None
    """Serve ``/admin/*`` and ``/metrics`` here instead of on the default portal's socket."""
    usage_store: Path | None = None
    """The SQLite file of API keys and the usage ledger (default ``DATA_DIR/usage.sqlite``)."""

    MOVED_KEYS: ClassVar[dict[str, str]] = {
        "gateway.provisioner": "its keys are [orchestrator]'s now",
        "gateway.dispatch": "its keys are [orchestrator]'s now",
        "gateway.host": 'gateway_socket = "HOST:PORT" now',
        "gateway.port": 'gateway_socket = "HOST:PORT" now',
        "gateway.shutdown_grace": "shutdown_grace, at the top level, now",
        "busy_silence": "no longer a setting: remove it",
    }
    """Keys of the release of 2026-11-23 that this one refuses, and what to write instead
    (the refusal says so: ``helexa.config``)."""

    @model_validator(mode="after")
    def _tls_pair(self) -> "CortexConfig":
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file must be given together")
        return self

    @model_validator(mode="after")
    def _portals(self) -> "CortexConfig":
        default = self.portals.get(DEFAULT_PORTAL) or PortalConfig()
        listen = [self.gateway_socket, *(a for a in default.listen if a != self.gateway_socket)]
        default = default.model_copy(update={"listen": listen})
        self.portals = {DEFAULT_PORTAL: default, **{k: v for k, v in self.portals.items() if k != DEFAULT_PORTAL}}
        seen: dict[str, str] = {}
        for name, portal in self.portals.items():
            if not name.replace("-", "").replace("_", "").isalnum():
                raise ValueError(f"portals.{name}: a portal id is letters, digits, - and _")
            if not portal.listen:
                raise ValueError(f"portals.{name}.listen: give at least one HOST:PORT")
            for addr in portal.listen:
                if portal.auth is None and not is_loopback(addr):
                    # The key whose value put it there: gateway_socket may come from a flag or
                    # the environment, and the message must not send the operator to the file.
                    key = "gateway_socket" if name == DEFAULT_PORTAL and addr == self.gateway_socket else \
                        f"portals.{name}.listen"
                    raise PydanticCustomError(
                        "value_error", "portals.{name}: listens on {addr}, which is not loopback: set auth = \"keys\" "
                        "(or auth = \"none\" to serve it open on purpose)", {"name": name, "addr": addr, KEY_CTX: key})
                if not addr.endswith(":0"):
                    if addr in seen:
                        raise ValueError(f"portals.{name}.listen: {addr} is also portal {seen[addr]!r}'s")
                    seen[addr] = name
        return self

    @property
    def usage_store_path(self) -> Path:
        return self.usage_store or self.data_dir / "usage.sqlite"
