"""A neuron link that answers every generation at once, for benchmarks of the cortex alone.

:class:`InstantNeuron` joins a :class:`~helexa.roles.cortex.fleet.Fleet` as a healthy
neuron holding the model ``bench`` and streams ``max_tokens`` chunks of ``"tok "`` (16 when
unset), yielding to the event loop between them, then the result: the fabric's own work
(parse, schedule, dispatch, encode) without the websocket hop to a real neuron. Used by
``gateway_bench.py`` and ``portal_bench.py``.
"""

from __future__ import annotations

import time
from contextlib import asynccontextmanager


class InstantNeuron:
    """A neuron link answering every generation at once (``max_tokens`` chunks)."""

    def __init__(self, fleet) -> None:  # noqa: ANN001
        from helexa.protocol import Hardware, ModelState, ModelStatus, NeuronDescriptor, NeuronMetrics
        from helexa.roles.cortex.fleet import Health

        self.node_id = "instant"
        self.descriptor = NeuronDescriptor("instant", Hardware(cpu_cores=1, ram_total=1 << 34))
        self.health = Health.HEALTHY
        self.metrics = NeuronMetrics()
        self.models = {"bench": ModelStatus("bench", ModelState.LOADED)}
        self.configs = {}
        self.joined_at = self.last_heartbeat = time.time()
        self.in_flight = 0
        fleet.add(self)

    @asynccontextmanager
    async def generate(self, request):  # noqa: ANN001, ANN201
        import trio

        from helexa.protocol import GenerateResult, TokenChunk, Usage

        n = request.sampling.max_tokens or 16

        async def events():  # noqa: ANN202
            for _ in range(n):
                await trio.lowlevel.checkpoint()
                yield TokenChunk(request.request_id, "tok ")
            yield GenerateResult(request.request_id, "length", Usage(4, n))

        yield events()
