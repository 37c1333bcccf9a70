"""create_app(config) → a web.Application with its routes, middlewares and resources.

Each shared resource is opened and closed by one cleanup context, in the order below;
teardown runs in reverse, so in-flight settlements finish before Redis and the ledger
close, and the ledger flushes before the database closes. Shutdown ends with one line
saying what it waited for and what it wrote (ShutdownReport).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from aiohttp import web
from prometheus_client import multiprocess

from gateway import connections, count_routes, health, proxy, quota_routes, state
from gateway.auth import Authenticator, FailedAuthentications
from gateway.config import ConfigError, GatewayConfig
from gateway.console import CONSOLE_PREFIX, console_app
from gateway.ledger import LedgerWriter, open_store
from gateway.ledger.spool import Spool
from gateway.metrics import MULTIPROCESS_ENV, Metrics
from gateway.middlewares import authenticate_admin, authenticate_api, errors_and_metrics
from gateway.policies import PolicyHolder
from gateway.providers import build_providers
from gateway.quota.limiter import QuotaLimiter
from gateway.quota.service import QuotaService
from gateway.quota.store import open_redis
from gateway.routing import Router
from gateway.settlement import Settlement
from gateway.tokens import (
    Calibration,
    PromptCounter,
    TokenizerFilesMissing,
    TokenizerRegistry,
    TokenizerUnavailable,
)

log = logging.getLogger("gateway")

POLICY_RELOAD_SECONDS = 2.0


@dataclass
class ShutdownReport:
    """Figures taken as shutdown begins and as resources close, logged as one line at the end."""

    began_at: float | None = None
    requests_in_flight: int = 0
    ledger_rows_before: float = 0.0
    settlements_drained: int = 0


SHUTDOWN = web.AppKey("shutdown", ShutdownReport)


def create_app(config: GatewayConfig, *, clock_ms: Callable[[], int] | None = None) -> web.Application:
    """The gateway application; `clock_ms` pins the quota clock (tests only)."""
    app = web.Application(
        middlewares=[errors_and_metrics(authenticate_api)],
        client_max_size=config.server.max_body_bytes,
    )
    app[state.CONFIG] = config
    app[state.METRICS] = Metrics(team_labels=config.metrics_team_labels)
    registry = TokenizerRegistry(config.tokens)
    _load_tokenizers(config, registry)
    app[state.COUNTER] = PromptCounter(registry, Calibration(config.tokens, app[state.METRICS]))
    app[state.POLICIES] = PolicyHolder(config.base_dir, config.quota.policy_glob, app[state.METRICS])
    app[SHUTDOWN] = ShutdownReport()
    # Before aiohttp waits for the requests being served: their count is the one at the signal.
    app.on_shutdown.append(_shutdown_begins)

    app.cleanup_ctx.append(_store)
    app.cleanup_ctx.append(_ledger)
    app.cleanup_ctx.append(_limiter(clock_ms))
    app.cleanup_ctx.append(_providers)
    app.cleanup_ctx.append(_settlement)
    app.cleanup_ctx.append(_policy_watch)

    for spec in proxy.ROUTES.values():
        app.router.add_post(f"/v1/{spec.name}", proxy.handler(spec))
    app.router.add_get("/v1/models", proxy.list_models)
    app.router.add_post("/v1/tokens/count", count_routes.count_openai_request)
    app.router.add_post("/v1/messages/count_tokens", count_routes.count_anthropic_request)
    app.router.add_get("/v1/quota", quota_routes.own_quota)
    if config.admin_address is None:
        _add_admin_routes(app)
        _add_console(app, app)
    else:
        # The admin API listens on its own address; the public port does not serve it.
        app.cleanup_ctx.append(_admin_site)
    app.router.add_get("/health", health.liveness)
    app.router.add_get("/health/ready", health.readiness)
    app.router.add_get("/metrics", _metrics)
    app.on_cleanup.append(_log_shutdown)
    app.on_cleanup.append(_metrics_cleanup)
    return app


async def _shutdown_begins(app: web.Application) -> None:
    report = app[SHUTDOWN]
    report.began_at = time.monotonic()
    metrics = app[state.METRICS]
    report.requests_in_flight = int(metrics.sample("gateway_requests_in_flight"))
    report.ledger_rows_before = metrics.sample("gateway_ledger_rows_written_total")


async def _log_shutdown(app: web.Application) -> None:
    """After every cleanup context has closed (the ledger flushed, the database closed)."""
    report = app[SHUTDOWN]
    now = time.monotonic()
    seconds = now - (report.began_at if report.began_at is not None else now)
    written_total = int(app[state.METRICS].sample("gateway_ledger_rows_written_total"))
    written = written_total - int(report.ledger_rows_before)
    ledger = app.get(state.LEDGER)
    still_spooled = ledger.pending if ledger is not None else 0
    log.info(
        "shut down in %.2f s: %d requests were in flight, %d settlements drained, "
        "%d ledger rows written (%d since start), %d left in the spool",
        seconds,
        report.requests_in_flight,
        report.settlements_drained,
        written,
        written_total,
        still_spooled,
        extra={
            "fields": {
                "shutdown_seconds": round(seconds, 3),
                "requests_in_flight": report.requests_in_flight,
                "settlements_drained": report.settlements_drained,
                "ledger_rows_written": written,
                "ledger_rows_written_since_start": written_total,
                "ledger_rows_still_spooled": still_spooled,
            }
        },
    )


async def _metrics_cleanup(app: web.Application) -> None:
    if os.environ.get(MULTIPROCESS_ENV):
        # This worker's live gauges (in flight, backlog) stop counting toward the sum.
        multiprocess.mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]


def _add_admin_routes(app: web.Application) -> None:
    # Readiness with every component (providers, circuit states): for operators only.
    app.router.add_get("/admin/health/ready", health.admin_readiness)
    app.router.add_get("/admin/quota/{scope}/{subject}", quota_routes.admin_show_quota)
    app.router.add_delete("/admin/quota/{scope}/{subject}", quota_routes.admin_reset_quota)
    app.router.add_get("/admin/usage", quota_routes.admin_usage)


def _add_console(host: web.Application, gateway: web.Application) -> None:
    """The operators' console at /ui/ on `host` (the admin listener's app or the main
    one), reading `gateway`'s resources; only while the admin API is on."""
    config = gateway[state.CONFIG]
    if config.admin_key_sha256 is not None and config.console.enabled:
        host.add_subapp(CONSOLE_PREFIX.rstrip("/"), console_app(gateway))


