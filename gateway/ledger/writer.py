"""Usage records: appended to the spool on the request path, written to the database in
batches by one task, retried until stored, never dropped.

A failed batch is retried with backoff while the records wait on disk; a batch the
database refuses for its data is split until the bad record is found, and only that one
goes to `rejected.jsonl` (logged and counted), so one bad event never blocks the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import sqlite3
import time
from collections.abc import Callable, Sequence

import asyncpg

from gateway.config import LedgerConfig
from gateway.ledger.records import UsageRecord
from gateway.ledger.spool import Position, Spool
from gateway.ledger.store import LedgerStore
from gateway.metrics import Metrics

log = logging.getLogger("gateway.ledger")

RETRY_FIRST_SECONDS = 0.2
RETRY_MAX_SECONDS = 5.0
APPEND_RETRY_SECONDS = 1.0


def is_data_error(exc: BaseException) -> bool:
    """The database refused the data itself (retrying the same rows cannot help)."""
    if isinstance(exc, OverflowError):
        return True  # a value the column type cannot hold (asyncpg and sqlite3 both raise it)
    if isinstance(exc, asyncpg.PostgresError):
        state = getattr(exc, "sqlstate", "") or ""
        return state.startswith(("22", "23"))
    return isinstance(
        exc, sqlite3.IntegrityError | sqlite3.DataError | sqlite3.InterfaceError | OverflowError
    )


class LedgerWriter:
    def __init__(self, store: LedgerStore, config: LedgerConfig, metrics: Metrics, spool: Spool) -> None:
        self._store = store
        self._config = config
        self._metrics = metrics
        self.spool = spool
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # Records the spool could not take (a full disk): kept here and appended later.
        self._unspooled: list[UsageRecord] = []
        self.last_error: str | None = None
        self.spool_error: str | None = None

    def start(self) -> None:
        self.spool.open()
        self._task = asyncio.create_task(self._run(), name="ledger-writer")

    def record(self, record: UsageRecord) -> None:
        """Spool one record now (one write(2), no fsync); the writer takes it from there."""
        if self._unspooled:
            self._unspooled.append(record)
            self._retry_unspooled()
        else:
            self._append(record)
        if self.spool.appended - self.spool.committed >= self._config.batch_size:
            self._wake.set()

    def _append(self, record: UsageRecord) -> None:
        try:
            self.spool.append(record)
        except OSError as exc:
            self._unspooled.append(record)
            self._metrics.ledger_spool_errors.inc()
            if self.spool_error is None:
                log.critical("cannot write the usage spool (%s); holding records in memory", exc)
            self.spool_error = f"{type(exc).__name__}: {exc}"
            return
        self._metrics.ledger_spooled.inc()

    def _retry_unspooled(self) -> None:
        waiting, self._unspooled = self._unspooled, []
        for index, record in enumerate(waiting):
            self._append(record)
            if self._unspooled:
                self._unspooled.extend(waiting[index + 1 :])
                return
        if self.spool_error is not None:
            log.warning("the usage spool is writable again")
        self.spool_error = None

    @property
    def pending(self) -> int:
        return self.spool.appended - self.spool.committed + len(self._unspooled)

    async def flush(self, timeout_seconds: float | None = None) -> bool:
        """Wait until everything recorded so far is in the database; False on timeout."""
        deadline = None if timeout_seconds is None else time.monotonic() + timeout_seconds
        while not self.spool.caught_up or self._unspooled:
            self._wake.set()
            if deadline is not None and time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.01)
        return True

    async def stop(self, timeout_seconds: float = 30.0) -> None:
        """Write what is spooled (within the time given), then stop. What remains stays on
        disk and is written by the next start."""
        if not await self.flush(timeout_seconds):
            log.error(
                "ledger stopped with %d usage records still spooled (written at the next start)", self.pending
            )
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.spool.close()

    async def _run(self) -> None:
        while True:
            if self._unspooled:
                self._retry_unspooled()
            records, position = self.spool.read(self._config.batch_size)
            self._metrics.ledger_queue_depth.set(self.pending)
            self._metrics.ledger_spool_bytes.set(self.spool.backlog_bytes)
            if not records:
                if position != self.spool.cursor:
                    await self._commit(position, 0)
                    continue
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self._config.flush_interval_seconds)
                continue
            if len(records) < self._config.batch_size and self.spool.cursor >= self.spool.replay_until:
                # Let a batch fill for one interval unless it is already full.
                await asyncio.sleep(self._config.flush_interval_seconds)
                records, position = self.spool.read(self._config.batch_size)
            replayed = len(records) if self.spool.cursor < self.spool.replay_until else 0
            await self._sync_spool()  # once per batch, in a thread
            started = time.monotonic()
            await self._write_until_stored(records)
            elapsed = time.monotonic() - started
            self._metrics.ledger_batch_seconds.observe(elapsed)
            self._metrics.backend_seconds.labels("database", "write_batch").observe(elapsed)
            self._metrics.ledger_batch_size.observe(len(records))
            self._metrics.ledger_replayed.inc(replayed)
            await self._commit(position, len(records))

    async def _sync_spool(self) -> None:
        sync = self.spool.sync_copy()
        if sync is not None:
            # On failure the batch is still appended (the kernel has it): only a power
            # loss could take it.
            await self._on_disk(sync, "fsync of the usage spool")

    async def _commit(self, position: Position, records: int) -> None:
        # On failure an older checkpoint only means rows written again after a restart,
        # and the database skips request ids it already has.
        save = functools.partial(self.spool.save_checkpoint, position)
        await self._on_disk(save, "saving the usage spool's checkpoint")
        # Only now: flush() (and so stop()) waits for the checkpoint too.
        self.spool.advance(position, records)

    async def _on_disk(self, work: Callable[[], None], what: str) -> None:
        """Spool file work in a thread, so a slow disk holds up no request; failures counted."""
        try:
            await asyncio.to_thread(work)
        except OSError as exc:
            self._metrics.ledger_spool_errors.inc()
            log.warning("%s failed: %s", what, exc)

    async def _write_until_stored(self, batch: Sequence[UsageRecord]) -> None:
        delay = RETRY_FIRST_SECONDS
        while True:
            try:
                inserted = await self._write_isolating_bad_rows(batch)
            except Exception as exc:
                self._metrics.ledger_write_errors.inc()
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning(
                    "ledger write of %d records failed (%s); retrying in %.1fs",
                    len(batch),
                    self.last_error,
                    delay,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_SECONDS)
                continue
            self.last_error = None
            self._metrics.ledger_rows.inc(inserted)
            return

    async def _write_isolating_bad_rows(self, batch: Sequence[UsageRecord]) -> int:
        try:
            return await self._store.write_usage(batch)
        except Exception as exc:
            if not is_data_error(exc):
                raise
            if len(batch) == 1:
                reason = f"{type(exc).__name__}: {exc}"
                log.error(
                    "the database refused usage record %s (%s); kept in rejected.jsonl",
                    batch[0].request_id,
                    reason,
                )
                self.spool.reject(batch[0], reason)
                self._metrics.ledger_rejected.inc()
                return 0
            middle = len(batch) // 2
            return await self._write_isolating_bad_rows(
                batch[:middle]
            ) + await self._write_isolating_bad_rows(batch[middle:])
