"""An approximate, per-process limiter for fail-open policies while Redis is away.

Each gateway process counts only its own traffic, so N processes may together admit
up to N times a limit; that is the price of staying open, and why `fail: closed` is
the default.
"""

from __future__ import annotations

import time
import uuid
from collections import deque
from collections.abc import Sequence
from zoneinfo import ZoneInfo

from gateway.quota.limiter import Admission, Charge, LimitState, Reservation, period_bounds


class LocalLimiter:
    def __init__(self, time_zone: str) -> None:
        self._zone = ZoneInfo(time_zone)
        # counter → (time ms, amount, reservation id)
        self._events: dict[tuple[str, str, str, str], deque[tuple[int, int, str]]] = {}

    def _counter(self, charge: Charge) -> deque[tuple[int, int, str]]:
        limit = charge.limit
        key = (limit.policy, limit.scope, limit.subject, limit.rule.label)
        return self._events.setdefault(key, deque())

    def _used(self, charge: Charge, now_ms: int) -> int:
        events = self._counter(charge)
        rule = charge.limit.rule
        if rule.window is None:
            since = 0
        elif rule.calendar:
            since = period_bounds(rule.window, now_ms, self._zone)[0]
        else:
            since = now_ms - rule.window_ms
        while events and events[0][0] < since and rule.window is not None:
            events.popleft()
        return sum(amount for _, amount, _ in events)

    def reserve(self, charges: Sequence[Charge]) -> Admission:
        now_ms = int(time.time() * 1000)
        reservation_id = uuid.uuid4().hex
        states = []
        rejected: LimitState | None = None
        for charge in charges:
            used = self._used(charge, now_ms)
            state = LimitState(charge.limit, used, 0)
            states.append(state)
            if (
                charge.limit.enforced
                and used + charge.amount > charge.limit.rule.capacity
                and rejected is None
            ):
                rejected = state
        if rejected is not None:
            index = states.index(rejected)
            return Admission(
                admitted=False,
                reservation=Reservation(reservation_id, (), (), now_ms),
                states=tuple(states),
                rejected_by=rejected,
                retry_after_ms=1000,
                requested=charges[index].amount,
                degraded=True,
            )
        charged = []
        for charge, state in zip(charges, states, strict=True):
            self._counter(charge).append((now_ms, charge.amount, reservation_id))
            charged.append(LimitState(charge.limit, state.used + charge.amount, 0, charged=True))
        return Admission(
            admitted=True,
            reservation=Reservation(reservation_id, tuple(charges), tuple(charged), now_ms),
            states=tuple(charged),
            degraded=True,
        )

    def settle(self, reservation: Reservation, actual: Sequence[int]) -> None:
        for charge, amount in zip(reservation.charges, actual, strict=True):
            events = self._counter(charge)
            for index, (at_ms, _, owner) in enumerate(events):
                if owner == reservation.id:
                    if charge.limit.rule.kind == "concurrent" or amount <= 0:
                        del events[index]
                    else:
                        events[index] = (at_ms, amount, owner)
                    break
