"""Batches usage records off the request path and writes them, retrying until stored."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from gateway.config import LedgerConfig
from gateway.ledger.records import UsageRecord
from gateway.ledger.store import LedgerStore
from gateway.metrics import Metrics

log = logging.getLogger("gateway.ledger")

RETRY_FIRST_SECONDS = 0.2
RETRY_MAX_SECONDS = 10.0


class LedgerWriter:
    """A bounded queue drained by one task in batches (by size or age).

    A failed batch is retried with backoff and never dropped; writes are idempotent by
    request id, so a batch that did land before an error is not counted twice.
    """

    def __init__(self, store: LedgerStore, config: LedgerConfig, metrics: Metrics) -> None:
        self._store = store
        self._config = config
        self._metrics = metrics
        self._queue: asyncio.Queue[UsageRecord] = asyncio.Queue(maxsize=config.queue_size)
        self._task: asyncio.Task[None] | None = None
        self.last_error: str | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="ledger-writer")

    async def record(self, record: UsageRecord) -> None:
        """Queue a record; waits (off the request path) only while the queue is full."""
        await self._queue.put(record)
        self._metrics.ledger_queue_depth.set(self._queue.qsize())

    async def flush(self) -> None:
        """Wait until every record queued so far is written."""
        await self._queue.join()

    async def stop(self, timeout_seconds: float = 30.0) -> None:
        """Write what is queued, then stop the writer task."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.flush(), timeout_seconds)
        if self._queue.qsize():
            log.error("ledger stopped with %d usage records unwritten", self._queue.qsize())
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    @property
    def pending(self) -> int:
        return self._queue.qsize()

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            # Let a batch fill for one interval unless it is already full.
            if self._queue.qsize() + 1 < self._config.batch_size:
                await asyncio.sleep(self._config.flush_interval_seconds)
            while len(batch) < self._config.batch_size and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            await self._write_until_stored(batch)
            for _ in batch:
                self._queue.task_done()
            self._metrics.ledger_queue_depth.set(self._queue.qsize())

    async def _write_until_stored(self, batch: list[UsageRecord]) -> None:
        delay = RETRY_FIRST_SECONDS
        while True:
            try:
                inserted = await self._store.write_usage(batch)
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
