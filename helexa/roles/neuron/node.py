"""The neuron process: build the agent from the config, run it, drain on a signal."""

from __future__ import annotations

import logging
import os
import signal

import trio

from helexa import telemetry

from .agent import JoinRefused, Neuron, NeuronError
from .config import NeuronConfig
from .registry import ModelRegistry
from .sources import ModelSources

log = logging.getLogger(__name__)


async def serve(neuron: Neuron) -> None:
    """Run ``neuron`` until SIGINT/SIGTERM, then drain it and return."""
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


def apply_cpu_policy(policy: str) -> bool:
    """Put the calling thread under ``policy`` (``NeuronConfig.cpu_policy``); the threads
    and processes it starts afterwards inherit it. Returns whether the policy holds:
    ``batch`` where Linux's ``SCHED_BATCH`` is missing or refused is logged and left."""
    if policy == "normal":
        return True
    try:
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))  # 0: this thread
    except (AttributeError, OSError) as exc:
        log.warning("cpu_policy = %s is not available here (%s): the neuron runs as normal", policy, exc)
        return False
    return True


def run(config: NeuronConfig) -> int:
    """Entry point of ``helexa neuron``: returns the process exit code. Raises
    :class:`~helexa.config.ConfigError` when the node id or join token cannot be resolved."""
    neuron = Neuron(config, registry=ModelRegistry(sources=ModelSources(config.sources)))
    log.info("neuron %s (pid %d) dialing %s", neuron.resolved.node_id, os.getpid(), config.cortex)
    apply_cpu_policy(config.cpu_policy)
    code = 0
    try:
        trio.run(serve, neuron)
    except* JoinRefused as group:
        log.error("%s", group.exceptions[0])
        code = 3
    except* NeuronError as group:
        log.error("%s", group.exceptions[0])
        code = 1
    finally:
        telemetry.shutdown()  # the spans still batched
    if code == 0:
        log.info("neuron stopped")
    return code
