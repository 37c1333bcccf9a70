"""The ledger loses nothing: database outages, a killed gateway, refused rows, a full disk.

After each, the ledger's rows are compared one for one with the responses the clients
received (by request id), checked for duplicates, and the rollups against the events.
"""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import subprocess
import sys
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import aiohttp
import asyncpg
import pytest

from gateway import state
from gateway.config import LedgerConfig, PostgresConfig
from gateway.ledger import LedgerStore, LedgerWriter, UsageRecord
from gateway.ledger.postgres import PostgresStore
from gateway.ledger.spool import Spool
from gateway.ledger.sqlite import SqliteStore
from gateway.metrics import Metrics
from tests.conftest import (
    ADMIN_KEY,
    OTHER_KEY,
    USER_KEY,
    ConfigWriter,
    RunningGateway,
    StartGateway,
    free_port,
    refused_port,
)
from tests.fakes.anthropic_upstream import FakeAnthropic
from tests.fakes.openai_upstream import FakeUpstream
from tests.fakes.tcp_proxy import TcpProxy
from tests.processes import serve, wait_healthy, write_config
from tests.test_ledger_stores import RECORD

HI = [{"role": "user", "content": "hi"}]
UNLIMITED = "policies:\n  - {name: roomy, scope: user, limits: [{requests: 1000000, per: minute}]}\n"

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}  # /health/ready shows its components to the admin key


async def rollups_match_events(pg: asyncpg.Connection) -> None:
    mismatches = await pg.fetch(
        """
        SELECT * FROM (
            SELECT (created_at AT TIME ZONE 'UTC')::date AS day, key_id, model, count(*) AS requests,
                   coalesce(sum(prompt_tokens), 0) AS prompt, coalesce(sum(completion_tokens), 0) AS completion
            FROM usage_events GROUP BY 1, 2, 3
        ) e FULL JOIN (
            SELECT day, key_id, model, sum(requests) AS requests, sum(prompt_tokens) AS prompt,
                   sum(completion_tokens) AS completion
            FROM usage_daily GROUP BY 1, 2, 3
        ) r USING (day, key_id, model)
        WHERE e.requests IS DISTINCT FROM r.requests OR e.prompt IS DISTINCT FROM r.prompt
           OR e.completion IS DISTINCT FROM r.completion
        """
    )
    assert mismatches == []


class Load:
    """Clients sending completions until stopped; keeps each answer's gateway request id."""

    def __init__(self, url: str, clients: int = 6) -> None:
        self._url = url
        self._clients = clients
        self.received: set[str] = set()
        self.failed = 0
        self.statuses: list[int] = []
        self.errors: list[str] = []
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._client()) for _ in range(self._clients)]

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    async def _client(self) -> None:
        async with aiohttp.ClientSession() as session:
            while not self._stop.is_set():
                try:
                    async with session.post(
                        f"{self._url}/v1/chat/completions",
                        headers={"Authorization": f"Bearer {USER_KEY}"},
                        json={"model": "gpt-4o-mini", "messages": HI, "max_tokens": 3},
                    ) as response:
                        await response.read()
                        self.statuses.append(response.status)
                        if response.status != 200 and len(self.errors) < 3:
                            self.errors.append(await response.text())
                        if response.status == 200:
                            self.received.add(response.headers["x-gateway-request-id"])
                except aiohttp.ClientError:
                    self.failed += 1
                    await asyncio.sleep(0.05)


async def test_database_outage_mid_load_loses_nothing(
    start_gateway: StartGateway, config_writer: ConfigWriter, pg: asyncpg.Connection, database_url: str
) -> None:
    target = urlparse(database_url)
    proxy = TcpProxy(target.hostname or "127.0.0.1", target.port or 5432)
    await proxy.start()
    config_writer.database_url = database_url.replace(
        f"{target.hostname}:{target.port}", f"127.0.0.1:{proxy.port}"
    )
    gateway = await start_gateway(UNLIMITED)
    load = Load(gateway.url)
    load.start()
    await asyncio.sleep(0.7)
    await proxy.stop()  # the database goes away mid-load
    await asyncio.sleep(1.0)
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{gateway.url}/health/ready", headers=ADMIN) as response,
    ):
        ready = await response.json()
    assert response.status == 200 and ready["status"] == "degraded"
    assert ready["components"]["database"]["status"] == "unhealthy"
    await proxy.start()  # and comes back on the same port
    await asyncio.sleep(0.7)
    await load.stop()
    await gateway.settle()
    await proxy.stop()

    assert set(load.statuses) == {200} and load.failed == 0, load.errors
    ids = [row["request_id"] for row in await pg.fetch("SELECT request_id FROM usage_events")]
    assert len(ids) == len(set(ids))
    assert set(ids) == load.received
    assert len(load.received) > 50
    metrics = gateway.app[state.METRICS]
    assert metrics.ledger_write_errors._value.get() >= 1
    await rollups_match_events(pg)


