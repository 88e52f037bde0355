"""The cortex's configuration (``cortex.toml``; see ``examples/cortex.toml``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from helexa.config import SocketAddr

from .gateway import GatewayConfig


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "helexa" / "cortex"


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
    """Heartbeat silence tolerated while a neuron is loading a model (see ControlSettings)."""
    handshake_timeout: float = Field(10.0, gt=0)
    send_timeout: float = Field(10.0, gt=0)
    max_frame_bytes: int = Field(16 * 1024 * 1024, ge=1024)
    shutdown_grace: float = Field(10.0, ge=0)
    log_level: str = "info"
    mesh: MeshConfig = Field(default_factory=MeshConfig)
    federation: FederationConfig = Field(default_factory=FederationConfig)
    """Serving and asking peers over the mesh (only when ``mesh.enabled``)."""
    gateway: GatewayConfig = Field(default_factory=GatewayConfig)
    """Gateway tuning; its address is ``gateway_socket``."""

    @model_validator(mode="after")
    def _tls_pair(self) -> "CortexConfig":
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file must be given together")
        return self
