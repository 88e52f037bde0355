"""The neuron process: build the agent from the config, run it, drain on a signal."""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import AsyncIterator

import trio

from helexa import telemetry
from helexa.runtime import cpu_policy

from helexa.protocol.join_identity import IDENTITY_MISMATCH, NOT_ENROLLED

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
                    break
                async with trio.open_nursery() as draining:
                    # Later signals are read while it drains: one left unread when the
                    # receiver closes is delivered again, and killed the process at the end
                    # of its drain (exit 143, or 1 "Aborted!" for a Ctrl-C).
                    draining.start_soon(_already_draining, signals)
                    await neuron.drain()
                    draining.cancel_scope.cancel()
                nursery.cancel_scope.cancel()

            nursery.start_soon(on_signal)


async def _already_draining(signals: AsyncIterator[int]) -> None:
    async for sig in signals:
        log.info("received %s: already draining", signal.Signals(sig).name)


EXIT_IDENTITY = 4
"""The exit code when the cortex refuses this neuron's identity key for its node id: neither
a restart nor a retry can help until the operator forgets the binding (or the node id changes),
or, on a cortex that enrols strictly, enrols this neuron's key (``helexa neurons enrol``)."""


def run(config: NeuronConfig) -> int:
    """Entry point of ``helexa neuron``: returns the process exit code. Raises
    :class:`~helexa.config.ConfigError` when the node id or join token cannot be resolved."""
    neuron = Neuron(config, registry=ModelRegistry(sources=ModelSources(config.sources)))
    identity = neuron.resolved.identity
    log.info("neuron %s (pid %d, identity key %s) dialing %s", neuron.resolved.node_id, os.getpid(),
             identity.fingerprint if identity else "none", config.cortex)
    cpu_policy.apply(config.cpu_policy, who="the neuron")
    code = 0
    try:
        trio.run(serve, neuron)
    except* JoinRefused as group:
        refused = group.exceptions[0]
        log.error("%s", refused)
        # 4: this node id is another neuron's on that cortex, or (strict enrolment) no key's
        # yet (EXIT_IDENTITY); 3: any other refusal.
        code = EXIT_IDENTITY if getattr(refused, "code", "") in (IDENTITY_MISMATCH, NOT_ENROLLED) else 3
    except* NeuronError as group:
        log.error("%s", group.exceptions[0])
        code = 1
    finally:
        telemetry.shutdown()  # the spans still batched
    if code == 0:
        log.info("neuron stopped")
    return code
