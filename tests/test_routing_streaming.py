"""Failover between deployments with circuit breakers; streams under slow and departing clients."""

from __future__ import annotations

import asyncio
import socket
import textwrap
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiohttp.test_utils import TestServer

from gateway import state
from tests.conftest import USER_KEY, ConfigWriter, RunningGateway, StartGateway
from tests.fakes.openai_upstream import FakeUpstream

HI = [{"role": "user", "content": "hi"}]


@pytest.fixture
async def second_upstream() -> AsyncIterator[tuple[FakeUpstream, str]]:
    fake = FakeUpstream()
    server = TestServer(fake.app())
    await server.start_server()
    yield fake, str(server.make_url("/v1"))
    await server.close()


async def test_failover_and_the_circuit_breaker(
    start_gateway: StartGateway,
    config_writer: ConfigWriter,
    fake_upstream: FakeUpstream,
    second_upstream: tuple[FakeUpstream, str],
    pg: asyncpg.Connection,
) -> None:
    backup, backup_url = second_upstream
    config_writer.extra_providers = textwrap.dedent(
        f"""\
        backup:
          type: openai
          base_url: {backup_url}
          api_key_env: FAKE_PROVIDER_KEY
        """
    )
    config_writer.extra_models = textwrap.dedent(
        """\
        routed:
          deployments:
            - {provider: fake, upstream_model: gpt-4o-mini, weight: 3}
            - {provider: backup, upstream_model: gpt-4o-mini-backup, weight: 1}
        """
    )
    config_writer.extra = "routing: {attempts_per_deployment: 2, backoff_seconds: 0.01, breaker_failures: 3, breaker_cooldown_seconds: 0.5}\n"
    gateway = await start_gateway()
    router = gateway.app[state.ROUTER]
    router._choose = lambda weights: list(range(len(weights)))  # primary first, deterministically
    client = gateway.client()
    fake_upstream.mode = "error_500"
    metrics = gateway.app[state.METRICS]
    # Every provider's breaker series is there from the start, at 0.
    exposition = metrics.exposition().decode()
    assert 'gateway_upstream_breaker_open{provider="fake"} 0.0' in exposition
    assert 'gateway_upstream_breaker_open{provider="backup"} 0.0' in exposition

    # 1: two attempts on the primary (500, 500), then the backup answers.
    first = await client.chat.completions.create(model="routed", messages=HI, max_tokens=2)
    assert first.choices[0].message.content == "Hello from"
    assert (len(fake_upstream.requests), len(backup.requests)) == (2, 1)
    assert backup.requests[0]["model"] == "gpt-4o-mini-backup"
    # 2: one more primary failure opens its breaker (3 in a row); the backup answers again.
    await client.chat.completions.create(model="routed", messages=HI, max_tokens=2)
    assert (len(fake_upstream.requests), len(backup.requests)) == (3, 2)
    assert router.breaker_states()["fake"] == "open"
    assert metrics.breaker_open.labels("fake")._value.get() == 1
    # 3: while open, the primary is not even tried.
    await client.chat.completions.create(model="routed", messages=HI, max_tokens=2)
    assert (len(fake_upstream.requests), len(backup.requests)) == (3, 3)
    # 4: after the cool-down one request probes the primary, now healthy: it closes.
    fake_upstream.mode = "ok"
    await asyncio.sleep(0.6)
    assert router.breaker_states()["fake"] == "half_open"
    await client.chat.completions.create(model="routed", messages=HI, max_tokens=2)
    assert (len(fake_upstream.requests), len(backup.requests)) == (4, 3)
    assert router.breaker_states()["fake"] == "closed"

    await gateway.settle()
    recorded = await pg.fetch(
        "SELECT provider, upstream_model, attempts, status FROM usage_events ORDER BY created_at"
    )
    assert [tuple(row) for row in recorded] == [
        ("backup", "gpt-4o-mini-backup", 3, 200),
        ("backup", "gpt-4o-mini-backup", 2, 200),
        ("backup", "gpt-4o-mini-backup", 1, 200),
        ("fake", "gpt-4o-mini", 1, 200),
    ]
    assert metrics.upstream_failures.labels("fake", "status_5xx")._value.get() == 3
    assert metrics.breaker_openings.labels("fake")._value.get() == 1
    assert metrics.breaker_open.labels("fake")._value.get() == 0


