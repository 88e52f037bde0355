"""The cortex's configuration (``cortex.toml``; see ``examples/cortex.toml``)."""

from __future__ import annotations

import os
from pathlib import Path

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
    send_timeout: float = Field(10.0, gt=0)
    max_frame_bytes: int = Field(16 * 1024 * 1024, ge=1024)
    shutdown_grace: float = Field(10.0, ge=0)
    log_level: str = "info"
    mesh: MeshConfig = Field(default_factory=MeshConfig)
    gateway: GatewayConfig = Field(default_factory=GatewayConfig)
    """Gateway tuning; its address is ``gateway_socket``."""

    @model_validator(mode="after")
    def _tls_pair(self) -> "CortexConfig":
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file must be given together")
        return self
