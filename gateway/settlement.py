"""After a response: settle the reservation in Redis and queue the usage record.

Runs as its own task, never inside the handler, so a client that disconnects (or a
cancelled handler) cannot split the settlement from the ledger write.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from gateway.exchange import Exchange
from gateway.ledger import LedgerWriter, UsageRecord
from gateway.metrics import Metrics
from gateway.providers import Usage
from gateway.quota.service import QuotaService, actual_amounts
from gateway.tokens import Calibration

log = logging.getLogger("gateway.settlement")


@dataclass(frozen=True)
class FinalUsage:
    usage: Usage | None
    source: str


def final_usage(exchange: Exchange) -> FinalUsage:
    """The provider's usage; else the relayed text counted; else nothing was produced."""
    if exchange.usage is not None:
        return FinalUsage(exchange.usage, "provider")
    if exchange.relayed_tokens is not None:
        prompt = exchange.reported_prompt_tokens
        prompt = exchange.prompt.tokens if prompt is None else prompt
        return FinalUsage(Usage(prompt, exchange.relayed_tokens), "counted")
    return FinalUsage(None, "none")


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
        client (a cancelled handler) cannot stop it.
        """
        final = FinalUsage(None, "none")
        try:
            final = final_usage(exchange)
        finally:
            self._ledger.record(_record(exchange, final))
        self._spawn(self._settle(exchange, final))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def drain(self) -> None:
        """Wait for every settlement started so far."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def _settle(self, exchange: Exchange, final: FinalUsage) -> None:
        try:
            await self._quota.settle(exchange.ticket, actual_amounts(exchange.model, final.usage))
            self._observe(exchange, final)
        except Exception:
            # The reservation stays charged until it expires and is refunded.
            self._metrics.quota_errors.labels("settle").inc()
            log.exception("quota settlement failed for request %s", exchange.request_id)

    def _observe(self, exchange: Exchange, final: FinalUsage) -> None:
        model = exchange.model.name
        self._metrics.estimated_prompt_tokens.labels(model).inc(exchange.prompt.tokens)
        if final.source == "provider" and final.usage is not None:
            self._calibration.observe(
                exchange.profile,
                exchange.prompt.tokens,
                exchange.prompt.raw_tokens,
                final.usage.prompt_tokens,
            )
        if final.usage is not None:
            self._metrics.prompt_tokens.labels(model).inc(final.usage.prompt_tokens)
            self._metrics.completion_tokens.labels(model).inc(final.usage.completion_tokens)
            price = exchange.model.price
            if price is not None:
                usage = final.usage
                cost = price.cost_usd(
                    usage.prompt_tokens, usage.completion_tokens, usage.cached_prompt_tokens
                )
                self._metrics.cost.labels(model).inc(cost)
            if self._metrics.team_tokens is not None:
                team = exchange.principal.team or "none"
                self._metrics.team_tokens.labels(team, "prompt").inc(final.usage.prompt_tokens)
                self._metrics.team_tokens.labels(team, "completion").inc(final.usage.completion_tokens)
        if exchange.first_event_at is not None:
            self._metrics.time_to_first_token.labels(model).observe(
                exchange.first_event_at - exchange.started_at
            )
        upstream_seconds = exchange.upstream_seconds
        if upstream_seconds is not None:
            self._metrics.upstream_duration.labels(exchange.deployment, model).observe(upstream_seconds)


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
        client_request_id=exchange.client_request_id,
        attempts=exchange.attempts,
        cost_usd=(
            price.cost_usd(usage.prompt_tokens, usage.completion_tokens, usage.cached_prompt_tokens)
            if price is not None and usage is not None
            else None
        ),
    )
