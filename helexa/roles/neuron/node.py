"""The neuron process: resolve identity and token, run the agent, drain on a signal."""

from __future__ import annotations

import logging
import os
import signal
import ssl
from pathlib import Path

import trio

from helexa.config import ConfigError

from .agent import JoinRefused, NeuronError, Neuron, NeuronSettings
from .config import NeuronConfig
from .registry import ModelRegistry
from .sources import ModelSources

log = logging.getLogger(__name__)

MACHINE_ID = Path("/etc/machine-id")


def resolve_node_id(flag: str | None, machine_id: Path = MACHINE_ID) -> str:
    """``--node-id`` if given, else /etc/machine-id. Raises :class:`ConfigError` if neither."""
    if flag:
        return flag
    try:
        value = machine_id.read_text().strip()
    except OSError:
        value = ""
    if not value:
        raise ConfigError(f"node_id: not given and {machine_id} is missing or empty; pass --node-id")
    return value


def resolve_token(config: NeuronConfig) -> str:
    if config.join_token is not None and config.join_token.get_secret_value().strip():
        return config.join_token.get_secret_value().strip()
    if config.join_token_file is not None:
        try:
            token = config.join_token_file.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"join_token_file: cannot read {config.join_token_file} ({exc.strerror})") from None
        if not token:
            raise ConfigError(f"join_token_file: {config.join_token_file} is empty")
        return token
    raise ConfigError("join_token: no join token; pass --join-token-file or set HELEXA_JOIN_TOKEN")


def settings_from(config: NeuronConfig) -> NeuronSettings:
    ctx = None
    if config.cortex.startswith("wss://"):
        ctx = ssl.create_default_context(cafile=str(config.tls_ca_file) if config.tls_ca_file else None)
    return NeuronSettings(
        cortex_url=config.cortex,
        node_id=resolve_node_id(config.node_id),
        token=resolve_token(config),
        labels=config.labels,
        connect_timeout=config.connect_timeout,
        handshake_timeout=config.handshake_timeout,
        send_timeout=config.send_timeout,
        reconnect_initial=config.reconnect_initial,
        reconnect_max=config.reconnect_max,
        shutdown_grace=config.shutdown_grace,
        max_frame=config.max_frame_bytes,
        ssl_context=ctx,
    )


async def serve(settings: NeuronSettings, sources: ModelSources | None = None) -> None:
    """Run a neuron until SIGINT/SIGTERM, then drain and return."""
    neuron = Neuron(settings, registry=ModelRegistry(sources=sources))
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(neuron.run)

            async def on_signal() -> None:
                async for sig in signals:
                    log.info("received %s: draining", signal.Signals(sig).name)
                    await neuron.drain()
                    nursery.cancel_scope.cancel()
                    return

            nursery.start_soon(on_signal)


def run(config: NeuronConfig) -> int:
    """Entry point of ``helexa neuron``: returns the process exit code."""
    settings = settings_from(config)
    log.info("neuron %s (pid %d) dialing %s", settings.node_id, os.getpid(), settings.cortex_url)
    code = 0
    try:
        trio.run(serve, settings, ModelSources(config.sources))
    except* JoinRefused as group:
        log.error("%s", group.exceptions[0])
        code = 3
    except* NeuronError as group:
        log.error("%s", group.exceptions[0])
        code = 1
    if code == 0:
        log.info("neuron stopped")
    return code