async def test_a_killed_gateway_writes_its_spool_after_restart(
    tmp_path: Path, redis_url: str, database_url: str, upstream_url: str, pg: asyncpg.Connection
) -> None:
    write_config(
        tmp_path,
        redis_url,
        database_url,
        upstream_url,
        UNLIMITED,
        extra="ledger: {batch_size: 200, flush_interval_seconds: 0.5}\n",
    )
    port = free_port()

    process = serve(tmp_path, port)
    await wait_healthy(port, process)
    load = Load(f"http://127.0.0.1:{port}")
    load.start()
    await asyncio.sleep(1.0)
    process.send_signal(signal.SIGKILL)  # mid-load, with a batch interval of records unwritten
    process.wait()
    before_restart = await pg.fetchval("SELECT count(*) FROM usage_events")
    received_before = len(load.received)
    process = serve(tmp_path, port)
    await wait_healthy(port, process)
    await asyncio.sleep(0.5)
    await load.stop()
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=30)

    ids = [row["request_id"] for row in await pg.fetch("SELECT request_id FROM usage_events")]
    assert len(ids) == len(set(ids)), "no duplicates"
    # Every answer a client received is in the ledger. A request the kill cut off may
    # also be there (its usage was spooled before the connection died): never fewer.
    assert load.received <= set(ids)
    assert len(set(ids) - load.received) <= load.failed
    assert before_restart < received_before, "the kill did leave records unwritten"
    await rollups_match_events(pg)


@pytest.mark.parametrize(
    ("path", "model", "last_line"),
    [
        ("/v1/chat/completions", "gpt-4o-mini", b"data: [DONE]"),
        ("/v1/responses", "gpt-4o-mini", b"event: response.completed"),
        ("/v1/messages", "claude-native", b"event: message_stop"),
    ],
)
async def test_a_streams_last_event_reaches_the_client_after_its_record_is_spooled(
    gateway: RunningGateway,
    fake_upstream: FakeUpstream,
    fake_anthropic: FakeAnthropic,
    path: str,
    model: str,
    last_line: bytes,
) -> None:
    """A gateway killed once a client has a whole stream must still have its usage."""
    # The provider waits after its last event: the gateway must not wait with the record.
    fake_upstream.linger_seconds = fake_anthropic.linger_seconds = 0.3
    spool = gateway.app[state.LEDGER].spool
    before = spool.appended
    body: dict[str, Any] = {"model": model, "max_tokens": 5, "stream": True}
    body |= {"input": "hi"} if path == "/v1/responses" else {"messages": HI}
    lines: list[bytes] = []
    records_at_last_line = None
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{gateway.url}{path}", json=body, headers={"x-api-key": USER_KEY}) as response,
    ):
        assert response.status == 200
        async for line in response.content:
            lines.append(line.rstrip())
            if line.rstrip() == last_line:
                records_at_last_line = spool.appended - before
    assert lines.count(last_line) == 1
    assert records_at_last_line == 1
    await gateway.settle()
    assert spool.appended - before == 1


async def test_what_a_provider_sends_after_its_last_event_is_passed_on_not_kept(
    gateway: RunningGateway, fake_upstream: FakeUpstream
) -> None:
    """The held end of a stream is bounded: 12 events of 32 KiB after [DONE] (past the
    256 KiB a stream's end may hold) reach the client while the provider still lingers."""
    fake_upstream.events_after_done, fake_upstream.linger_seconds = 12, 0.5
    body = {"model": "gpt-4o-mini", "max_tokens": 5, "stream": True, "messages": HI}
    extra, done = 0, 0
    provider_streaming_at_first_extra = None
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{gateway.url}/v1/chat/completions", json=body, headers={"x-api-key": USER_KEY}
        ) as response,
    ):
        async for line in response.content:
            if line.startswith(b"data: xxx"):
                if extra == 0:
                    provider_streaming_at_first_extra = fake_upstream.active_streams
                extra += 1
            done += line.rstrip() == b"data: [DONE]"
    assert (extra, done) == (12, 1)
    assert provider_streaming_at_first_extra == 1
    await gateway.settle()
    assert gateway.app[state.LEDGER].spool.appended == 1