async def _admin_site(app: web.Application) -> AsyncIterator[None]:
    """A second, small application on the admin address, sharing this one's resources."""
    address = app[state.CONFIG].admin_address
    assert address is not None
    admin = web.Application(middlewares=[errors_and_metrics(authenticate_admin)])
    admin[state.CONFIG] = app[state.CONFIG]
    admin[state.METRICS] = app[state.METRICS]
    admin[state.POLICIES] = app[state.POLICIES]
    admin[state.QUOTA] = app[state.QUOTA]
    admin[state.STORE] = app[state.STORE]
    # Admin-key guesses are counted with the public port's, per client address.
    admin[state.AUTH_FAILURES] = app[state.AUTH_FAILURES]
    # What /admin/health/ready checks.
    admin[state.LEDGER] = app[state.LEDGER]
    admin[state.COUNTER] = app[state.COUNTER]
    admin[state.ROUTER] = app[state.ROUTER]
    _add_admin_routes(admin)
    _add_console(admin, app)
    # The same header deadline, size bound and per-address limit as the public port,
    # counted apart from it.
    runner, _ = await connections.start(admin, admin[state.CONFIG].server, address[0], address[1])
    log.info("admin API listening on http://%s:%d", address[0], address[1])
    app[state.ADMIN_RUNNER] = runner
    yield
    await runner.cleanup()


