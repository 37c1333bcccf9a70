"""A settlement started without a coroutine to await it (QuotaService.settle_soon) is made,
or counted as failed, like one awaited; drain waits for it."""

from __future__ import annotations

import asyncpg

from gateway import state
from gateway.auth import Principal
from gateway.quota.service import Amounts
from tests.conftest import T0_MS, StartGateway

ALICE = Principal("alice-key", "alice", "research", frozenset({"interactive"}))
POLICY = "policies:\n  - {name: lane, scope: user, limits: [{concurrent: 2}, {tokens: 1000, per: minute}]}\n"


def pinned() -> int:
    return T0_MS


async def test_a_settlement_queued_now_is_made_and_drained(
    start_gateway: StartGateway, pg: asyncpg.Connection
) -> None:
    gateway = await start_gateway(POLICY, clock_ms=pinned)
    quota = gateway.app[state.QUOTA]
    decision = gateway.app[state.POLICIES].current.for_request(ALICE, "gpt-4o-mini")
    first = await quota.admit(decision, Amounts(8, 40, 0))
    second = await quota.admit(decision, Amounts(8, 40, 0))
    quota.settle_soon(first, Amounts(8, 12, 0))
    # Redis forgot its scripts (a restart, SCRIPT FLUSH): this one is sent again once loaded.
    await quota.limiter.redis.script_flush()
    quota.settle_soon(second, Amounts(8, 2, 0))
    assert quota.settling == 2
    await quota.drain()
    assert quota.settling == 0
    readings = await quota.limiter.read(decision.limits)
    assert [(r.limit.rule.label, r.used, r.reserved) for r in readings] == [
        ("concurrent", 0, 0),
        ("tokens_per_minute", 20 + 10, 0),
    ]
    assert gateway.app[state.METRICS].quota_errors.labels("settle")._value.get() == 0
