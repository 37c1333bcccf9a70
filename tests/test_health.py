"""Liveness and readiness report every component."""

from __future__ import annotations

import aiohttp
import asyncpg

from tests.conftest import RunningGateway, StartGateway


async def test_liveness(gateway: RunningGateway) -> None:
    async with aiohttp.ClientSession() as session, session.get(f"{gateway.url}/health") as response:
        assert response.status == 200
        assert await response.json() == {"status": "ok"}


async def test_readiness_checks_redis_postgres_and_tokenizers(gateway: RunningGateway) -> None:
    async with aiohttp.ClientSession() as session, session.get(f"{gateway.url}/health/ready") as response:
        assert response.status == 200
        body = await response.json()
    assert body["status"] == "healthy"
    assert body["healthy_share"] == 1.0
    assert set(body["components"]) == {"redis", "database", "tokenizers", "spool", "upstreams"}
    assert body["components"]["upstreams"]["circuits"]["fake"] == "closed"
    for component in body["components"].values():
        assert component["status"] == "healthy"
        assert component["latency_ms"] >= 0


async def test_readiness_fails_when_redis_is_unreachable(
    start_gateway: StartGateway,
    config_writer,
    pg: asyncpg.Connection,  # type: ignore[no-untyped-def]
) -> None:
    from tests.conftest import free_port

    config_writer.redis_url = f"redis://127.0.0.1:{free_port()}/0"
    gateway = await start_gateway()
    async with aiohttp.ClientSession() as session, session.get(f"{gateway.url}/health/ready") as response:
        assert response.status == 503
        body = await response.json()
    assert body["status"] == "unhealthy"
    assert body["components"]["redis"]["status"] == "unhealthy"
    assert body["components"]["database"]["status"] == "healthy"
    assert body["healthy_share"] == round(4 / 5, 3)


async def test_an_open_circuit_degrades_readiness_without_failing_it(
    start_gateway: StartGateway,
    fake_upstream,
    pg: asyncpg.Connection,  # type: ignore[no-untyped-def]
) -> None:
    from gateway import state

    gateway = await start_gateway()
    fake_upstream.mode = "error_500"
    async with aiohttp.ClientSession() as session:
        for _ in range(2):  # 2 attempts each: 4 failures, breaker opens at 3
            async with session.post(
                f"{gateway.url}/v1/chat/completions",
                headers={"Authorization": "Bearer gw-test-key-alice"},
                json={
                    "model": "gpt-4o-mini",
                    "messages": [{"role": "user", "content": "hi"}],
                    "max_tokens": 1,
                },
            ) as response:
                await response.read()
        assert gateway.app[state.ROUTER].breaker_states()["fake"] == "open"
        async with session.get(f"{gateway.url}/health/ready") as response:
            assert response.status == 200
            body = await response.json()
    assert body["status"] == "degraded"
    upstreams = body["components"]["upstreams"]
    assert upstreams["status"] == "unhealthy" and upstreams["circuits"]["fake"] == "open"
    assert "circuit open: fake" in upstreams["detail"]
