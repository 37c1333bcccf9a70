"""Admission as the request path sees it: what each limit is charged, what happens when
Redis is away, and rebuilding calendar counters from the ledger.

The quota code reads the ledger (through `UsageSource`) but never writes it.
"""

from __future__ import annotations

import asyncio
import fnmatch
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from datetime import UTC, datetime
from typing import Any, NamedTuple, Protocol

from redis.exceptions import NoScriptError

from gateway.auth import Principal
from gateway.config import ModelConfig, QuotaConfig
from gateway.errors import GatewayError, InvalidRequest, ServiceUnavailable
from gateway.ledger.records import ModelUsage
from gateway.metrics import Metrics
from gateway.policies import PolicyHolder
from gateway.providers.base import Usage
from gateway.quota.headers import rejection_error
from gateway.quota.limiter import (
    Admission,
    Charge,
    CountersNotSynced,
    LimitState,
    QuotaLimiter,
    QuotaStoreUnavailable,
    Reservation,
)
from gateway.quota.local import LocalLimiter
from gateway.quota.policy import MICRO_USD, AppliedLimit, Policy, RequestPolicy

log = logging.getLogger("gateway.quota")
_new_tuple = tuple.__new__

SYNC_ATTEMPTS = 3


class UsageSource(Protocol):
    async def usage_by_model(self, scope: str, subject: str, since: datetime) -> list[ModelUsage]: ...


class ModelNotAllowed(GatewayError):
    """A policy denies this model to the caller (403)."""

    status = 403
    error_type = "invalid_request_error"
    code = "model_not_allowed"


# Amounts and Ticket are named tuples, as Charge is (see limiter.py): made for every request.
class Amounts(NamedTuple):
    """One request's figures in every unit a limit can count."""

    prompt_tokens: int
    completion_tokens: int
    cost_micro_usd: int

    def of(self, kind: str) -> int:
        return self.by_kind()[kind]

    def by_kind(self) -> dict[str, int]:
        """The figure of each kind of limit (policy.LIMIT_KINDS)."""
        return {
            "requests": 1,
            "concurrent": 1,
            "tokens": self.prompt_tokens + self.completion_tokens,
            "input_tokens": self.prompt_tokens,
            "output_tokens": self.completion_tokens,
            "cost_usd": self.cost_micro_usd,
        }


def amounts_for(
    model: ModelConfig, prompt_tokens: int, completion_tokens: int, cached: int = 0, cache_write: int = 0
) -> Amounts:
    cost = (
        model.price.cost_micro_usd(prompt_tokens, completion_tokens, cached, cache_write)
        if model.price
        else 0
    )
    return Amounts(prompt_tokens, completion_tokens, cost)


class Ticket(NamedTuple):
    """An admitted request's reservation, in Redis or (degraded) in this process."""

    admission: Admission
    reserved: Amounts
    local: bool = False


