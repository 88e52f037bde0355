"""Provisioning commands from the cortex: model configs, loads and pulls (with progress)
and unloads.

Each command is answered by one :class:`ProvisioningResponse` with its command id; a load
also sends :class:`LoadProgress` at every 5 % (and draws a bar on a terminal). An unload
drains first: the model takes no new request, and the ones it runs get the command's
``grace`` to finish before the backend is unloaded under them.
"""

from __future__ import annotations

import logging

import trio
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from helexa import logs, telemetry
from helexa.protocol import (
    LoadModel,
    LoadProgress,
    ModelStatus,
    ProvisioningCommand,
    ProvisioningResponse,
    PullModel,
    UnloadModel,
    UpsertModelConfig,
)
from helexa.runtime import BackendError

from .connection import Connection
from .progress import LoadBars
from .registry import ModelRegistry

log = logging.getLogger(__name__)

PROGRESS_STEP = 0.05
"""A load reports its progress each time it moves by this fraction (and when it ends)."""


class Commands:
    """Carries out provisioning commands on ``registry``; answers go through ``connection``.

    Args:
        registry: the models held.
        connection: where answers and progress go (dropped when not connected: the next
            join reports the registry's state anyway).
        bars: terminal progress bars (on when stderr is a tty, by default).
    """

    def __init__(self, registry: ModelRegistry, connection: Connection, *, bars: LoadBars | None = None) -> None:
        self._registry = registry
        self._connection = connection
        self._bars = bars or LoadBars()

    def handle(self, cmd: ProvisioningCommand, nursery: trio.Nursery) -> None:
        """Start carrying out ``cmd`` in ``nursery`` (the connection's: a load in progress
        stops when the connection drops, leaving the model configured)."""
        match cmd:
            case UpsertModelConfig(command_id=cid, config=config):
                status = self._registry.upsert(config)
                self._connection.post(ProvisioningResponse(cid, True, status=status))
            case LoadModel() | PullModel():
                nursery.start_soon(self._load, cmd)
            case UnloadModel():
                nursery.start_soon(self._unload, cmd)

    async def _load(self, cmd: LoadModel | PullModel) -> None:
        span = None
        if telemetry.enabled():
            span = telemetry.tracer().start_span(
                "neuron.load" if isinstance(cmd, LoadModel) else "neuron.pull", kind=SpanKind.SERVER,
                context=telemetry.parent_context(cmd.trace if isinstance(cmd, LoadModel) else None),
                attributes={"helexa.model": cmd.model_id})
        try:
            with logs.bound(model=cmd.model_id):
                await self._load_traced(cmd, span)
        finally:
            if span is not None:
                span.end()

    async def _load_traced(self, cmd: LoadModel | PullModel, span: Span | None) -> None:
        last = -1.0
        last_stage = ""

        def progress(stage: str, done: int, total: int | None, unit: str) -> None:
            nonlocal last, last_stage
            self._bars.update(cmd.model_id, stage, done, total, unit)
            frac = done / total if total else 0.0
            if stage != last_stage:  # a new stage (download, then load) starts from 0 again
                last, last_stage = -1.0, stage
                if span is not None:
                    span.add_event(stage, {"total": total or 0, "unit": unit})
            if frac - last >= PROGRESS_STEP or (total and done >= total):
                last = frac
                self._connection.post(LoadProgress(cmd.command_id, cmd.model_id, stage, done, total, unit))

        try:
            if isinstance(cmd, PullModel):
                status = await self._registry.pull(cmd.model_id, progress)
            else:
                status = await self._registry.load(cmd.model_id, progress)
        except trio.Cancelled:
            # The connection it came on ended (a partition, a cortex restart): the work stops
            # with it, and a download's partial file stays for the next load to resume.
            self._bars.close(cmd.model_id)
            log.info("%s of %s stopped: the connection to the cortex that asked for it ended",
                     "pull" if isinstance(cmd, PullModel) else "load", cmd.model_id)
            raise
        except BackendError as exc:
            if span is not None:
                span.set_status(Status(StatusCode.ERROR, f"{exc.code}: {exc}"))
            self._bars.close(cmd.model_id)
            await self._connection.try_send(
                ProvisioningResponse(cmd.command_id, False, str(exc), exc.code, self._status(cmd.model_id))
            )
            return
        self._bars.close(cmd.model_id)
        await self._connection.try_send(ProvisioningResponse(cmd.command_id, True, status=status))

    async def _unload(self, cmd: UnloadModel) -> None:
        try:
            status = await self._registry.unload(cmd.model_id, drain_timeout=cmd.grace)
        except BackendError as exc:
            await self._connection.try_send(ProvisioningResponse(cmd.command_id, False, str(exc), exc.code))
            return
        await self._connection.try_send(ProvisioningResponse(cmd.command_id, True, status=status))

    def _status(self, model_id: str) -> ModelStatus | None:
        try:
            return self._registry.status(model_id)
        except BackendError:
            return None
