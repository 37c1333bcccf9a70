"""After a response: settle the reservation in Redis and queue the usage record.

Runs as its own task, never inside the handler, so a client that disconnects (or a
cancelled handler) cannot split the settlement from the ledger write.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine
from datetime import UTC, datetime
from typing import Any

from gateway.errors import GatewayError
from gateway.exchange import Exchange, FinalUsage
from gateway.ledger import LedgerWriter, UsageRecord
from gateway.metrics import Metrics
from gateway.quota.service import QuotaService, actual_amounts
from gateway.redact import redact
from gateway.relay import take_body_usage
from gateway.routing import Routed
from gateway.tokens import Calibration

log = logging.getLogger("gateway.settlement")


class Settlement:
    """Settles exchanges in background tasks and waits for them at shutdown."""

    def __init__(
        self, quota: QuotaService, ledger: LedgerWriter, metrics: Metrics, calibration: Calibration
    ) -> None:
        self._quota = quota
        self._ledger = ledger
        self._metrics = metrics
        self._calibration = calibration
        self._tasks: set[asyncio.Task[None]] = set()

    def settle_later(self, exchange: Exchange) -> None:
        """Record now (spooled before the handler returns), settle quota in a task.

        The record is on disk before the response leaves, so a gateway killed right after
        answering still has it; the Redis call runs off the request path and a departing
        client (a cancelled handler) cannot stop it. A non-streamed call its client left
        is first read to its end, so that it settles with the provider's usage.
        """
        if exchange.upstream_call is not None:
            self._spawn(self._finish_call(exchange, exchange.upstream_call))
            return
        self._record_and_settle(exchange)

    async def _finish_call(self, exchange: Exchange, call: asyncio.Task[Routed]) -> None:
        """Wait for the provider's answer (bounded by its timeouts), take its usage, settle."""
        exchange.upstream_call = None
        try:
            routed = await call
            exchange.routed(routed)
            take_body_usage(routed.reply, exchange)
        except GatewayError as exc:
            exchange.error_detail = exc.detail
            log.info("request %s, whose client left, failed upstream: %s", exchange.request_id, exc.code)
        except Exception:
            log.exception("request %s, whose client left, failed upstream", exchange.request_id)
        finally:
            exchange.upstream_finished()
            self._record_and_settle(exchange)

    def _record_and_settle(self, exchange: Exchange) -> None:
        final = FinalUsage(None, "none")
        try:
            final = exchange.final_usage()
        finally:
            record = _record(exchange, final)
            self._ledger.record(record)
        self._metrics.settlements.labels(final.source).inc()
        try:
            # Started here, finished without this request (see QuotaService.settle_soon).
            self._quota.settle_soon(exchange.ticket, actual_amounts(exchange.model, final.usage))
            self._observe(exchange, final, record.cost_usd)
        except Exception:
            # The reservation stays charged until it expires and is refunded.
            self._metrics.quota_errors.labels("settle").inc()
            log.exception("quota settlement failed for request %s", exchange.request_id)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def drain(self) -> None:
        """Wait for every settlement, and every release of a cancelled admission, started so far."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        await self._quota.drain()

    @property
    def in_flight(self) -> int:
        """Settlements under way: calls still being read to their end, and quota settlements."""
        return len(self._tasks) + self._quota.settling

    def _observe(self, exchange: Exchange, final: FinalUsage, cost_usd: float | None) -> None:
        """cost_usd: the usage's cost at the model's price, as the ledger records it."""
        series = self._metrics.model_series(exchange.model.name)
        series.estimated_prompt_tokens.inc(exchange.prompt.tokens)
        usage = final.usage
        if final.source == "provider" and usage is not None:
            self._calibration.observe(
                exchange.profile,
                exchange.prompt.tokens,
                exchange.prompt.raw_tokens,
                usage.prompt_tokens,
            )
        if usage is not None:
            series.prompt_tokens.inc(usage.prompt_tokens)
            series.completion_tokens.inc(usage.completion_tokens)
            if cost_usd is not None:
                series.cost().inc(cost_usd)
            team = self._metrics.team_tokens_of(exchange.principal.team or "none")
            if team is not None:
                team[0].inc(usage.prompt_tokens)
                team[1].inc(usage.completion_tokens)
        if exchange.first_event_at is not None:
            series.time_to_first_token().observe(exchange.first_event_at - exchange.started_at)
        upstream_seconds = exchange.upstream_seconds
        if upstream_seconds is not None:
            series.upstream_duration(exchange.deployment).observe(upstream_seconds)


def _record(exchange: Exchange, final: FinalUsage) -> UsageRecord:
    price, usage = exchange.model.price, final.usage
    upstream_seconds = exchange.upstream_seconds
    return UsageRecord(
        request_id=exchange.request_id,
        created_at=datetime.fromtimestamp(exchange.started_wall, UTC),
        key_id=exchange.principal.key_id,
        user_id=exchange.principal.user,
        team_id=exchange.principal.team,
        route=exchange.route,
        model=exchange.model.name,
        provider=exchange.deployment,
        upstream_model=exchange.upstream_model,
        stream=exchange.stream,
        status=exchange.status,
        error_code=exchange.error_code,
        prompt_tokens_estimated=exchange.prompt.tokens,
        prompt_estimate_exact=exchange.prompt.exact,
        reserved_tokens=exchange.reserved_tokens,
        prompt_tokens=final.usage.prompt_tokens if final.usage else None,
        completion_tokens=final.usage.completion_tokens if final.usage else None,
        usage_source=final.source,
        latency_ms=(time.monotonic() - exchange.started_at) * 1000,
        upstream_latency_ms=upstream_seconds * 1000 if upstream_seconds is not None else None,
        # The caller's own id: a key pasted there must not rest in the ledger in clear.
        client_request_id=redact(exchange.client_request_id) if exchange.client_request_id else None,
        attempts=exchange.attempts,
        error_detail=exchange.error_detail,
        cost_usd=(
            price.cost_usd(
                usage.prompt_tokens,
                usage.completion_tokens,
                usage.cached_prompt_tokens,
                usage.cache_write_prompt_tokens,
            )
            if price is not None and usage is not None
            else None
        ),
        cached_prompt_tokens=usage.cached_prompt_tokens if usage is not None else None,
        cache_write_tokens=usage.cache_write_prompt_tokens if usage is not None else None,
        caller_api=exchange.wire_format,
        provider_api=exchange.provider_api,
    )
