"""reserve_quota.lua and settle_quota.lua on a real Redis, with the clock pinned."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as redis_asyncio

from gateway.quota.limiter import Charge, QuotaLimiter
from gateway.quota.policy import AppliedLimit, LimitRule
from tests.conftest import REDIS_KEY_PREFIX, T0_MS

# A rolling window's running total and the bucket it starts at (see reserve_quota.lua).
RUNNING_TOTAL_FIELDS = (b"0", b"1")


class Clock:
    def __init__(self) -> None:
        self.now_ms = T0_MS

    def __call__(self) -> int:
        return self.now_ms


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[redis_asyncio.Redis]:
    client = redis_asyncio.Redis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def limiter(redis_client: redis_asyncio.Redis, clock: Clock) -> QuotaLimiter:
    return QuotaLimiter(redis_client, f"{REDIS_KEY_PREFIX}luatest:{uuid.uuid4().hex[:8]}:", clock_ms=clock)


def limit(
    capacity: int, kind: str = "tokens", window: str = "minute", subject: str = "alice"
) -> AppliedLimit:
    return AppliedLimit("p", "user", subject, LimitRule(kind, window, capacity))


async def buckets_of(limiter: QuotaLimiter, applied: AppliedLimit) -> dict[bytes, bytes]:
    """The limit's buckets, without a rolling window's running total (fields "0" and "1")."""
    fields = await limiter.redis.hgetall(applied.redis_keys(limiter.key_prefix)[0])
    return {name: value for name, value in fields.items() if name not in RUNNING_TOTAL_FIELDS}


async def total_of(limiter: QuotaLimiter, applied: AppliedLimit) -> int:
    return int(await limiter.redis.hget(applied.redis_keys(limiter.key_prefix)[0], "0") or 0)


async def used(limiter: QuotaLimiter, applied: AppliedLimit) -> int:
    """What the buckets hold; for rolling windows, also checks that the running total agrees."""
    held = sum(int(value) for value in (await buckets_of(limiter, applied)).values())
    if applied.rule.window is not None and not applied.rule.calendar:
        assert await total_of(limiter, applied) == held
    return held


async def test_admission_is_all_or_nothing(limiter: QuotaLimiter) -> None:
    roomy, tight = limit(10, subject="a"), limit(5, subject="b")
    first = await limiter.reserve([Charge(roomy, 4), Charge(tight, 4)])
    assert first.admitted
    assert [state.remaining for state in first.states] == [6, 1]
    second = await limiter.reserve([Charge(roomy, 4), Charge(tight, 4)])
    assert not second.admitted
    assert second.rejected_by is not None and second.rejected_by.limit == tight
    # The limit that had room was not charged either.
    assert (await used(limiter, roomy), await used(limiter, tight)) == (4, 4)


async def test_window_rolls_and_the_oldest_bucket_counts_whole(limiter: QuotaLimiter, clock: Clock) -> None:
    applied = limit(10)
    assert (await limiter.reserve([Charge(applied, 10)])).admitted
    clock.now_ms = T0_MS + 30_000
    halfway = await limiter.reserve([Charge(applied, 1)])
    assert not halfway.admitted
    # The bucket of T0 leaves the count at T0 + 61 s (the partial bucket counts whole).
    assert halfway.retry_after_ms == 31_000
    clock.now_ms = T0_MS + 60_999
    assert not (await limiter.reserve([Charge(applied, 1)])).admitted
    clock.now_ms = T0_MS + 61_000
    later = await limiter.reserve([Charge(applied, 10)])
    assert later.admitted
    assert later.states[0].remaining == 0
    # Expired buckets are deleted, not left to grow the hash.
    assert await used(limiter, applied) == 10


async def test_buckets_written_before_the_running_total_are_added_up_once(
    limiter: QuotaLimiter, clock: Clock
) -> None:
    """A rolling window's hash from before its running total was kept (or one whose total
    an older gateway dropped) is added up from its buckets; expired buckets are deleted."""
    applied = limit(100)
    key = applied.redis_keys(limiter.key_prefix)[0]
    now_bucket = T0_MS // 1000
    await limiter.redis.hset(
        key, mapping={str(now_bucket - 61): 40, str(now_bucket - 60): 7, str(now_bucket - 1): 11}
    )
    admission = await limiter.reserve([Charge(applied, 5)])
    # The bucket 60 s back still counts whole (the window is 60 buckets plus the current one).
    assert admission.states[0].used == 7 + 11 + 5
    assert await buckets_of(limiter, applied) == {
        str(now_bucket - 60).encode(): b"7",
        str(now_bucket - 1).encode(): b"11",
        str(now_bucket).encode(): b"5",
    }
    assert await limiter.redis.hmget(key, ["0", "1"]) == [b"23", str(now_bucket - 60).encode()]
    # One second on, the total drops the bucket that left, without adding up again.
    clock.now_ms = T0_MS + 1_000
    assert (await limiter.reserve([Charge(applied, 1)])).states[0].used == 11 + 5 + 1
    assert await used(limiter, applied) == 17


async def test_the_running_total_is_added_up_afresh_once_per_window(
    limiter: QuotaLimiter, clock: Clock
) -> None:
    """A total that went wrong (say, a settlement by an older gateway that did not keep
    it) is right again once a new window length begins, and not before."""
    applied = limit(1_000)
    key = applied.redis_keys(limiter.key_prefix)[0]
    # T0 is on a whole minute, so the buckets from T0 - 60 s on start a new window length.
    assert (T0_MS // 1000) % 60 == 0
    clock.now_ms = T0_MS - 2_000
    assert (await limiter.reserve([Charge(applied, 10)])).admitted
    await limiter.redis.hincrby(key, "0", 500)
    clock.now_ms = T0_MS - 1_000
    assert (await limiter.reserve([Charge(applied, 1)])).states[0].used == 511
    clock.now_ms = T0_MS
    assert (await limiter.reserve([Charge(applied, 1)])).states[0].used == 12
    assert await used(limiter, applied) == 12


async def test_a_clock_that_goes_back_adds_the_window_up_again(limiter: QuotaLimiter, clock: Clock) -> None:
    applied = limit(100)
    clock.now_ms = T0_MS + 120_000
    assert (await limiter.reserve([Charge(applied, 30)])).admitted
    # Redis failed over to a replica whose clock is 2 minutes behind.
    clock.now_ms = T0_MS
    assert (await limiter.reserve([Charge(applied, 4)])).states[0].used == 34
    clock.now_ms = T0_MS + 1_000
    assert (await limiter.reserve([Charge(applied, 2)])).states[0].used == 36
    assert await used(limiter, applied) == 36


async def test_no_double_burst_at_a_minute_boundary(limiter: QuotaLimiter, clock: Clock) -> None:
    """A fixed window would reset at T0 + 60 s; the rolling one still holds the burst."""
    applied = limit(10, kind="requests")
    clock.now_ms = T0_MS + 59_000
    outcomes = [(await limiter.reserve([Charge(applied, 1)])).admitted for _ in range(12)]
    assert outcomes.count(True) == 10
    clock.now_ms = T0_MS + 61_000
    assert not (await limiter.reserve([Charge(applied, 1)])).admitted
    clock.now_ms = T0_MS + 59_000 + 61_000
    assert (await limiter.reserve([Charge(applied, 1)])).admitted


async def test_retry_after_frees_just_enough(limiter: QuotaLimiter, clock: Clock) -> None:
    applied = limit(10)
    for offset_ms, amount in ((0, 3), (5_000, 3), (10_000, 4)):
        clock.now_ms = T0_MS + offset_ms
        assert (await limiter.reserve([Charge(applied, amount)])).admitted
    clock.now_ms = T0_MS + 20_000
    # 5 more need the first two buckets (3 + 3) gone: the second leaves at 5 s + 61 s.
    decision = await limiter.reserve([Charge(applied, 5)])
    assert not decision.admitted
    assert decision.retry_after_ms == 66_000 - 20_000
    assert decision.states[0].reset_ms == 71_000 - 20_000


async def test_a_request_larger_than_the_capacity_can_never_fit(limiter: QuotaLimiter) -> None:
    decision = await limiter.reserve([Charge(limit(10), 11)])
    assert not decision.admitted
    assert decision.retry_after_ms == -1


async def test_settle_refunds_and_overshoots_in_the_reserved_bucket(
    limiter: QuotaLimiter, clock: Clock
) -> None:
    applied = limit(100)
    reservation = (await limiter.reserve([Charge(applied, 50)])).reservation
    clock.now_ms = T0_MS + 20_000
    await limiter.settle(reservation, [20])
    assert await used(limiter, applied) == 20
    assert await buckets_of(limiter, applied) == {str(T0_MS // 1000).encode(): b"20"}

    overshoot = (await limiter.reserve([Charge(applied, 30)])).reservation
    await limiter.settle(overshoot, [120])
    assert await used(limiter, applied) == 140
    blocked = await limiter.reserve([Charge(applied, 1)])
    assert not blocked.admitted and blocked.states[0].remaining == 0


async def test_settle_after_the_window_has_passed_changes_nothing(
    limiter: QuotaLimiter, clock: Clock
) -> None:
    applied = limit(100)
    reservation = (await limiter.reserve([Charge(applied, 50)])).reservation
    clock.now_ms = T0_MS + 30_000
    assert (await limiter.reserve([Charge(applied, 10)])).admitted
    clock.now_ms = T0_MS + 62_000
    await limiter.settle(reservation, [0])
    assert (await buckets_of(limiter, applied))[str(T0_MS // 1000).encode()] == b"50"
    # What the window still holds: the 10 of T0 + 30 s, plus this request's 1.
    assert (await limiter.reserve([Charge(applied, 1)])).states[0].used == 11


async def test_keys_expire_after_their_window(limiter: QuotaLimiter) -> None:
    applied = limit(10, window="hour")
    await limiter.reserve([Charge(applied, 1)])
    ttl_ms = await limiter.redis.pttl(applied.redis_keys(limiter.key_prefix)[0])
    assert 3_600_000 < ttl_ms <= 3_600_000 + 2 * 60_000


async def test_a_settlement_that_makes_its_key_again_gives_it_an_expiry(limiter: QuotaLimiter) -> None:
    applied = limit(10, window="hour")
    reservation = (await limiter.reserve([Charge(applied, 5)])).reservation
    buckets, pending = applied.redis_keys(limiter.key_prefix)
    await limiter.redis.delete(buckets, pending)  # as a reset does (or an eviction)
    await limiter.settle(reservation, [3])
    assert list((await buckets_of(limiter, applied)).values()) == [b"3"]
    assert 3_600_000 < await limiter.redis.pttl(buckets) <= 3_600_000 + 2 * 60_000


async def test_the_expiry_is_set_when_a_bucket_begins(limiter: QuotaLimiter, clock: Clock) -> None:
    """Set on the first charge of each bucket, not on every charge: the key must outlive
    its newest bucket, and a later charge of the same bucket does not make it newer."""
    applied = limit(100)  # a minute: buckets of a second
    buckets = applied.redis_keys(limiter.key_prefix)[0]
    keep_ms = 60_000 + 2 * 1000
    await limiter.reserve([Charge(applied, 1)])
    first = await limiter.redis.pttl(buckets)
    assert keep_ms - 1000 < first <= keep_ms
    await asyncio.sleep(0.3)  # Redis's own clock runs the expiry
    await limiter.reserve([Charge(applied, 1)])  # the same bucket: the expiry runs on
    assert await limiter.redis.pttl(buckets) <= first - 250
    clock.now_ms += 1000  # the next bucket begins: the expiry is set again
    await limiter.reserve([Charge(applied, 1)])
    assert await limiter.redis.pttl(buckets) > first - 250


async def test_a_limit_never_charged_leaves_no_key(limiter: QuotaLimiter, clock: Clock) -> None:
    """A key is only made with an expiry: one kept by a limit that never charges anything
    (a request too large for it, or a shadow limit that would reject) would stay forever."""
    too_small = limit(5)
    shadow = AppliedLimit("s", "team", "blue", LimitRule("requests", "minute", 0), enforced=False)
    for _ in range(2):
        assert not (await limiter.reserve([Charge(too_small, 6)])).admitted
        admission = await limiter.reserve([Charge(shadow, 1)])
        assert admission.admitted and admission.shadow_rejections
        clock.now_ms += 61_000
    for applied in (too_small, shadow):
        assert await limiter.redis.exists(applied.redis_keys(limiter.key_prefix)[0]) == 0
    # A total kept for a window that emptied, by an earlier version without an expiry, goes too.
    await limiter.redis.hset(too_small.redis_keys(limiter.key_prefix)[0], mapping={"0": 0, "1": 1})
    assert not (await limiter.reserve([Charge(too_small, 6)])).admitted
    assert await limiter.redis.exists(too_small.redis_keys(limiter.key_prefix)[0]) == 0


async def test_redis_clock_is_used_when_not_pinned(redis_client: redis_asyncio.Redis) -> None:
    limiter = QuotaLimiter(redis_client, f"{REDIS_KEY_PREFIX}luatest:{uuid.uuid4().hex[:8]}:")
    before_ms = int(time.time() * 1000)
    decision = await limiter.reserve([Charge(limit(10), 1)])
    after_ms = int(time.time() * 1000)
    assert before_ms - 1000 <= decision.reservation.reserved_at_ms <= after_ms + 1000


def test_keys_share_one_hash_tag_per_subject() -> None:
    key, pending = limit(10).redis_keys("gw:")
    assert (key, pending) == ("gw:{user:alice}:p:tokens:minute:b", "gw:{user:alice}:p:tokens:minute:p")


async def test_calls_packed_from_parts_are_the_calls_hiredis_packs(
    limiter: QuotaLimiter, redis_client: redis_asyncio.Redis, clock: Clock
) -> None:
    """The request path packs script calls from each limit's parts packed ahead; the
    cluster path packs KEYS and ARGV whole. Both must be the same bytes."""
    from gateway.quota.batching import evalsha
    from gateway.quota.limiter import LimitState, Reservation
    from gateway.quota.resp import bulk_int

    shadow = AppliedLimit("s", "team", "blue", LimitRule("tokens", "day", 10), enforced=False)
    limits = [
        limit(1000),
        limit(5, "requests"),
        limit(9, "concurrent", None),
        limit(10**6, "cost_usd", "month"),
    ]
    charges = [
        Charge(applied, amount)
        for applied, amount in zip([*limits, shadow], [120, 1, 1, 4500, 20], strict=True)
    ]

    def packed_now() -> list[Any]:
        return [limiter._packed(charge.limit, clock.now_ms) for charge in charges]

    amounts = [bulk_int(charge.amount) for charge in charges]
    # Settled with the amount reserved, none, a small one and large ones; then with one
    # figure for several limits, one settled with its reserved amount between them.
    for used in ([120, 0, 1, 10**7, 20], [5, 1, 5, 5, 20]):
        for pinned in (True, False):
            limiter.clock_ms = clock if pinned else None
            for turn in range(2):  # the second time from the parts kept on each limit
                packed = packed_now()
                keys, args = limiter._reserve_call("r1", charges, packed)
                assert limiter._reserve_command("r1", packed, amounts) == evalsha(
                    limiter._reserve, keys, args
                )
                # A bucket of its own on each turn: each part remembers the last one it wrote.
                states = [
                    LimitState(c.limit, 7, 100, charged=i != 4, bucket=1000 * turn + i)
                    for i, c in enumerate(charges)
                ]
                entries = [
                    (c, parts.spans, state, amount)
                    for c, parts, state, amount in zip(charges, packed, states, used, strict=True)
                ]
                keys, args = limiter._settle_call("r1", entries)
                assert len(keys) == 8  # the uncharged shadow limit is left out
                reservation = Reservation(
                    "r1", tuple(charges), tuple(states), clock.now_ms, tuple(packed), tuple(amounts)
                )
                assert limiter._settle_command(reservation, used) == evalsha(limiter._settle, keys, args)
            # A new month: the calendar limits' parts are packed again for the new period.
            clock.now_ms += 40 * 86_400_000
            repacked = packed_now()
            assert [new is old for new, old in zip(repacked, packed, strict=True)] == [
                True,
                True,
                True,
                False,
                False,
            ]
    uncharged = Reservation("r1", (charges[4],), (states[4],), 0, (packed[4],), (amounts[4],))
    assert limiter._settle_command(uncharged, [1]) is None
