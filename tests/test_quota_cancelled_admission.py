"""A client that goes away during admission leaves nothing reserved (QuotaService.admit).

aiohttp cancels the handler when the client disconnects; Redis runs the reserve script
anyway, so a cancelled admission must release whatever it was granted.
"""

from __future__ import annotations

import asyncio
from datetime import datetime

import asyncpg
import pytest

from gateway import state
from gateway.auth import Principal
from gateway.errors import RateLimited
from gateway.ledger.records import ModelUsage
from gateway.quota.policy import RequestPolicy
from gateway.quota.service import Amounts, QuotaService, UsageSource
from tests.conftest import T0_MS, StartGateway

ALICE = Principal("alice-key", "alice", "research", frozenset({"interactive"}))
RESERVED = Amounts(8, 40, 0)  # 48 tokens
NOTHING = Amounts(0, 0, 0)


def pinned() -> int:
    return T0_MS


async def cancelled_after(quota: QuotaService, decision: RequestPolicy, turns: int) -> bool:
    """Admit, let the loop turn `turns` times, cancel; False (and settled) if admitted first."""
    admitting = asyncio.create_task(quota.admit(decision, RESERVED))
    for _ in range(turns):
        await asyncio.sleep(0)
    if admitting.done():
        await quota.settle(admitting.result(), NOTHING)
        return False
    admitting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await admitting
    await quota.drain()
    return True


async def used_and_reserved(quota: QuotaService, decision: RequestPolicy) -> list[tuple[str, int, int]]:
    readings = await quota.limiter.read(decision.limits)
    return [(reading.limit.rule.label, reading.used, reading.reserved) for reading in readings]


async def assert_one_lane_free(quota: QuotaService, decision: RequestPolicy, amount_label: str) -> None:
    """Exactly one admission fits the `concurrent: 1` limit: the lane is free and the limit live."""
    first = await quota.admit(decision, RESERVED)
    assert await used_and_reserved(quota, decision) == [("concurrent", 1, 1), (amount_label, 48, 48)]
    with pytest.raises(RateLimited) as caught:
        await quota.admit(decision, RESERVED)
    assert caught.value.headers["x-ratelimit-limit-name"] == "concurrent"
    await quota.settle(first, NOTHING)
    assert await used_and_reserved(quota, decision) == [("concurrent", 0, 0), (amount_label, 0, 0)]


async def test_an_admission_cancelled_at_any_turn_of_the_loop_reserves_nothing(
    start_gateway: StartGateway, pg: asyncpg.Connection
) -> None:
    gateway = await start_gateway(
        "policies:\n  - {name: lane, scope: user, limits: [{concurrent: 1}, {tokens: 1000, per: minute}]}\n",
        clock_ms=pinned,
    )
    quota = gateway.app[state.QUOTA]
    decision = gateway.app[state.POLICIES].current.for_request(ALICE, "gpt-4o-mini")
    turns = 0
    while await cancelled_after(quota, decision, turns):
        assert await used_and_reserved(quota, decision) == [
            ("concurrent", 0, 0),
            ("tokens_per_minute", 0, 0),
        ], f"cancelled after {turns} turns"
        await assert_one_lane_free(quota, decision, "tokens_per_minute")
        turns += 1
    # Cancelled before it started, and at least once while Redis had the script.
    assert turns >= 2
    assert await used_and_reserved(quota, decision) == [("concurrent", 0, 0), ("tokens_per_minute", 0, 0)]
    assert gateway.app[state.METRICS].quota_errors.labels("settle")._value.get() == 0


class WatchedLedger:
    """The gateway's own ledger reader, telling whether a read is under way."""

    def __init__(self, usage: UsageSource) -> None:
        self._usage = usage
        self.reading = False

    async def usage_by_model(self, scope: str, subject: str, since: datetime) -> list[ModelUsage]:
        self.reading = True
        try:
            return await self._usage.usage_by_model(scope, subject, since)
        finally:
            self.reading = False


async def test_an_admission_cancelled_while_counters_are_rebuilt_reserves_nothing(
    start_gateway: StartGateway, pg: asyncpg.Connection
) -> None:
    gateway = await start_gateway(
        "policies:\n  - {name: daily, scope: user, limits: [{concurrent: 1}, {tokens: 1000, per: day}]}\n",
        clock_ms=pinned,
    )
    app = gateway.app
    ledger = WatchedLedger(app[state.STORE])
    quota = QuotaService(
        app[state.QUOTA].limiter, app[state.POLICIES], app[state.METRICS], app[state.CONFIG].quota, ledger
    )
    decision = app[state.POLICIES].current.for_request(ALICE, "gpt-4o-mini")
    redis, prefix = quota.limiter.redis, quota.limiter.key_prefix
    keys = [key for limit in decision.limits for key in limit.redis_keys(prefix)]
    keys.append(decision.limits[0].sync_marker(prefix))

    turns = during_rebuild = 0
    while True:
        # As on a fresh key prefix: the day counter is unknown until rebuilt from the ledger.
        await redis.delete(*keys)
        admitting = asyncio.create_task(quota.admit(decision, RESERVED))
        for _ in range(turns):
            await asyncio.sleep(0)
        if admitting.done():
            await quota.settle(admitting.result(), NOTHING)
            break
        during_rebuild += ledger.reading
        admitting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await admitting
        await quota.drain()
        assert await used_and_reserved(quota, decision) == [
            ("concurrent", 0, 0),
            ("tokens_per_day", 0, 0),
        ], f"cancelled after {turns} turns"
        await assert_one_lane_free(quota, decision, "tokens_per_day")
        turns += 1
    assert during_rebuild >= 1
    # One rebuild per round: the cancelled admission's own, or else the next admission's.
    assert app[state.METRICS].quota_rebuilds._value.get() == turns + 1
    assert await used_and_reserved(quota, decision) == [("concurrent", 0, 0), ("tokens_per_day", 0, 0)]
    assert app[state.METRICS].quota_errors.labels("settle")._value.get() == 0
