"""Liveness and readiness: every component for the admin key, the status alone for the rest."""

from __future__ import annotations

from typing import Any

import aiohttp
import asyncpg

from tests.conftest import ADMIN_KEY, USER_KEY, RunningGateway, StartGateway

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


async def ready(gateway: RunningGateway, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{gateway.url}/health/ready", headers=headers) as response,
    ):
        return response.status, await response.json()


async def test_liveness(gateway: RunningGateway) -> None:
    async with aiohttp.ClientSession() as session, session.get(f"{gateway.url}/health") as response:
        assert response.status == 200
        assert await response.json() == {"status": "ok"}


async def test_readiness_checks_redis_postgres_and_tokenizers(gateway: RunningGateway) -> None:
    status, body = await ready(gateway, ADMIN)
    assert status == 200
    assert body["status"] == "healthy"
    assert body["healthy_share"] == 1.0
    assert set(body["components"]) == {"redis", "database", "tokenizers", "spool", "upstreams"}
    assert body["components"]["upstreams"]["circuits"] == {
        "fake": "closed",
        "azure": "closed",
        "anthropic": "closed",
        "mock": "closed",
    }
    for component in body["components"].values():
        assert component["status"] == "healthy"
        assert component["latency_ms"] >= 0


async def test_public_readiness_says_only_the_status(gateway: RunningGateway) -> None:
    """Without the admin key: no provider names, circuits, backlog or error details."""
    cases: list[dict[str, str] | None] = [
        None,
        {"Authorization": f"Bearer {USER_KEY}"},  # a caller's key is not the admin key
        {"Authorization": "Bearer wrong"},
        {"x-api-key": "wrong"},
        {"Authorization": "Basic dXNlcjpwYXNz"},
    ]
    for headers in cases:
        assert await ready(gateway, headers) == (200, {"status": "healthy"}), headers
    # The admin key by either header shows the components.
    for headers in (ADMIN, {"x-api-key": ADMIN_KEY}):
        status, body = await ready(gateway, headers)
        assert status == 200 and "components" in body, headers


async def test_readiness_fails_when_redis_is_unreachable(
    start_gateway: StartGateway,
    config_writer,
    pg: asyncpg.Connection,  # type: ignore[no-untyped-def]
) -> None:
    from tests.conftest import refused_port

    config_writer.redis_url = f"redis://127.0.0.1:{refused_port()}/0"
    gateway = await start_gateway()
    assert await ready(gateway) == (503, {"status": "unhealthy"})
    status, body = await ready(gateway, ADMIN)
    assert status == 503
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
    assert await ready(gateway) == (200, {"status": "degraded"})
    status, body = await ready(gateway, ADMIN)
    assert status == 200
    assert body["status"] == "degraded"
    upstreams = body["components"]["upstreams"]
    assert upstreams["status"] == "unhealthy" and upstreams["circuits"]["fake"] == "open"
    assert "circuit open: fake" in upstreams["detail"]


async def test_the_admin_readiness_route_needs_the_admin_key(gateway: RunningGateway) -> None:
    """/admin/health/ready: every component for operators (also on the admin listener)."""
    url = f"{gateway.url}/admin/health/ready"
    async with aiohttp.ClientSession() as session:
        for headers in ({}, {"Authorization": f"Bearer {USER_KEY}"}):
            async with session.get(url, headers=headers) as response:
                assert (response.status, (await response.json())["error"]["code"]) == (401, "invalid_api_key")
        async with session.get(url, headers=ADMIN) as response:
            body = await response.json()
            assert response.status == 200
            assert body["components"]["upstreams"]["circuits"]["fake"] == "closed"