async def test_every_deployment_failing_is_a_clean_error(
    start_gateway: StartGateway,
    config_writer: ConfigWriter,
    fake_upstream: FakeUpstream,
    pg: asyncpg.Connection,
) -> None:
    config_writer.extra = "routing: {attempts_per_deployment: 2, backoff_seconds: 0.01, breaker_failures: 2, breaker_cooldown_seconds: 30}\n"
    gateway = await start_gateway()
    fake_upstream.mode = "error_500"
    async with aiohttp.ClientSession() as session:
        statuses = []
        for _ in range(2):
            async with session.post(
                f"{gateway.url}/v1/chat/completions",
                headers={"Authorization": f"Bearer {USER_KEY}"},
                json={"model": "gpt-4o-mini", "messages": HI, "max_tokens": 2},
            ) as response:
                statuses.append(
                    (
                        response.status,
                        (await response.json())["error"]["code"],
                        response.headers.get("retry-after"),
                    )
                )
    assert statuses == [(502, "upstream_error", None), (503, "no_healthy_deployment", "30")]
    assert len(fake_upstream.requests) == 2


def small_receive_buffer(addr_info: Any) -> socket.socket:
    """A client socket that cannot hide megabytes in its kernel receive buffer."""
    family, kind, proto, _, _ = addr_info
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    return sock


async def test_a_slow_reader_holds_the_provider_back(
    gateway: RunningGateway, fake_upstream: FakeUpstream, pg: asyncpg.Connection
) -> None:
    """Backpressure: while the client reads nothing, the gateway stops reading upstream,
    so a 96 MiB stream is held back by socket buffers, not by the gateway's memory."""
    fake_upstream.big_events = 3_000  # 3,000 x 32 KiB
    total = 3_000 * 32_768
    connector = aiohttp.TCPConnector(socket_factory=small_receive_buffer)
    async with aiohttp.ClientSession(connector=connector) as session:
        response = await session.post(
            f"{gateway.url}/v1/chat/completions",
            headers={"Authorization": f"Bearer {USER_KEY}"},
            json={"model": "gpt-4o-mini", "messages": HI, "max_tokens": 5, "stream": True},
        )
        await response.content.readline()
        await asyncio.sleep(1.5)
        stalled_at = fake_upstream.bytes_streamed
        await asyncio.sleep(0.5)
        # Nothing more was produced while the client read nothing; most of it is still
        # unsent (kernel socket buffers on this machine can hold up to ~40 MiB in all).
        assert fake_upstream.bytes_streamed == stalled_at
        assert stalled_at < total // 2
        received = 0
        async for chunk in response.content.iter_any():
            received += len(chunk)
        response.close()
    assert received > total
    await gateway.settle()
    row = await pg.fetchrow("SELECT status, usage_source FROM usage_events")
    assert row is not None and (row["status"], row["usage_source"]) == (200, "provider")


async def test_a_departing_client_stops_the_upstream_and_is_accounted(
    start_gateway: StartGateway, fake_upstream: FakeUpstream, pg: asyncpg.Connection
) -> None:
    fake_upstream.reply = " word" * 500
    fake_upstream.chunk_delay_seconds = 0.01
    gateway = await start_gateway(
        "policies:\n  - {name: lanes, scope: user, limits: [{concurrent: 1}, {tokens: 100000, per: hour}]}\n"
    )
    async with aiohttp.ClientSession() as session:
        response = await session.post(
            f"{gateway.url}/v1/chat/completions",
            headers={"Authorization": f"Bearer {USER_KEY}"},
            json={"model": "gpt-4o-mini", "messages": HI, "max_tokens": 500, "stream": True},
        )
        for _ in range(5):
            await response.content.readline()
        response.close()
    for _ in range(100):
        await gateway.settle()
        if fake_upstream.active_streams == 0 and await pg.fetchval("SELECT count(*) FROM usage_events"):
            break
        await asyncio.sleep(0.05)
    # The provider's stream was closed, not left running to the end.
    assert fake_upstream.active_streams == 0
    assert fake_upstream.bytes_streamed < 500 * 150
    row = await pg.fetchrow("SELECT status, error_code, usage_source, completion_tokens FROM usage_events")
    assert row is not None
    assert (row["status"], row["error_code"], row["usage_source"]) == (499, "client_disconnected", "counted")
    assert 1 <= row["completion_tokens"] < 500
    # Settled: the lane is free again, and the tokens charged are what was produced.
    readings = await gateway.app[state.QUOTA].limiter.read(
        gateway.app[state.POLICIES].current.limits_of_subject("user", "alice")
    )
    assert [(r.limit.rule.kind, r.used, r.reserved) for r in readings] == [
        ("concurrent", 0, 0),
        ("tokens", 8 + row["completion_tokens"], 0),
    ]
    # No settlement task is left behind.
    assert not gateway.app[state.SETTLEMENT]._tasks
