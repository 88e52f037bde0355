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

from ..errors import NoCapacity
from .store import Store
from .usage import UsageRecord

log = logging.getLogger(__name__)

_MAX_BATCH = 512


class LedgerError(NoCapacity):
    """A usage record could not be made durable (the disk is full or failed, or it took
    too long). The rule: a portal that records usage serves nothing it cannot record, so
    its requests get 503 ``ledger_unavailable`` (with ``Retry-After``) until the ledger can
    write again; portals that record nothing keep serving. The writer logs each failed
    commit at ERROR; the client sees only that the ledger is unavailable."""

    code = "ledger_unavailable"

    def __init__(self, detail: str) -> None:
        super().__init__("the usage ledger cannot record this request now, so it was not served (or charged); "
                         "retry later", retry_after=5.0)
        self.detail = detail

    def __str__(self) -> str:
        return self.detail


class StoreUnavailable(NoCapacity):
    """The store (keys, the ledger's reports, stored responses) refused a read or a write:
    its disk is full or failed, another connection held its lock past SQLite's busy timeout,
    it went read-only. 503 ``store_unavailable`` with ``Retry-After``, in the surface's (or
    the admin API's) error shape; the detail goes to the log, not to the client."""

    code = "store_unavailable"

    def __init__(self, detail: str) -> None:
        super().__init__("the cortex cannot use its store now (the operator's log says why); retry later",
                         retry_after=5.0)
        self.detail = detail

    def __str__(self) -> str:
        return self.detail


class _Waiter:
    """One record's wait for its commit. Its request gives up at ``deadline`` only while the
    record still waits in the queue (:meth:`abandon`): the thread then leaves it out. Once
    the thread has taken it into a commit (:meth:`claim`), the commit's outcome is the
    record's: a request told it was not served (or charged) must have no row in the ledger."""

    __slots__ = ("event", "error", "deadline", "_lock", "_state")

    def __init__(self, deadline: float) -> None:
        self.event = trio.Event()
        self.error: BaseException | None = None
        self.deadline = deadline
        """``time.monotonic()`` past which the request gives up on a record not yet committing."""
        self._lock = threading.Lock()
        self._state = "queued"

    def claim(self) -> bool:
        """The writer thread takes the record into a commit; False if its request gave up."""
        with self._lock:
            if self._state == "abandoned":
                return False
            self._state = "claimed"
            return True

    def abandon(self) -> bool:
        """The request gives up on the record; False if a commit has it already."""
        with self._lock:
            if self._state == "claimed":
                return False
            self._state = "abandoned"
            return True

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
        waiter = _Waiter(time.monotonic() + self.timeout)
        self._queue.put((record, waiter))
        with trio.move_on_after(self.timeout):
            await waiter.event.wait()
        if not waiter.event.is_set() and waiter.abandon():
            raise LedgerError(f"the usage record of {record.request_id} was not on disk within {self.timeout:g}s")
        if not waiter.event.is_set():
            # Its commit is under way: it waits for no lock past this record's deadline (the
            # thread set that), so what remains is the disk's own write.
            with trio.move_on_after(self.timeout):
                await waiter.event.wait()
            if not waiter.event.is_set():
                log.error("usage ledger: the commit holding the record of %s has not returned in %gs; the "
                          "request fails, but its record may yet be written", record.request_id, 2 * self.timeout)
                raise LedgerError(f"the usage record of {record.request_id} was not on disk within "
                                  f"{2 * self.timeout:g}s")
        if waiter.error is not None:
            raise LedgerError(f"the usage record of {record.request_id} could not be written: "
                              f"{waiter.error}") from waiter.error

    def _commit(self, records: list[UsageRecord], *, wait: float | None = None) -> None:
        t0 = time.perf_counter()
        self.store.append(records, wait=wait)
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
            batch = [(r, w) for r, w in batch if w.claim()]  # not those whose requests gave up
            if not batch:
                continue
            # Another writer's lock (an operator's sqlite3 session) is waited for only until the
            # first deadline in the batch: a record committed after its request gave up would
            # bill a request that was refused as not served.
            wait = max(0.0, min(w.deadline for _, w in batch) - time.monotonic())
            error: BaseException | None = None
            try:
                self._commit([r for r, _ in batch], wait=wait)
            except Exception as exc:  # reported to every waiter; the thread goes on
                log.error("usage ledger: a commit of %d record(s) failed: %s", len(batch), exc)
                error = exc
            assert self._token is not None
            try:  # one wake-up of the trio thread per commit, not one per record
                self._token.run_sync_soon(_release, [w for _, w in batch], error)
            except trio.RunFinishedError:
                pass