@pytest.fixture(params=["postgres", "sqlite"])
async def ledger_store(
    request: pytest.FixtureRequest, tmp_path: Path, database_url: str, pg: asyncpg.Connection
) -> Any:
    store: LedgerStore = (
        PostgresStore(PostgresConfig(dsn=database_url))
        if request.param == "postgres"
        else SqliteStore(tmp_path / "l.db")
    )
    await store.open()
    await store.migrate()
    yield store
    await store.close()


def records(count: int, prefix: str) -> list[UsageRecord]:
    moment = datetime.now(UTC)
    return [RECORD._replace(request_id=f"{prefix}-{i}", created_at=moment) for i in range(count)]


async def test_a_refused_row_does_not_block_the_others(ledger_store: LedgerStore, tmp_path: Path) -> None:
    metrics = Metrics()
    spool = Spool(tmp_path / "spool")
    writer = LedgerWriter(
        ledger_store, LedgerConfig(batch_size=100, flush_interval_seconds=0.01), metrics, spool
    )
    writer.start()
    batch = records(100, "ok")
    batch[37] = batch[37]._replace(status=2**70)  # no column type holds this
    for record in batch:
        writer.record(record)
    assert await writer.flush(10)
    await writer.stop()
    report = await ledger_store.usage_report(
        "key", datetime.now(UTC).date(), datetime.now(UTC).date().replace(year=2100)
    )
    assert [(row.name, row.requests) for row in report] == [("k", 99)]
    rejected = (spool.directory / "rejected.jsonl").read_text().splitlines()
    assert len(rejected) == 1 and '"request_id": "ok-37"' in rejected[0]
    assert metrics.ledger_rejected._value.get() == 1


