"""A small pure-Python model of the quota rules, to check the Lua scripts against.

It is written from the rules in the scripts' header comments, not from their code:
rolling windows as 60 buckets with the oldest counted whole, calendar days in UTC,
concurrent limits as reservations in flight, and reservations that expire and are
refunded the next time their limit is touched.
"""

from __future__ import annotations

from dataclasses import dataclass, field

DAY_MS = 86_400_000


@dataclass
class ModelLimit:
    kind: str  # "rolling" | "calendar" | "concurrent"
    capacity: int
    window_ms: int = 60_000
    bucket_ms: int = 1_000
    buckets: dict[int, int] = field(default_factory=dict)
    # reservation id → (expires at, bucket, amount)
    pending: dict[str, tuple[int, int, int]] = field(default_factory=dict)

    def bucket_of(self, now_ms: int) -> int:
        if self.kind == "calendar":
            return now_ms - now_ms % DAY_MS
        return now_ms // self.bucket_ms

    def oldest(self, now_ms: int) -> int:
        if self.kind == "calendar":
            return self.bucket_of(now_ms)
        return self.bucket_of(now_ms) - self.window_ms // self.bucket_ms

    def touch(self, now_ms: int) -> None:
        """Refund expired reservations, then drop buckets that left the window."""
        for reservation, (expires, bucket, amount) in list(self.pending.items()):
            if expires <= now_ms:
                del self.pending[reservation]
                if self.kind != "concurrent" and bucket in self.buckets:
                    self.buckets[bucket] -= amount
                    if self.buckets[bucket] <= 0:
                        del self.buckets[bucket]
        if self.kind != "concurrent":
            oldest = self.oldest(now_ms)
            self.buckets = {b: a for b, a in self.buckets.items() if b >= oldest}

    def used(self) -> int:
        if self.kind == "concurrent":
            return len(self.pending)
        return sum(self.buckets.values())


@dataclass
class QuotaModel:
    limits: list[ModelLimit]
    ttl_ms: int

    def reserve(self, now_ms: int, reservation: str, amounts: list[int]) -> tuple[bool, list[int]]:
        for limit in self.limits:
            limit.touch(now_ms)
        fits = all(
            limit.used() + amount <= limit.capacity
            for limit, amount in zip(self.limits, amounts, strict=True)
        )
        if fits:
            for limit, amount in zip(self.limits, amounts, strict=True):
                if amount <= 0:
                    continue
                bucket = limit.bucket_of(now_ms)
                if limit.kind != "concurrent":
                    limit.buckets[bucket] = limit.buckets.get(bucket, 0) + amount
                limit.pending[reservation] = (now_ms + self.ttl_ms, bucket, amount)
        return fits, [limit.used() for limit in self.limits]

    def settle(
        self, now_ms: int, reservation: str, reserved_at_ms: int, reserved: list[int], actual: list[int]
    ) -> None:
        for limit, charged, amount in zip(self.limits, reserved, actual, strict=True):
            if charged <= 0:
                continue
            was_pending = limit.pending.pop(reservation, None) is not None
            if limit.kind == "concurrent":
                continue
            bucket = limit.bucket_of(reserved_at_ms)
            delta = amount - (charged if was_pending else 0)
            counts = (
                bucket >= limit.oldest(now_ms)
                if limit.kind == "rolling"
                else bucket == limit.bucket_of(now_ms)
            )
            if delta != 0 and counts:
                limit.buckets[bucket] = limit.buckets.get(bucket, 0) + delta
                if limit.buckets[bucket] <= 0:
                    del limit.buckets[bucket]
