"""The guarantee across processes: several gateway processes, one Redis, one limit.

Two real `gateway serve` processes share Redis and PostgreSQL; 500 requests arrive at
once, split between them; the admitted reservations must fit the limit exactly.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from tests.conftest import USER_KEY, free_port
from tests.fakes.openai_upstream import FakeUpstream
from tests.processes import serve, wait_healthy, write_config

HI = [{"role": "user", "content": "hi"}]
RESERVED = 8 + 10  # prompt + max_tokens
FITS = 37


@pytest.fixture
async def two_gateways(
    tmp_path: Path, redis_url: str, database_url: str, upstream_url: str, pg: asyncpg.Connection
) -> AsyncIterator[list[str]]:
    write_config(
        tmp_path,
        redis_url,
        database_url,
        upstream_url,
        f"policies:\n  - {{name: shared, scope: team, limits: [{{tokens: {FITS * RESERVED}, per: minute}}]}}\n",
    )
    ports = [free_port(), free_port()]
    processes = [serve(tmp_path, port) for port in ports]
    for port, process in zip(ports, processes, strict=True):
        await wait_healthy(port, process, "/health/ready")
    urls = [f"http://127.0.0.1:{port}" for port in ports]
    yield urls
    for process in processes:
        process.send_signal(signal.SIGTERM)
    for process in processes:
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


async def test_500_concurrent_requests_across_two_processes_fit_the_limit(
    two_gateways: list[str], fake_upstream: FakeUpstream, pg: asyncpg.Connection
) -> None:
    fake_upstream.bill_max_tokens = True
    fake_upstream.delay_seconds = 0.02
    statuses: list[int] = []
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one(index: int) -> None:
            url = two_gateways[index % 2]
            async with session.post(
                f"{url}/v1/chat/completions",
                headers={"Authorization": f"Bearer {USER_KEY}"},
                json={"model": "gpt-4o-mini", "messages": HI, "max_tokens": 10},
            ) as response:
                await response.read()
                statuses.append(response.status)

        await asyncio.gather(*(one(index) for index in range(500)))
    assert statuses.count(200) == FITS
    assert statuses.count(429) == 500 - FITS
    assert len(fake_upstream.requests) == FITS
    # Stop both processes so that SIGTERM flushes their ledgers, then count rows.
    for _ in range(100):
        rows = await pg.fetchval("SELECT count(*) FROM usage_events")
        if rows == FITS:
            break
        await asyncio.sleep(0.1)
    assert rows == FITS
    served_by = {row["n"] for row in await pg.fetch("SELECT count(*) AS n FROM usage_events GROUP BY key_id")}
    assert served_by == {FITS}