class QuotaService:
    def __init__(
        self,
        limiter: QuotaLimiter,
        policies: PolicyHolder,
        metrics: Metrics,
        config: QuotaConfig,
        usage: UsageSource,
    ) -> None:
        self.limiter = limiter
        self._policies = policies
        self._metrics = metrics
        self._config = config
        self._usage = usage
        self._local = LocalLimiter(config.time_zone)
        self._redis_down_until = 0.0
        # Releases of cancelled admissions' reservations, and settlements under way: what
        # drain waits for. A queued settle call maps to what a retry needs (see settle_soon).
        self._releases: set[asyncio.Task[None]] = set()
        self._settling: dict[asyncio.Future[Any], tuple[Reservation, list[int]] | None] = {}

    def request_policy(self, principal: Principal, model: ModelConfig) -> RequestPolicy:
        if principal.models is not None and model.name not in principal.models:
            raise ModelNotAllowed(f"This key may not use model `{model.name}`.", param="model")
        decision = self._policies.current.for_request(principal, model.name)
        if decision.denied_by is not None:
            raise ModelNotAllowed(
                f"Policy '{decision.denied_by}' does not allow model `{model.name}` for this key.",
                param="model",
            )
        return decision

    @staticmethod
    def completion_budget(decision: RequestPolicy, requested: int | None, default: int) -> int:
        """Completion tokens to reserve (and to forward as the cap), after the policies' say."""
        if requested is None and decision.requires_max_tokens is not None:
            raise InvalidRequest(
                f"Policy '{decision.requires_max_tokens}' requires max_tokens (or max_completion_tokens).",
                param="max_tokens",
                code="max_tokens_required",
            )
        budget = requested if requested is not None else default
        if decision.max_tokens_cap is not None:
            budget = min(budget, decision.max_tokens_cap)
        return budget

    async def admit(
        self, decision: RequestPolicy, reserved: Amounts, meanwhile: Callable[[], object] | None = None
    ) -> Ticket:
        """Reserve for every limit or raise the 429 (or 503) that says why not.

        meanwhile: work that does not depend on the decision, done while Redis makes it
        if the call goes to Redis (see QuotaLimiter.reserve); it may not be called at all.
        """
        amounts = reserved.by_kind()
        # Made by tuple.__new__ as Charge._make does (see limiter._states): five per request.
        charges = [_new_tuple(Charge, (limit, amounts[limit.rule.kind])) for limit in decision.limits]
        if not charges:
            return Ticket(Admission(True, Reservation("", (), (), 0)), reserved)
        # A disconnect cancels the handler, not the script in Redis: what a cancelled
        # admission is granted is released. The usual limiter hands that admission over
        # (no task per admission); with the others the call runs shielded in a task.
        try:
            if time.monotonic() < self._redis_down_until:
                raise QuotaStoreUnavailable("Redis failed recently; not retried yet")
            if not self.limiter.hands_over_cancelled:
                admission = await self._shielded(self._reserve(charges, meanwhile))
            else:
                # One reserve call, awaited here (one frame fewer on its way back): if
                # cancelled, the limiter hands its admission to `_release_later`.
                try:
                    admission = await self.limiter.reserve(charges, meanwhile, self._release_later)
                except CountersNotSynced as missing:
                    # Counters to rebuild first (rare): rebuilt in a shielded task.
                    admission = await self._shielded(self._reserve(charges, None, missing, SYNC_ATTEMPTS - 1))
                except QuotaStoreUnavailable:
                    self._reserve_failed()
                    raise
        except QuotaStoreUnavailable as exc:
            return self._admit_without_redis(charges, reserved, exc)
        for state in admission.shadow_rejections:
            self._metrics.quota_shadow_rejections.labels(state.limit.rule.label, state.limit.scope).inc()
            log.info(
                "shadow policy %s would have rejected: %s of %s %s",
                state.limit.policy,
                state.limit.rule.describe(),
                state.limit.scope,
                state.limit.subject,
            )
        if not admission.admitted:
            assert admission.rejected_by is not None
            limit = admission.rejected_by.limit
            self._metrics.quota_rejections.labels(limit.rule.label, limit.scope).inc()
            raise rejection_error(admission)
        self._metrics.quota_admissions.inc()
        return Ticket(admission, reserved)

    async def _shielded(self, reserving: Coroutine[Any, Any, Admission]) -> Admission:
        """`reserving` run in a task its caller's cancellation does not reach; if cancelled,
        what it is granted is released."""
        task = asyncio.create_task(reserving)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            self._release_later(task)
            raise

    def _release_later(self, admission: Awaitable[Admission]) -> None:
        """Release what a cancelled admission is granted, once it is (drain waits)."""
        release = asyncio.get_running_loop().create_task(self._release_when_reserved(admission))
        self._releases.add(release)
        release.add_done_callback(self._releases.discard)

    async def _release_when_reserved(self, reserving: Awaitable[Admission]) -> None:
        """Release what a cancelled admission is granted, once it is granted."""
        try:
            admission = await reserving
        except QuotaStoreUnavailable:
            return  # nothing reserved (Redis failed: what every call on its way sees and counts)
        except Exception:
            log.exception("a cancelled admission failed")
            return
        reservation = admission.reservation
        if not admission.admitted or not reservation.charges:
            return
        try:
            await self.limiter.settle(reservation, [0] * len(reservation.charges))
        except Exception as exc:
            # The reservation stays until it expires; then it is refunded.
            self._metrics.quota_errors.labels("settle").inc()
            log.warning("releasing reservation %s of a cancelled admission failed: %s", reservation.id, exc)

    async def drain(self) -> None:
        """Wait until every settlement started so far is made, and the reservation of every
        admission cancelled so far released."""
        while self._releases or self._settling:
            await asyncio.gather(*self._releases, *self._settling, return_exceptions=True)

    @property
    def settling(self) -> int:
        """Settlements and releases under way."""
        return len(self._releases) + len(self._settling)

    async def _reserve(
        self,
        charges: list[Charge],
        meanwhile: Callable[[], object] | None,
        missing: CountersNotSynced | None = None,
        attempts: int = SYNC_ATTEMPTS,
    ) -> Admission:
        """Reserve, rebuilding calendar counters first where `missing` or Redis says so
        (admit has checked that Redis has not failed recently)."""
        for _ in range(attempts):
            if missing is not None:
                meanwhile = None  # done, if it was to be
                await self.rebuild_calendar_counters(missing.limit.scope, missing.limit.subject)
            try:
                return await self.limiter.reserve(charges, meanwhile)
            except CountersNotSynced as again:
                missing = again
            except QuotaStoreUnavailable:
                self._reserve_failed()
                raise
        raise QuotaStoreUnavailable("calendar counters could not be rebuilt")

    def _reserve_failed(self) -> None:
        self._metrics.quota_errors.labels("reserve").inc()
        self._redis_down_until = time.monotonic() + self._config.redis_retry_seconds

    def _admit_without_redis(self, charges: list[Charge], reserved: Amounts, error: Exception) -> Ticket:
        if not all(charge.limit.fail_open for charge in charges):
            closed = next(charge.limit.policy for charge in charges if not charge.limit.fail_open)
            raise ServiceUnavailable(
                f"The quota backend is unreachable and policy '{closed}' fails closed; "
                "the request was not admitted.",
                code="quota_backend_unavailable",
                headers={"retry-after": "1"},
            ) from error
        admission = self._local.reserve(charges)
        if not admission.admitted:
            assert admission.rejected_by is not None
            limit = admission.rejected_by.limit
            self._metrics.quota_rejections.labels(limit.rule.label, limit.scope).inc()
            raise rejection_error(admission)
        # Only what the local limiter admitted: its 429s are rejections, not admissions.
        self._metrics.quota_fail_open.inc()
        return Ticket(admission, reserved, local=True)

    def settle_soon(self, ticket: Ticket, actual: Amounts) -> None:
        """`settle`, started now and finished without the caller (`drain` waits for it).

        With one Redis the settle call is queued with a callback for its reply: no task,
        and no coroutine to resume, per request. Otherwise `settle` runs in a task.
        """
        reservation = ticket.admission.reservation
        if not reservation.charges:
            return
        if ticket.local or not self.limiter.hands_over_cancelled:
            self._track(self.settle(ticket, actual))
            return
        figures = self._settled_figures(ticket, actual)
        reply = self.limiter.settle_queued(reservation, figures, self._settled)
        if reply is not None:
            self._settling[reply] = (reservation, figures)

    def _settled(self, reply: asyncio.Future[Any], error: BaseException | None) -> None:
        queued = self._settling.pop(reply, None)
        if error is None or queued is None:
            return
        reservation, figures = queued
        if isinstance(error, NoScriptError):
            # Redis restarted or its scripts were flushed: settle again the awaited way,
            # which loads the script first.
            self._track(self._settle_reservation(reservation, figures))
            return
        self._settle_failed(reservation)

    def _track(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._settling[task] = None
        task.add_done_callback(self._untrack)

    def _untrack(self, task: asyncio.Future[Any]) -> None:
        self._settling.pop(task, None)

    async def _settle_reservation(self, reservation: Reservation, figures: list[int]) -> None:
        try:
            await self.limiter.settle(reservation, figures)
        except QuotaStoreUnavailable:
            self._settle_failed(reservation)

    def _settle_failed(self, reservation: Reservation) -> None:
        # The reservation stays until it expires; then it is refunded.
        self._metrics.quota_errors.labels("settle").inc()
        log.warning("quota settlement failed for reservation %s", reservation.id)

    def _settled_figures(self, ticket: Ticket, actual: Amounts) -> list[int]:
        """Each charge's used figure, in the reservation's order; counts a completion
        that ran past its reservation."""
        amounts = actual.by_kind()
        overshoot = actual.completion_tokens - ticket.reserved.completion_tokens
        if overshoot > 0:
            self._metrics.quota_overshoot_tokens.inc(overshoot)
        return [amounts[charge.limit.rule.kind] for charge in ticket.admission.reservation.charges]

    async def settle(self, ticket: Ticket, actual: Amounts) -> None:
        """Replace the reservation with what was used (zeros: release it)."""
        reservation = ticket.admission.reservation
        if not reservation.charges:
            return
        figures = self._settled_figures(ticket, actual)
        if ticket.local:
            self._local.settle(reservation, figures)
            return
        await self._settle_reservation(reservation, figures)

    async def rebuild_calendar_counters(self, scope: str, subject: str) -> None:
        """Counters of day and month limits as the ledger recorded them this period."""
        limits = [
            limit
            for limit in self._policies.current.limits_of_subject(scope, subject)
            if limit.rule.calendar and limit.rule.kind != "concurrent"
        ]
        recorded: list[int] = []
        by_period: dict[int, list[ModelUsage]] = {}
        for limit in limits:
            assert limit.rule.window is not None
            start = self.limiter.period_start(limit.rule.window)
            if start not in by_period:
                since = datetime.fromtimestamp(start / 1000, UTC)
                by_period[start] = await self._usage.usage_by_model(scope, subject, since)
            recorded.append(_recorded(limit, self._policy(limit.policy), by_period[start]))
        if not limits:
            # No calendar limits any more: mark synced so admission stops asking.
            return
        rebuilt = await self.limiter.sync_calendar(limits, recorded)
        if rebuilt:
            self._metrics.quota_rebuilds.inc()
            log.info("rebuilt calendar counters of %s %s from the ledger: %s", scope, subject, recorded)

    def _policy(self, name: str) -> Policy | None:
        return next((policy for policy in self._policies.current.policies if policy.name == name), None)

    def states_of_subject(self, scope: str, subject: str) -> list[AppliedLimit]:
        return self._policies.current.limits_of_subject(scope, subject)


def _recorded(limit: AppliedLimit, policy: Policy | None, usage: Sequence[ModelUsage]) -> int:
    patterns = policy.models if policy is not None else None
    total = 0
    for row in usage:
        if patterns is not None and not any(fnmatch.fnmatchcase(row.model, p) for p in patterns):
            continue
        kind = limit.rule.kind
        if kind == "requests":
            total += row.requests
        elif kind == "tokens":
            total += row.prompt_tokens + row.completion_tokens
        elif kind == "input_tokens":
            total += row.prompt_tokens
        elif kind == "output_tokens":
            total += row.completion_tokens
        elif kind == "cost_usd":
            total += round(row.cost_usd * MICRO_USD)
    return total


def actual_amounts(model: ModelConfig, usage: Usage | None) -> Amounts:
    if usage is None:
        return Amounts(0, 0, 0)
    return amounts_for(
        model,
        usage.prompt_tokens,
        usage.completion_tokens,
        usage.cached_prompt_tokens,
        usage.cache_write_prompt_tokens,
    )


__all__ = [
    "Amounts",
    "LimitState",
    "ModelNotAllowed",
    "QuotaService",
    "Ticket",
    "UsageSource",
    "actual_amounts",
]
