"""The neuron's configuration (``neuron.toml``; see ``examples/neuron.toml``), and what it
resolves to once at start (:class:`Resolved`: the node id, the join token, the TLS context,
the identity key)."""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from helexa import identity as identity_mod
from helexa import secret_files
from helexa.telemetry import TelemetryConfig
from helexa.config import ConfigError
from helexa.protocol import DEFAULT_MAX_FRAME
from helexa.protocol.auth import split_token
from helexa.protocol.join_identity import node_id_problem
from helexa.runtime.cpu_policy import Policy

MACHINE_ID = Path("/etc/machine-id")


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "helexa" / "neuron"


class SourcesConfig(BaseModel):
    """Where models come from and where they are kept (``[sources]`` in ``neuron.toml``)."""

    model_config = ConfigDict(extra="forbid")

    cache_dir: Path | None = None
    """The model cache (default: ``<data_dir>/models``), shared by every backend."""
    cache_max_gb: float = Field(100.0, gt=0)
    """The most the cache may hold; least recently used models not in use go first."""
    min_free_gb: float = Field(1.0, ge=0)
    """Disk space a download must leave free on the cache's filesystem."""
    hf_endpoint: str | None = None
    """The model hub (default: ``HF_ENDPOINT``, else the public hub)."""
    hf_token: SecretStr | None = None
    """A hub token for gated or private repositories (prefer ``hf_token_file`` or ``HF_TOKEN``)."""
    hf_token_file: Path | None = None
    connect_timeout: float = Field(10.0, gt=0)
    read_timeout: float = Field(30.0, gt=0)
    """Seconds without a byte before a download connection counts as dropped (and resumes)."""
    retries: int = Field(5, ge=0)
    """Attempts in a row without progress before a download gives up."""
    retry_backoff: float = Field(1.0, ge=0)

    def cache_path(self) -> Path:
        return self.cache_dir or default_data_dir() / "models"

    def token(self) -> str | None:
        """The configured hub token; ``None`` lets ``huggingface_hub`` look (``HF_TOKEN``,
        a stored login)."""
        if self.hf_token is not None and self.hf_token.get_secret_value().strip():
            return self.hf_token.get_secret_value().strip()
        if self.hf_token_file is not None:
            return self.hf_token_file.read_text().strip() or None  # OSError: the caller says which key
        return None


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
    max_frame_bytes: int = Field(DEFAULT_MAX_FRAME, ge=1024)
    log_level: str = "info"
    log_format: Literal["text", "json"] = "text"
    """``text`` for a terminal; ``json``: one JSON object a line, with the request's fields
    (:mod:`helexa.logs`)."""
    telemetry: TelemetryConfig = Field(default_factory=TelemetryConfig)
    """OpenTelemetry traces (off by default; :mod:`helexa.telemetry`)."""
    data_dir: Path = Field(default_factory=default_data_dir)
    """The neuron's state: its identity key (``identity.key``, made on first start; the
    cortex binds the node id to it) and the model cache, unless ``sources.cache_dir`` says."""
    sources: SourcesConfig = Field(default_factory=SourcesConfig)
    cpu_policy: Policy = "normal"
    """``batch``: the neuron and the engine processes it starts run under Linux's
    ``SCHED_BATCH``, except the engines' own threads (llama.cpp's loop, ExLlama's
    generator, ONNX Runtime's), which stay under the normal policy
    (:mod:`helexa.runtime.cpu_policy`). A frame from the cortex then does not preempt the
    cortex on a core they share: under load the cortex hands the neuron several requests
    per wake-up instead of about two (``docs/benchmarks.md``, issue 17 item 2, branch
    fab3), and relaying a token never preempts a decode. Where a core is idle the neuron
    runs at once either way; where every core is busy, a relay's wake-up waits up to a
    scheduler slice. With SmolLM2 on two cores neither policy was measurably ahead (issue
    17 item 4). ``HELEXA_CPU_POLICY``."""

    @model_validator(mode="after")
    def _cache_under_data_dir(self) -> "NeuronConfig":
        if self.sources.cache_dir is None:
            self.sources.cache_dir = self.data_dir / "models"
        return self

    @field_validator("cortex")
    @classmethod
    def _url(cls, v: str) -> str:
        if not (v.startswith("ws://") or v.startswith("wss://")):
            raise ValueError(f"expected a ws:// or wss:// URL, got {v!r}")
        return v


