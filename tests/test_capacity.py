"""Many model calls at once: nothing between the client and the provider caps them
unasked, neither the upstream connection pool nor the process's open-file limit."""

from __future__ import annotations

import asyncio
import resource
import signal
import subprocess
import textwrap
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from tests.conftest import USER_KEY, ConfigWriter, StartGateway, free_port
from tests.fakes.openai_upstream import FakeUpstream
from tests.processes import serve, wait_healthy, write_config

HI = [{"role": "user", "content": "hi"}]


async def post_all(url: str, model: str, calls: int) -> list[int]:
    """`calls` chat requests at once, from a client pool without a cap of its own."""

    async def call(session: aiohttp.ClientSession) -> int:
        async with session.post(
            f"{url}/v1/chat/completions",
            headers={"Authorization": f"Bearer {USER_KEY}"},
            json={"model": model, "messages": HI, "max_tokens": 5},
        ) as response:
            await response.read()
            return response.status

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        return list(await asyncio.gather(*(call(session) for _ in range(calls))))


@pytest.mark.parametrize(
    ("model", "calls", "most_at_once"),
    [("gpt-4o-mini", 130, 130), ("capped-model", 30, 10)],
    ids=["no-cap", "max-connections-10"],
)
async def test_concurrent_calls_beyond_a_connection_pool(
    start_gateway: StartGateway,
    config_writer: ConfigWriter,
    fake_upstream: FakeUpstream,
    upstream_url: str,
    pg: asyncpg.Connection,
    model: str,
    calls: int,
    most_at_once: int,
) -> None:
    """Model calls last long and pile up. By default all of them reach the provider at
    once (aiohttp's own default pool holds 100); with `max_connections` the rest wait for
    a free connection, longer than connect_seconds, and none fails for it."""
    # Capped: the waits for a free connection outlast connect_seconds. Uncapped: 130
    # connections open at once on a loop the fake provider shares, so a loaded machine
    # needs more than half a second to accept them all.
    connect = 0.5 if most_at_once < calls else 3
    timeouts = f"{{connect_seconds: {connect}, first_byte_seconds: 10, idle_seconds: 5, total_seconds: 10}}"
    config_writer.timeouts = timeouts
    config_writer.extra_providers = textwrap.dedent(
        f"""\
        capped:
          type: openai
          base_url: {upstream_url}
          api_key_env: FAKE_PROVIDER_KEY
          max_connections: 10
          timeouts: {timeouts}
        """
    )
    config_writer.extra_models = "capped-model: {provider: capped, upstream_model: gpt-4o-mini}\n"
    fake_upstream.delay_seconds = 1.5 if most_at_once == calls else 0.6
    gateway = await start_gateway()
    statuses = await post_all(gateway.url, model, calls)
    assert statuses == [200] * calls
    assert len(fake_upstream.requests) == calls
    assert fake_upstream.most_delayed == most_at_once
    await gateway.settle()
    assert await pg.fetchval("SELECT count(*) FROM usage_events WHERE status = 200") == calls


async def test_a_low_open_file_limit_is_raised_at_start(
    tmp_path: Path,
    redis_url: str,
    database_url: str,
    upstream_url: str,
    fake_upstream: FakeUpstream,
    pg: asyncpg.Connection,
) -> None:
    """systemd starts services with a soft limit of 1,024 open files, about 500 calls at
    once (each holds a client and a provider connection). The gateway raises its soft
    limit to the hard one, as here from 128 to whatever the hard limit is."""
    write_config(tmp_path, redis_url, database_url, upstream_url, "policies: []\n")
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert hard == resource.RLIM_INFINITY or hard >= 1024, "this machine's hard limit is too low to show it"
    port = free_port()
    process = serve(tmp_path, port, open_files=128)
    try:
        await wait_healthy(port, process, "/health/ready")
        # Long enough for all of them to be in flight at once on a loaded 2-core machine.
        fake_upstream.delay_seconds = 3.0
        calls = 150
        statuses = await post_all(f"http://127.0.0.1:{port}", "gpt-4o-mini", calls)
        assert statuses == [200] * calls
        assert fake_upstream.most_delayed == calls
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
    assert await pg.fetchval("SELECT count(*) FROM usage_events WHERE status = 200") == calls