def _load_tokenizers(config: GatewayConfig, registry: TokenizerRegistry) -> None:
    """Load every model's tokenizer now: a missing BPE file must stop start-up, not a request."""
    started = time.monotonic()
    for name, model in config.models.items():
        try:
            profile = registry.profile(model.upstream_model, model.tokenizer)
        except TokenizerFilesMissing:
            raise  # not the configuration's fault: the message names `gateway tokenizers fetch`
        except TokenizerUnavailable as exc:
            raise ConfigError(str(config.path), f"models.{name}", str(exc)) from exc
        if not profile.exact:
            log.info(
                "model %s: prompts are estimated with %s (%s)", name, profile.tokenizer.name, profile.reason
            )
    log.info("tokenizers loaded for %d models in %.2f s", len(config.models), time.monotonic() - started)


async def _metrics(request: web.Request) -> web.Response:
    metrics = request.app[state.METRICS]
    metrics.event_loop_tasks.set(len(asyncio.all_tasks()))
    body = metrics.exposition()
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


async def _store(app: web.Application) -> AsyncIterator[None]:
    store = open_store(app[state.CONFIG].backends)
    await store.open()
    try:
        applied = await store.migrate()
        if applied:
            log.info("database migrated to version %d", applied[-1])
    except BaseException:
        await store.close()
        raise
    log.info("ledger and keys: %s", store.description)
    app[state.STORE] = store
    app[state.AUTH] = Authenticator(app[state.CONFIG].keys, store)
    app[state.AUTH_FAILURES] = FailedAuthentications(app[state.CONFIG].server.auth_failures_per_minute)
    yield
    await store.close()


async def _ledger(app: web.Application) -> AsyncIterator[None]:
    config = app[state.CONFIG].ledger
    writer = LedgerWriter(
        app[state.STORE], config, app[state.METRICS], Spool(config.spool_dir, config.segment_bytes)
    )
    writer.start()
    app[state.LEDGER] = writer
    yield
    await writer.stop()


def _limiter(clock_ms: Callable[[], int] | None) -> Callable[[web.Application], AsyncIterator[None]]:
    async def open_limiter(app: web.Application) -> AsyncIterator[None]:
        config = app[state.CONFIG].backends.redis
        redis, description = open_redis(config)
        log.info("quota store: %s", description)
        prefix = config.key_prefix if config is not None else "gw:"
        quota_config = app[state.CONFIG].quota
        # Bound once, not looked up in the application at each of a request's two calls
        # (Labelled keeps each operation's series).
        redis_seconds = app[state.METRICS].backend_seconds
        limiter = QuotaLimiter(
            redis,
            prefix,
            clock_ms=clock_ms,
            time_zone=quota_config.time_zone,
            reservation_ttl_ms=int(quota_config.reservation_ttl_seconds * 1000),
            observe=lambda operation, seconds: redis_seconds.labels("redis", operation).observe(seconds),
        )
        app[state.QUOTA] = QuotaService(
            limiter, app[state.POLICIES], app[state.METRICS], quota_config, app[state.STORE]
        )
        yield
        await limiter.close()
        await redis.aclose()

    return open_limiter


async def _providers(app: web.Application) -> AsyncIterator[None]:
    config = app[state.CONFIG]
    providers = build_providers(config.providers, app[state.COUNTER].registry)
    app[state.PROVIDERS] = providers
    app[state.ROUTER] = Router(
        providers, config.routing, app[state.METRICS], provider_configs=config.providers
    )
    yield
    for provider in providers.values():
        await provider.close()


async def _settlement(app: web.Application) -> AsyncIterator[None]:
    settlement = Settlement(
        app[state.QUOTA], app[state.LEDGER], app[state.METRICS], app[state.COUNTER].calibration
    )
    app[state.SETTLEMENT] = settlement
    yield
    # Settlements still running once the last request is answered (read for the shutdown line).
    app[SHUTDOWN].settlements_drained = settlement.in_flight
    await settlement.drain()


async def _policy_watch(app: web.Application) -> AsyncIterator[None]:
    holder = app[state.POLICIES]
    task = asyncio.create_task(holder.watch(POLICY_RELOAD_SECONDS))
    loop = asyncio.get_running_loop()
    with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
        # SIGHUP reloads at once (only where this process may own signal handlers).
        loop.add_signal_handler(signal.SIGHUP, lambda: holder.reload_if_changed(force=True))
    yield
    with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
        loop.remove_signal_handler(signal.SIGHUP)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