@dataclass(frozen=True)
class Resolved:
    """What a :class:`NeuronConfig` names and the neuron reads once, at start."""

    node_id: str
    token: str = field(repr=False)
    """The join token's secret (what the proofs are over)."""
    ssl_context: ssl.SSLContext | None = None
    """Set for a ``wss://`` cortex: verifies it with ``tls_ca_file`` or the system's CAs,
    or (with ``pin``) checks nothing itself: the pin is the verification."""
    pin: str | None = None
    """The cortex certificate's SHA-256 the join token carries (``::sha256:<hex>``)."""
    identity: identity_mod.Identity | None = field(default=None, repr=False)
    """This neuron's Ed25519 identity key (``<data_dir>/identity.key``), sent with every join."""

    @classmethod
    def from_config(cls, config: NeuronConfig, *, machine_id: Path = MACHINE_ID) -> Resolved:
        """Raises :class:`ConfigError` naming the key when a value cannot be resolved."""
        try:
            secret, pin = split_token(resolve_token(config))
        except ValueError as exc:
            raise ConfigError(f"join_token: {exc}") from None
        wss = config.cortex.startswith("wss://")
        if pin is not None and not wss:
            raise ConfigError(f"join_token: it pins the cortex's certificate, but cortex = {config.cortex!r} is not "
                              "wss://")
        ctx = None
        if wss and pin is not None:
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        elif wss:
            ctx = ssl.create_default_context(cafile=str(config.tls_ca_file) if config.tls_ca_file else None)
        return cls(resolve_node_id(config.node_id, machine_id), secret, ctx, pin, load_identity(config.data_dir))


IDENTITY_FILE = "identity.key"


def load_identity(data_dir: Path) -> identity_mod.Identity:
    """The neuron's identity key in ``data_dir``, made (mode 0600) on first start. Raises
    :class:`ConfigError` for a key file open to other users, unreadable or corrupt."""
    path = data_dir / IDENTITY_FILE
    secret_files.check(path, "the identity key")
    try:
        return identity_mod.load_or_create(path)
    except (ValueError, TypeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"data_dir: the identity key {path} is corrupt ({exc}): restore it from a backup, or "
                          "remove it to make a new one (the cortex then refuses this node id until the operator "
                          "runs `helexa neurons forget NODE_ID`)") from None
    except OSError as exc:
        raise ConfigError(f"data_dir: cannot read or create the identity key {path} ({exc.strerror or exc})") from None


def resolve_node_id(flag: str | None, machine_id: Path = MACHINE_ID) -> str:
    """``--node-id`` if given, else /etc/machine-id. Raises :class:`ConfigError` if neither."""
    if flag:
        value = flag
    else:
        try:
            value = machine_id.read_text().strip()
        except OSError:
            value = ""
        if not value:
            raise ConfigError(f"node_id: not given and {machine_id} is missing or empty; pass --node-id")
    if (problem := node_id_problem(value)) is not None:
        raise ConfigError(f"node_id: {problem} (the cortex refuses it)")
    return value


def resolve_token(config: NeuronConfig) -> str:
    """The join token: ``join_token`` if set, else the contents of ``join_token_file``."""
    if config.join_token is not None and config.join_token.get_secret_value().strip():
        return config.join_token.get_secret_value().strip()
    if config.join_token_file is not None:
        secret_files.check(config.join_token_file, "join_token_file")
        try:
            token = config.join_token_file.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"join_token_file: cannot read {config.join_token_file} ({exc.strerror})") from None
        if not token:
            raise ConfigError(f"join_token_file: {config.join_token_file} is empty")
        return token
    raise ConfigError("join_token: no join token; pass --join-token-file or set HELEXA_JOIN_TOKEN")
