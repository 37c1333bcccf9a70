"""Reserve on admission, settle with actual usage: one Lua call each.

The limiter only talks to Redis; it never writes the ledger (see STYLE.md).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from gateway.errors import ServiceUnavailable
from gateway.quota.policy import AppliedLimit


def _lua(name: str) -> str:
    return resources.files("gateway.quota").joinpath("lua", name).read_text(encoding="utf-8")


@dataclass(frozen=True)
class Charge:
    """What one request takes from one limit."""

    limit: AppliedLimit
    amount: int


@dataclass(frozen=True)
class LimitState:
    """A limit as seen right after the admission decision."""

    limit: AppliedLimit
    used: int
    reset_ms: int

    @property
    def capacity(self) -> int:
        return self.limit.rule.capacity

    @property
    def remaining(self) -> int:
        return max(0, self.capacity - self.used)


@dataclass(frozen=True)
class Reservation:
    """What was charged at admission, so it can be settled later."""

    charges: tuple[Charge, ...]
    reserved_at_ms: int


@dataclass(frozen=True)
class Admission:
    admitted: bool
    reservation: Reservation
    states: tuple[LimitState, ...] = ()
    rejected_by: LimitState | None = None
    # -1: the request can never fit this limit, whatever the wait.
    retry_after_ms: int = 0
    requested: int = 0


@dataclass
class QuotaLimiter:
    """Runs reserve_quota.lua and settle_quota.lua against one Redis."""

    redis: Redis
    key_prefix: str
    # Tests pin the clock; production reads Redis's TIME so replicas share one clock.
    clock_ms: Callable[[], int] | None = None
    _reserve: Any = field(init=False, repr=False)
    _settle: Any = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._reserve = self.redis.register_script(_lua("reserve_quota.lua"))
        self._settle = self.redis.register_script(_lua("settle_quota.lua"))

    def _now_arg(self) -> str:
        return "" if self.clock_ms is None else str(self.clock_ms())

    async def reserve(self, charges: Sequence[Charge]) -> Admission:
        """Admit against every charge or none; raises ServiceUnavailable if Redis fails."""
        if not charges:
            return Admission(admitted=True, reservation=Reservation((), 0))
        keys = [charge.limit.redis_key(self.key_prefix) for charge in charges]
        args: list[str | int] = [self._now_arg()]
        for charge in charges:
            rule = charge.limit.rule
            args += [rule.capacity, rule.window_ms, rule.bucket_ms, charge.amount]
        try:
            reply = await self._reserve(keys=keys, args=args)
        except (RedisError, OSError) as exc:
            raise ServiceUnavailable(
                "The quota store is unreachable; the request was not admitted.",
                code="quota_store_unavailable",
            ) from exc
        admitted, now_ms, rejecting, retry_after_ms = (int(value) for value in reply[:4])
        states = tuple(
            LimitState(charge.limit, used=int(reply[4 + 2 * i]), reset_ms=int(reply[5 + 2 * i]))
            for i, charge in enumerate(charges)
        )
        return Admission(
            admitted=bool(admitted),
            reservation=Reservation(tuple(charges), now_ms),
            states=states,
            rejected_by=states[rejecting - 1] if rejecting else None,
            retry_after_ms=retry_after_ms,
            requested=charges[rejecting - 1].amount if rejecting else 0,
        )

    async def settle(self, reservation: Reservation, actual: Sequence[int]) -> None:
        """Replace each charge's reserved amount with `actual[i]` (same order as charges)."""
        keys: list[str] = []
        args: list[str | int] = [self._now_arg(), reservation.reserved_at_ms]
        for charge, amount in zip(reservation.charges, actual, strict=True):
            delta = amount - charge.amount
            if delta == 0:
                continue
            rule = charge.limit.rule
            keys.append(charge.limit.redis_key(self.key_prefix))
            args += [rule.window_ms, rule.bucket_ms, delta]
        if keys:
            await self._settle(keys=keys, args=args)
