"""Random sequences of reserve / settle / release / clock moves through the real Lua
scripts on real Redis, each answer compared with the pure-Python model of the rules."""

from __future__ import annotations

import asyncio
import uuid

import redis.asyncio as redis_asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.quota.limiter import Charge, QuotaLimiter, Reservation
from gateway.quota.policy import AppliedLimit, LimitRule
from tests.conftest import REDIS_URL, T0_MS
from tests.quota_model import ModelLimit, QuotaModel

TTL_MS = 120_000

# Round figures and window edges are where off-by-one mistakes hide: draw them often.
amounts = st.one_of(st.sampled_from([0, 1, 10, 20, 30]), st.integers(0, 30))
moves = st.one_of(st.sampled_from([1, 999, 1_000, 59_999, 60_000, 61_000, 120_000]), st.integers(1, 100_000))
operations = st.lists(
    st.one_of(
        st.tuples(st.just("reserve"), amounts),
        st.tuples(st.just("settle"), st.integers(0, 7), st.one_of(amounts, st.integers(0, 90))),
        st.tuples(st.just("release"), st.integers(0, 7)),
        st.tuples(st.just("advance"), moves),
    ),
    min_size=8,
    max_size=50,
)


async def run(ops: list[tuple[int | str, ...]]) -> None:
    client = redis_asyncio.Redis.from_url(REDIS_URL)
    clock = {"now": T0_MS}
    limiter = QuotaLimiter(
        client, f"model:{uuid.uuid4().hex[:10]}:", clock_ms=lambda: clock["now"], reservation_ttl_ms=TTL_MS
    )
    limits = [
        AppliedLimit("m", "user", "u", LimitRule("tokens", "minute", 50)),
        AppliedLimit("m", "user", "u", LimitRule("concurrent", None, 6)),
        AppliedLimit("m", "user", "u", LimitRule("tokens", "day", 60)),
    ]
    # Calendar counters start synced (no ledger here).
    await client.set(limits[2].sync_marker(limiter.key_prefix), "1")
    model = QuotaModel(
        [ModelLimit("rolling", 50), ModelLimit("concurrent", 6), ModelLimit("calendar", 60)], TTL_MS
    )
    open_reservations: list[tuple[Reservation, list[int]]] = []
    try:
        for op in ops:
            if op[0] == "reserve":
                amount = int(op[1])
                amounts = [amount, 1, amount]
                admission = await limiter.reserve(
                    [Charge(limit, a) for limit, a in zip(limits, amounts, strict=True)]
                )
                expected_admitted, expected_used = model.reserve(
                    clock["now"], admission.reservation.id, amounts
                )
                assert admission.admitted == expected_admitted, op
                assert [state.used for state in admission.states] == expected_used, op
                if admission.admitted:
                    open_reservations.append((admission.reservation, [a if a > 0 else 0 for a in amounts]))
            elif op[0] in ("settle", "release") and open_reservations:
                reservation, reserved = open_reservations.pop(int(op[1]) % len(open_reservations))
                actual = int(op[2]) if op[0] == "settle" else 0
                figures = [actual, 0, actual]
                await limiter.settle(reservation, figures)
                model.settle(clock["now"], reservation.id, reservation.reserved_at_ms, reserved, figures)
            elif op[0] == "advance":
                clock["now"] += int(op[1])
    finally:
        keys = [key async for key in client.scan_iter(f"{limiter.key_prefix}*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=operations)
def test_scripts_agree_with_the_model(redis_url: str, ops: list[tuple[int | str, ...]]) -> None:
    asyncio.run(run(ops))