async def test_a_slow_disk_does_not_stop_the_event_loop(
    ledger_store: LedgerStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The writer's fsyncs (segment and checkpoint) wait on the disk in a thread.

    Each fsync below waits until the event loop opens a gate: on the loop's own thread
    it would wait in vain (the loop is the one waiting) and time out.
    """
    entered, gate = threading.Event(), threading.Event()
    opened_in_time: list[bool] = []
    real_fsync = os.fsync

    def slow_fsync(fd: int) -> None:
        entered.set()
        opened_in_time.append(gate.wait(timeout=2.0))
        real_fsync(fd)

    writer = LedgerWriter(
        ledger_store,
        LedgerConfig(batch_size=3, flush_interval_seconds=0.01),
        Metrics(),
        Spool(tmp_path / "spool"),
    )
    writer.start()
    monkeypatch.setattr(os, "fsync", slow_fsync)
    for record in records(3, "slow-disk"):
        writer.record(record)
    while not entered.is_set():
        await asyncio.sleep(0.005)
    gate.set()  # only reached while the first fsync waits, if the loop is free
    assert await writer.flush(10)
    assert opened_in_time == [True, True]  # the batch's segment fsync and its checkpoint's
    await writer.stop()
    report = await ledger_store.usage_report(
        "key", datetime.now(UTC).date(), datetime.now(UTC).date().replace(year=2100)
    )
    assert [(row.name, row.requests) for row in report] == [("k", 3)]


async def test_a_failing_fsync_is_counted_and_the_batch_still_written(
    ledger_store: LedgerStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EIO from the disk: the records are appended already (the kernel has them)."""

    def failing_fsync(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    metrics = Metrics()
    writer = LedgerWriter(
        ledger_store,
        LedgerConfig(batch_size=3, flush_interval_seconds=0.01),
        metrics,
        Spool(tmp_path / "spool"),
    )
    writer.start()
    monkeypatch.setattr(os, "fsync", failing_fsync)
    for record in records(3, "eio"):
        writer.record(record)
    assert await writer.flush(10)
    monkeypatch.undo()
    await writer.stop()
    assert metrics.ledger_spool_errors._value.get() == 2  # the segment's fsync and the checkpoint's
    report = await ledger_store.usage_report(
        "key", datetime.now(UTC).date(), datetime.now(UTC).date().replace(year=2100)
    )
    assert [(row.name, row.requests) for row in report] == [("k", 3)]


async def test_the_spool_survives_a_restart_and_is_replayed(
    ledger_store: LedgerStore, tmp_path: Path
) -> None:
    unreachable = PostgresStore(PostgresConfig(dsn=f"postgresql://postgres@127.0.0.1:{refused_port()}/none"))
    spool_root = tmp_path / "spool"
    first = LedgerWriter(
        unreachable, LedgerConfig(batch_size=50, flush_interval_seconds=0.01), Metrics(), Spool(spool_root)
    )
    first.start()
    for record in records(120, "offline"):
        first.record(record)
    await first.stop(timeout_seconds=0.3)  # the database never answered: all stays on disk
    assert first.pending == 120
    metrics = Metrics()
    second = LedgerWriter(
        ledger_store, LedgerConfig(batch_size=50, flush_interval_seconds=0.01), metrics, Spool(spool_root)
    )
    second.start()
    assert await second.flush(10)
    await second.stop()
    report = await ledger_store.usage_report(
        "user", datetime.now(UTC).date(), datetime.now(UTC).date().replace(year=2100)
    )
    assert [(row.name, row.requests, row.prompt_tokens) for row in report] == [("alice", 120, 960)]
    assert metrics.ledger_replayed._value.get() == 120
    # Nothing is left to replay: the checkpoint moved past every record.
    third = LedgerWriter(ledger_store, LedgerConfig(), Metrics(), Spool(spool_root))
    third.start()
    assert third.pending == 0
    await third.stop()


async def test_a_full_disk_is_loud_and_loses_nothing(
    start_gateway: StartGateway, fake_upstream: FakeUpstream, pg: asyncpg.Connection
) -> None:
    gateway = await start_gateway()
    writer = gateway.app[state.LEDGER]
    spool = writer.spool
    real_append = spool.append

    def disk_full(record: UsageRecord) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    spool.append = disk_full  # type: ignore[method-assign]
    client = gateway.client()
    try:
        for _ in range(5):
            await client.chat.completions.create(model="gpt-4o-mini", messages=HI, max_tokens=2)
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{gateway.url}/health/ready", headers=ADMIN) as response,
        ):
            ready = await response.json()
        # Still serving, but loudly degraded: recording has stopped for lack of disk.
        assert response.status == 200 and ready["status"] == "degraded"
        assert ready["components"]["spool"]["status"] == "unhealthy"
        assert "No space left on device" in ready["components"]["spool"]["detail"]
        assert gateway.app[state.METRICS].ledger_spool_errors._value.get() >= 5
        assert writer.pending == 5
    finally:
        spool.append = real_append  # type: ignore[method-assign]
    await client.chat.completions.create(model="gpt-4o-mini", messages=HI, max_tokens=2)
    await gateway.settle()
    assert await pg.fetchval("SELECT count(*) FROM usage_events") == 6
    await rollups_match_events(pg)


async def test_usage_reports_from_the_rollups(
    start_gateway: StartGateway,
    config_writer: ConfigWriter,
    fake_upstream: FakeUpstream,
    pg: asyncpg.Connection,
) -> None:
    gateway = await start_gateway()
    fake_upstream.bill_max_tokens = True
    for key, tokens in ((USER_KEY, 2), (USER_KEY, 3), (OTHER_KEY, 4)):
        await gateway.client(key=key).chat.completions.create(
            model="gpt-4o-mini", messages=HI, max_tokens=tokens
        )
    await gateway.client().chat.completions.create(model="gpt-4", messages=HI, max_tokens=1)
    await gateway.settle()
    today = datetime.now(UTC).date().isoformat()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway",
            "usage",
            "--by",
            "user",
            "--format",
            "csv",
            "--config",
            str(config_writer.directory / "gateway.yaml"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    # gpt-4o-mini costs $0.15 / $0.60 per million: alice 16 in, 5 out; bob 8 in, 4 out.
    assert result.stdout.splitlines() == [
        "user,requests,prompt_tokens,completion_tokens,cost_usd",
        "alice,3,24,6,0.000005",
        "bob,1,8,4,0.000004",
    ]
    async with aiohttp.ClientSession() as session:
        async with session.get(
            f"{gateway.url}/admin/usage?by=model&since={today}",
            headers={"Authorization": f"Bearer {ADMIN_KEY}"},
        ) as response:
            assert response.status == 200
            report = await response.json()
        async with session.get(
            f"{gateway.url}/admin/usage?by=nope", headers={"Authorization": f"Bearer {ADMIN_KEY}"}
        ) as response:
            assert response.status == 400
    assert [(row["model"], row["requests"], row["completion_tokens"]) for row in report["data"]] == [
        ("gpt-4", 1, 1),
        ("gpt-4o-mini", 3, 9),
    ]


def open_spool(root: Path, appended: list[UsageRecord]) -> Spool:
    spool = Spool(root)
    spool.open()
    for record in appended:
        spool.append(record)
    return spool


def empty_active_segment(spool: Spool) -> int:
    """Truncate the segment being written; had a read gone to the disk, it would find nothing."""
    segment = spool.directory / f"segment-{spool.segments()[-1]:012d}.jsonl"
    size = segment.stat().st_size
    segment.write_bytes(b"")
    return size


def test_the_writer_reads_this_process_records_from_memory(tmp_path: Path) -> None:
    written = records(5, "kept")
    spool = open_spool(tmp_path / "spool", written)
    size = empty_active_segment(spool)
    taken, end = spool.read(3)
    assert taken == written[:3]
    spool.commit(end, 3)
    taken, end = spool.read(10)
    assert taken == written[3:] and (end.segment, end.offset) == (spool.segments()[-1], size)
    spool.close()


def test_an_earlier_run_is_read_from_disk_then_this_run_from_memory(tmp_path: Path) -> None:
    earlier, now = records(4, "earlier"), records(3, "now")
    open_spool(tmp_path / "spool", earlier).close()
    second = open_spool(tmp_path / "spool", now)
    collected: list[UsageRecord] = []
    for _ in range(5):
        taken, end = second.read(100)
        collected += taken
        second.commit(end, len(taken))
    assert collected == earlier + now
    assert second.caught_up and second.read(100)[0] == []
    later = records(2, "later")
    for record in later:
        second.append(record)
    empty_active_segment(second)
    assert second.read(100)[0] == later  # caught up: from memory
    second.close()


def test_past_the_memory_bound_the_disk_serves_and_keeping_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("gateway.ledger.spool.MEMORY_RECORDS", 5)
    backlog = records(12, "outage")
    spool = open_spool(tmp_path / "spool", backlog)
    taken, end = spool.read(100)
    assert taken == backlog  # decoded from disk: equal field for field
    spool.commit(end, len(taken))
    assert spool.caught_up
    later = records(2, "after")
    for record in later:
        spool.append(record)
    empty_active_segment(spool)
    assert spool.read(100)[0] == later  # from memory again
    spool.close()


def test_records_across_segment_rotations_come_back_once_in_order(tmp_path: Path) -> None:
    written = records(40, "rotating")
    spool = Spool(tmp_path / "spool", segment_bytes=2_000)  # a few records a segment
    spool.open()
    collected: list[UsageRecord] = []
    for start in range(0, 40, 7):  # appends and reads interleaved, as the writer does
        for record in written[start : start + 7]:
            spool.append(record)
        taken, end = spool.read(5)
        collected += taken
        spool.commit(end, len(taken))
    for _ in range(40):
        taken, end = spool.read(5)
        collected += taken
        spool.commit(end, len(taken))
    assert [record.request_id for record in collected] == [record.request_id for record in written]
    assert collected == written and spool.caught_up
    assert len(spool.segments()) == 1  # finished segments were dropped as the cursor passed them
    spool.close()


def test_spool_lines_read_back_exactly_even_what_orjson_refuses(tmp_path: Path) -> None:
    """Lines are orjson's; a record orjson refuses (a caller's id holding a lone surrogate)
    is written by the standard library in ASCII, and both read back equal from the disk."""
    plain, odd = records(2, "line")
    plain = plain._replace(client_request_id="żaba 🙂", cost_usd=0.000123)
    odd = odd._replace(client_request_id="half a pair: \ud800")
    first = open_spool(tmp_path / "spool", [plain, odd])
    first.close()
    segments = sorted(first.directory.glob("segment-*.jsonl"))
    lines = b"".join(segment.read_bytes() for segment in segments).splitlines()
    assert lines[0].startswith(b'{"request_id":"line-0","created_at":"') and "żaba 🙂".encode() in lines[0]
    assert lines[1].isascii() and b'"half a pair: \\ud800"' in lines[1]
    again = Spool(tmp_path / "spool")
    again.open()
    taken, _ = again.read(10)
    assert taken == [plain, odd]
    again.close()
