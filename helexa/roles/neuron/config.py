"""The neuron's configuration (``neuron.toml``; see ``examples/neuron.toml``)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator


class NeuronConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    cortex: str = "ws://127.0.0.1:7070"
    """The cortex's control-plane URL (``ws://`` or ``wss://``)."""
    node_id: str | None = None
    """This node's id; defaults to /etc/machine-id."""
    join_token: SecretStr | None = None
    """The operator's join token (prefer ``join_token_file`` or ``HELEXA_JOIN_TOKEN``)."""
    join_token_file: Path | None = None
    tls_ca_file: Path | None = None
    """CA bundle to verify a ``wss://`` cortex with (default: the system's)."""
    labels: dict[str, str] = Field(default_factory=dict)
    connect_timeout: float = Field(10.0, gt=0)
    handshake_timeout: float = Field(10.0, gt=0)
    send_timeout: float = Field(10.0, gt=0)
    reconnect_initial: float = Field(0.5, gt=0)
    reconnect_max: float = Field(30.0, gt=0)
    shutdown_grace: float = Field(10.0, ge=0)
    max_frame_bytes: int = Field(16 * 1024 * 1024, ge=1024)
    log_level: str = "info"

    @field_validator("cortex")
    @classmethod
    def _url(cls, v: str) -> str:
        if not (v.startswith("ws://") or v.startswith("wss://")):
            raise ValueError(f"expected a ws:// or wss:// URL, got {v!r}")
        return v
