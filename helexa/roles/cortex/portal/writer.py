"""Making usage records durable without blocking the trio loop.

One writer thread owns the ledger's writes. :meth:`LedgerWriter.write` queues a record
and waits until the thread has committed it (``synchronous=FULL``: on disk); records that
queue while a commit is under way go together in the next one, so concurrent requests
share an fsync. The metering path awaits this before a response's last bytes go out, so a
request whose client saw the end of its answer has its record on disk.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass

import trio

from .store import Store
from .usage import UsageRecord

log = logging.getLogger(__name__)

_MAX_BATCH = 512


class LedgerError(Exception):
    """A usage record could not be made durable (the disk failed, or it took too long)."""


class _Waiter:
    __slots__ = ("event", "error")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.error: BaseException | None = None

    def done(self, error: BaseException | None) -> None:
        self.error = error
        self.event.set()


def _release(waiters: list[_Waiter], error: BaseException | None) -> None:
    for waiter in waiters:
        waiter.done(error)


@dataclass
class WriterStats:
    """What the writer has done: commits, records, and the time the commits took."""

    commits: int = 0
    records: int = 0
    commit_seconds: float = 0.0
    max_commit_seconds: float = 0.0


class LedgerWriter:
    """Durable ledger writes off the trio thread (see the module docstring).

    Args:
        store: where records go.
        timeout: seconds :meth:`write` waits for the commit before raising.
        inline: write on the trio thread instead (for tests that run under trio's
            autojump clock, which would jump while a thread works; never in a cortex).

    :meth:`run` must be running (it owns the thread) for :meth:`write` to return.
    """

    def __init__(self, store: Store, *, timeout: float = 10.0, inline: bool = False) -> None:
        self.store = store
        self.timeout = timeout
        self.inline = inline
        self.stats = WriterStats()
        self._queue: queue.SimpleQueue[tuple[UsageRecord, _Waiter] | None] = queue.SimpleQueue()
        self._token: trio.lowlevel.TrioToken | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the writer thread until cancelled; records queued by then are still written."""
        if self.inline:
            task_status.started()
            await trio.sleep_forever()
        self._token = trio.lowlevel.current_trio_token()
        thread = threading.Thread(target=self._loop, name="helexa-ledger-writer", daemon=True)
        thread.start()
        try:
            task_status.started()
            await trio.sleep_forever()
        finally:
            self._queue.put(None)
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(thread.join, 30.0)

    async def write(self, record: UsageRecord) -> None:
        """Return once ``record`` is on disk. Raises :class:`LedgerError`."""
        if self.inline:
            self._commit([record])
            return
        if self._token is None:
            raise LedgerError("the ledger writer is not running")
        waiter = _Waiter()
        self._queue.put((record, waiter))
        with trio.move_on_after(self.timeout):
            await waiter.event.wait()
        if not waiter.event.is_set():
            raise LedgerError(f"the usage record of {record.request_id} was not on disk within {self.timeout:g}s")
        if waiter.error is not None:
            raise LedgerError(f"the usage record of {record.request_id} could not be written: "
                              f"{waiter.error}") from waiter.error

    def _commit(self, records: list[UsageRecord]) -> None:
        t0 = time.perf_counter()
        self.store.append(records)
        took = time.perf_counter() - t0
        s = self.stats
        s.commits += 1
        s.records += len(records)
        s.commit_seconds += took
        s.max_commit_seconds = max(s.max_commit_seconds, took)

    def _loop(self) -> None:
        stopping = False
        while not stopping:
            item = self._queue.get()
            batch: list[tuple[UsageRecord, _Waiter]] = []
            if item is None:
                stopping = True
            else:
                batch.append(item)
            while len(batch) < _MAX_BATCH:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stopping = True
                else:
                    batch.append(more)
            if not batch:
                continue
            error: BaseException | None = None
            try:
                self._commit([r for r, _ in batch])
            except Exception as exc:  # reported to every waiter; the thread goes on
                log.error("usage ledger: a commit of %d record(s) failed: %s", len(batch), exc)
                error = exc
            assert self._token is not None
            try:  # one wake-up of the trio thread per commit, not one per record
                self._token.run_sync_soon(_release, [w for _, w in batch], error)
            except trio.RunFinishedError:
                pass
