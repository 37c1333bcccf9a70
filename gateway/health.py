"""Liveness and readiness: each component checked, with its status and check latency.

Anyone may ask whether the gateway is ready; which components it has, which providers
it calls and their circuits' states are the operator's: the admin key sees them (on
/health/ready, and on the admin API's /admin/health/ready, which the admin listener
serves too), everyone else the overall status alone.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from gateway import state
from gateway.errors import GatewayError
from gateway.middlewares import _authenticate_admin

CHECK_TIMEOUT_SECONDS = 2.0


async def _timed(check: Callable[[], Awaitable[Any]]) -> dict[str, Any]:
    started = time.monotonic()
    try:
        async with asyncio.timeout(CHECK_TIMEOUT_SECONDS):
            detail = await check()
        result: dict[str, Any] = {"status": "healthy"}
        if isinstance(detail, dict):
            result.update(detail)
    except Exception as exc:
        result = {"status": "unhealthy", "error": type(exc).__name__}
        if isinstance(exc, OSError | ConnectionError) and exc.args:
            result["detail"] = str(exc.args[0])[:200]
    result["latency_ms"] = round((time.monotonic() - started) * 1000, 3)
    return result


async def liveness(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readiness(request: web.Request) -> web.Response:
    """200 or 503 (see `checked`); the components only for the admin key.

    Any other key, or none, gets the status alone, with the same HTTP status: a probe
    is never failed by the headers it sends.
    """
    body, status = await checked(request.app)
    if not _is_admin(request):
        body = {"status": body["status"]}
    return web.json_response(body, status=status)


async def admin_readiness(request: web.Request) -> web.Response:
    """Readiness with every component, for the admin API (its middleware checks the admin key)."""
    body, status = await checked(request.app)
    return web.json_response(body, status=status)


def _is_admin(request: web.Request) -> bool:
    headers = request.headers
    if "Authorization" not in headers and "x-api-key" not in headers:
        # A load balancer's probe: not a failed authentication.
        return False
    try:
        _authenticate_admin(request)
    except GatewayError:
        return False
    return True


async def checked(app: web.Application) -> tuple[dict[str, Any], int]:
    """Every component's check, the overall status, and 503 only when the gateway
    cannot serve (quota store or tokenizers down).

    A database outage degrades: usage waits in the ledger queue until it is back.
    """

    async def redis_check() -> None:
        await app[state.QUOTA].limiter.redis.ping()

    async def database_check() -> dict[str, Any]:
        await app[state.STORE].ping()
        return {"pending_records": app[state.LEDGER].pending}

    async def tokenizer_check() -> None:
        registry = app[state.COUNTER].registry
        encodings = {
            registry.profile(model.upstream_model, model.tokenizer).tokenizer.name
            for model in app[state.CONFIG].models.values()
        }
        for name in sorted(encodings):
            if not registry.self_test(name):
                raise RuntimeError(f"tokenizer {name} failed its self-test")

    async def spool_check() -> dict[str, Any]:
        writer = app[state.LEDGER]
        if writer.spool_error is not None:
            # Recording has stopped for lack of disk: say so, loudly.
            raise OSError(writer.spool_error)
        return {"backlog_bytes": writer.spool.backlog_bytes, "pending_records": writer.pending}

    async def upstreams_check() -> dict[str, Any]:
        states = app[state.ROUTER].breaker_states()
        taken_out = sorted(name for name, breaker in states.items() if breaker == "open")
        if taken_out:
            raise ConnectionError(f"circuit open: {', '.join(taken_out)}")
        return {"circuits": states}

    redis, database, tokenizers, spool, upstreams = await asyncio.gather(
        _timed(redis_check),
        _timed(database_check),
        _timed(tokenizer_check),
        _timed(spool_check),
        _timed(upstreams_check),
    )
    if upstreams["status"] != "healthy":
        upstreams["circuits"] = app[state.ROUTER].breaker_states()
    components = {
        "redis": redis,
        "database": database,
        "tokenizers": tokenizers,
        "spool": spool,
        "upstreams": upstreams,
    }
    essential_ok = redis["status"] == "healthy" and tokenizers["status"] == "healthy"
    if not essential_ok:
        overall = "unhealthy"
    elif any(components[name]["status"] != "healthy" for name in ("database", "spool", "upstreams")):
        overall = "degraded"
    else:
        overall = "healthy"
    healthy = sum(1 for component in components.values() if component["status"] == "healthy")
    body = {
        "status": overall,
        "healthy_share": round(healthy / len(components), 3),
        "components": components,
    }
    return body, 200 if essential_ok else 503
