"""Reserve on admission, settle with actual usage, release on failure: one Lua call each.

The limiter only talks to Redis; it never writes the ledger (see STYLE.md). On Redis
Cluster a request's limits may live in several slots: it reserves slot by slot and
rolls the earlier slots back when a later one rejects.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from importlib import resources
from typing import Any, NamedTuple, cast
from zoneinfo import ZoneInfo

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError

from gateway.quota.batching import ScriptBatcher
from gateway.quota.policy import AppliedLimit
from gateway.quota.resp import RespConnection, bulk, bulk_int


def _lua(name: str) -> str:
    return resources.files("gateway.quota").joinpath("lua", name).read_text(encoding="utf-8")


class QuotaStoreUnavailable(Exception):
    """Redis did not answer a quota call."""


class CountersNotSynced(Exception):
    """A subject's calendar counters must be rebuilt from the ledger before admission."""

    def __init__(self, limit: AppliedLimit) -> None:
        super().__init__(f"calendar counters of {limit.scope} {limit.subject} need a rebuild")
        self.limit = limit


# Charge and LimitState are named tuples rather than frozen dataclasses: each request
# makes one of each per limit, and a named tuple is several times cheaper to build.
class Charge(NamedTuple):
    """What one request takes from one limit."""

    limit: AppliedLimit
    amount: int


class LimitState(NamedTuple):
    """A limit as seen right after the admission decision."""

    limit: AppliedLimit
    used: int
    reset_ms: int
    charged: bool = False
    bucket: int = 0

    @property
    def capacity(self) -> int:
        return self.limit.rule.capacity

    @property
    def remaining(self) -> int:
        return max(0, self.capacity - self.used)


# Named tuples too, for the same reason: a frozen dataclass's __init__ sets each field
# through object.__setattr__, and these two are made for every admission.
class Reservation(NamedTuple):
    """What was charged at admission, so it can be settled later."""

    id: str
    charges: tuple[Charge, ...]
    states: tuple[LimitState, ...]
    reserved_at_ms: int
    # Per charge: what the scripts need to find its counter again (see _PackedLimit).
    packed: tuple[_PackedLimit, ...] = ()
    # Per charge, with one Redis: its amount in RESP, as the reserve call sent it.
    amounts: tuple[bytes, ...] = ()


class Admission(NamedTuple):
    admitted: bool
    reservation: Reservation
    states: tuple[LimitState, ...] = ()
    rejected_by: LimitState | None = None
    # -1: the request can never fit this limit, whatever the wait.
    retry_after_ms: int = 0
    requested: int = 0
    # Shadow limits that would have rejected this request.
    shadow_rejections: tuple[LimitState, ...] = ()
    # True when admitted without Redis (fail-open policies during an outage).
    degraded: bool = False


# Writing an int in RESP takes two string formats, some 4,000 instructions: the
# amounts most charges take (a request, a lane) are written once, here.
_SMALL_INTS = tuple(bulk_int(number) for number in range(128))
_ALWAYS = (-(2**63), 2**63)


_NO_TIME = bulk(b"")  # the scripts then read Redis's clock


def _int_resp(value: int) -> bytes:
    return _SMALL_INTS[value] if 0 <= value < 128 else bulk_int(value)


def _ints_resp(values: list[int]) -> list[bytes]:
    """Each value in RESP, one written once for a run of equal ones (limits of one kind in a row)."""
    written: list[bytes] = []
    last, last_resp = -1, b""
    for value in values:
        if value != last:
            last, last_resp = value, _int_resp(value)
        written.append(last_resp)
    return written


def _evalsha_head(sha: str, key_count: int, arg_count: int) -> bytes:
    """The start of an EVALSHA of `key_count` keys and `arg_count` arguments, up to its keys."""
    header = b"*%d\r\n" % (3 + key_count + arg_count)
    return header + bulk(b"EVALSHA") + bulk(sha.encode()) + bulk_int(key_count)


class _PackedLimit:
    """One limit's share of the script calls, in RESP, made once per limiter and calendar
    period (see QuotaLimiter._packed): per request only the amounts and ids are written."""

    __slots__ = (
        "bucket",
        "bucket_resp",
        "enforced",
        "owner",
        "reserve_args",
        "reserve_keys",
        "settle_args",
        "settle_keys",
        "spans",
        "valid_from_ms",
        "valid_until_ms",
    )

    def __init__(self, owner: QuotaLimiter, limit: AppliedLimit, spans: tuple[str, str, int, int]) -> None:
        self.owner = owner
        self.spans = spans
        # A calendar limit's spans hold for its period; the others' for ever.
        self.valid_from_ms, self.valid_until_ms = spans[2:] if spans[1] == "calendar" else _ALWAYS
        buckets, pending, synced = (bulk(key.encode()) for key in limit.script_keys(owner.key_prefix))
        kind_window = bulk(spans[0].encode()) + bulk(spans[1].encode())
        span_pair = bulk_int(spans[2]) + bulk_int(spans[3])
        self.reserve_keys = buckets + pending + synced
        self.settle_keys = buckets + pending
        self.reserve_args = kind_window + bulk_int(limit.rule.capacity) + span_pair
        self.settle_args = kind_window + span_pair
        self.enforced = bulk(b"1" if limit.enforced else b"0")
        # The bucket last charged and its RESP: a counter's bucket changes once a second
        # at most, so most settlements find it written already.
        self.bucket, self.bucket_resp = 0, _SMALL_INTS[0]

    def bucket_of(self, bucket: int) -> bytes:
        if bucket != self.bucket:
            self.bucket, self.bucket_resp = bucket, bulk_int(bucket)
        return self.bucket_resp


def period_bounds(rule_window: str, now_ms: int, zone: ZoneInfo) -> tuple[int, int]:
    """Start and end (ms) of the calendar day or month containing now, in `zone`."""
    local = datetime.fromtimestamp(now_ms / 1000, zone)
    start = local.replace(hour=0, minute=0, second=0, microsecond=0)
    if rule_window == "month":
        start = start.replace(day=1)
        end = (start + timedelta(days=32)).replace(day=1)
    else:
        end = start + timedelta(days=1)
    # Arithmetic on aware datetimes keeps wall time: re-resolve for DST changes.
    end = end.replace(tzinfo=zone)
    return int(start.timestamp() * 1000), int(end.timestamp() * 1000)


@dataclass(frozen=True)
class LimitReading:
    """A limit as it stands, read without changing it."""

    limit: AppliedLimit
    used: int
    reserved: int
    reset_ms: int
    # When a calendar window (day, month) last started; rolling windows have none.
    period_start_ms: int | None = None

    @property
    def remaining(self) -> int:
        return max(0, self.limit.rule.capacity - self.used)


@dataclass
class QuotaLimiter:
    """Runs reserve_quota.lua and settle_quota.lua against Redis (single node or cluster)."""

    redis: Redis | RedisCluster
    key_prefix: str
    # Tests pin the clock; production reads Redis's TIME so replicas share one clock.
    clock_ms: Callable[[], int] | None = None
    time_zone: str = "UTC"
    reservation_ttl_ms: int = 600_000
    _reserve: Any = field(init=False, repr=False)
    _settle: Any = field(init=False, repr=False)
    _sync: Any = field(init=False, repr=False)
    _read: Any = field(init=False, repr=False)
    _zone: ZoneInfo = field(init=False, repr=False)
    _periods: dict[str, tuple[int, int]] = field(init=False, repr=False, default_factory=dict)
    _calls: asyncio.Semaphore | None = field(init=False, repr=False, default=None)
    _batcher: ScriptBatcher | None = field(init=False, repr=False, default=None)
    # EVALSHA heads of reserve and settle calls, by the number of limits (see _evalsha_head).
    _heads: dict[tuple[str, int], bytes] = field(init=False, repr=False, default_factory=dict)
    _ttl_resp: bytes = field(init=False, repr=False, default=b"")
    # Called with (operation, seconds) after every script call, for the metrics.
    observe: Callable[[str, float], None] | None = None

    def __post_init__(self) -> None:
        self._reserve = self.redis.register_script(_lua("reserve_quota.lua"))
        self._settle = self.redis.register_script(_lua("settle_quota.lua"))
        self._sync = self.redis.register_script(_lua("sync_calendar.lua"))
        self._read = self.redis.register_script(_lua("read_quota.lua"))
        self._zone = ZoneInfo(self.time_zone)
        self._ttl_resp = bulk_int(self.reservation_ttl_ms)
        if isinstance(self.redis, RedisCluster):
            # redis-py's cluster client has no blocking pool: past max_connections on a
            # node it raises MaxConnectionsError at once, which would fail a burst closed.
            # Each script call holds one connection on one node, so queue them here instead.
            max_connections = int(self.redis.connection_kwargs.get("max_connections") or 64)
            self._calls = asyncio.Semaphore(max_connections)
        elif not _in_process(self.redis):
            # Every script call on one pipelined connection of our own, plain, TLS or Unix
            # socket; a client it cannot speak for stops start-up here (ValueError).
            pool = self.redis.connection_pool
            connection = RespConnection.for_pool(pool.connection_class, pool.connection_kwargs)
            self._batcher = ScriptBatcher(connection)

    async def _run(
        self,
        operation: str,
        script: Any,
        keys: list[str],
        args: list[str | int],
        defer: bool = False,
        command: bytes | None = None,
        meanwhile: Callable[[], object] | None = None,
        orphaned: Callable[[asyncio.Future[Any]], object] | None = None,
    ) -> Any:
        """One script call; raises QuotaStoreUnavailable if Redis fails.

        command: the call already packed (batched calls only), in place of keys and args.
        meanwhile, orphaned: see ScriptBatcher.call_packed (batched calls only; else not called).
        """
        started = time.monotonic()
        try:
            if self._batcher is not None:
                if command is None:
                    return await self._batcher.call(script, keys, args, defer=defer)
                return await self._batcher.call_packed(
                    script, command, defer=defer, meanwhile=meanwhile, orphaned=orphaned
                )
            async with self._calls or contextlib.nullcontext():
                return await script(keys=keys, args=args)
        except Exception as exc:
            if isinstance(exc, RedisConnectionError) and isinstance(self.redis, Redis):
                await _drop_idle_connections(self.redis)
            raise QuotaStoreUnavailable(str(exc)) from exc
        finally:
            if self.observe is not None:
                self.observe(operation, time.monotonic() - started)

    async def close(self) -> None:
        if self._batcher is not None:
            await self._batcher.close()

    @property
    def hands_over_cancelled(self) -> bool:
        """Whether `reserve` takes `on_cancelled`: a cancelled reservation's outcome is
        handed over, so the caller need not shield the call from its own cancellation."""
        return self._batcher is not None

    @property
    def clustered(self) -> bool:
        # Decided once: isinstance against redis-py's cluster class goes through
        # typing.Protocol's slow check (~10 µs), and admission asked twice per request.
        return self._calls is not None

    def _now_arg(self) -> str:
        return "" if self.clock_ms is None else str(self.clock_ms())

    def _now_resp(self) -> bytes:
        return _NO_TIME if self.clock_ms is None else bulk(b"%d" % self.clock_ms())

    def _head(self, script: str, limits: int) -> bytes:
        """The EVALSHA head of a reserve or settle call of `limits` limits, made once."""
        head = self._heads.get((script, limits))
        if head is None:
            # Per limit: reserve 3 keys and 7 arguments, settle 2 and 7; then 3 and 2 arguments more.
            sha, keys = (self._reserve.sha, 3) if script == "reserve" else (self._settle.sha, 2)
            head = self._heads[(script, limits)] = _evalsha_head(sha, keys * limits, keys + 7 * limits)
        return head

    def _now_ms(self) -> int:
        return self.clock_ms() if self.clock_ms is not None else int(time.time() * 1000)

    def _spans(self, limit: AppliedLimit, now_ms: int) -> tuple[str, str, int, int]:
        rule = limit.rule
        kind = "concurrent" if rule.kind == "concurrent" else "amount"
        if rule.window is None:
            return kind, "rolling", 1, 1
        if rule.calendar:
            start, end = self._period(rule.window, now_ms)
            return kind, "calendar", start, end
        return kind, "rolling", rule.window_ms, rule.bucket_ms

    def _period(self, window: str, now_ms: int) -> tuple[int, int]:
        """period_bounds, computed once per day or month rather than once per request."""
        known = self._periods.get(window)
        if known is None or not known[0] <= now_ms < known[1]:
            known = self._periods[window] = period_bounds(window, now_ms, self._zone)
        return known

    def _groups(self, count: int, charges: Sequence[Charge]) -> list[list[int]]:
        """Indexes of charges per Redis call: one call, or one per cluster slot."""
        if not self.clustered:
            return [list(range(count))]
        groups: dict[str, list[int]] = {}
        for index, charge in enumerate(charges):
            groups.setdefault(charge.limit.hash_tag, []).append(index)
        return list(groups.values())

    async def reserve(
        self,
        charges: Sequence[Charge],
        meanwhile: Callable[[], object] | None = None,
        on_cancelled: Callable[[Awaitable[Admission]], object] | None = None,
    ) -> Admission:
        """Admit against every charge or none; raises QuotaStoreUnavailable if Redis fails.

        meanwhile: work the caller can do while Redis decides, called once the reserve
        call is on its way, if it is (see ScriptBatcher.call_packed); never more than once.
        on_cancelled (only where `hands_over_cancelled`): called if this is cancelled while
        Redis has the call, with the admission Redis makes all the same, to be awaited
        (and released: see QuotaService.admit).
        """
        reservation_id = os.urandom(16).hex()
        if not charges:
            return Admission(admitted=True, reservation=Reservation(reservation_id, (), (), 0))
        now_ms = self._now_ms()
        packed = [self._packed(charge.limit, now_ms) for charge in charges]
        # With one Redis, the amounts in RESP too: the settlement sends them again.
        amounts = _ints_resp([charge.amount for charge in charges]) if self._batcher is not None else []
        states: list[LimitState | None] = [None] * len(charges)
        done: list[list[int]] = []
        reserved_at = now_ms
        groups = self._groups(len(charges), charges)
        for group in groups:
            if len(groups) == 1:  # all of them (see _groups)
                group_charges, group_packed = charges, packed
            else:
                group_charges, group_packed = [charges[i] for i in group], [packed[i] for i in group]
            reply = await self._call_reserve(
                reservation_id, group_charges, group_packed, amounts, meanwhile, on_cancelled
            )
            meanwhile = None
            admitted, reserved_at, rejecting, retry_after_ms, unsynced = reply[:5]
            if unsynced:
                await self._roll_back(reservation_id, charges, packed, states, done)
                raise CountersNotSynced(charges[group[unsynced - 1]].limit)
            # hiredis hands Lua's numbers over as ints already.
            if len(groups) == 1:
                states[:] = _states(charges, reply)
            else:
                for index, state in zip(group, _states(group_charges, reply), strict=True):
                    states[index] = state
            if not admitted:
                await self._roll_back(reservation_id, charges, packed, states, done)
                _report_rolled_back(states, charges, done)
                rejected_index = group[rejecting - 1]
                known = tuple(state for state in states if state is not None)
                return Admission(
                    admitted=False,
                    reservation=Reservation(reservation_id, (), (), reserved_at),
                    states=known,
                    rejected_by=states[rejected_index],
                    retry_after_ms=retry_after_ms,
                    requested=charges[rejected_index].amount,
                )
            done.append(group)
        final = cast(tuple[LimitState, ...], tuple(states))  # every group filled its states
        shadow = tuple(state for state in final if not state.limit.enforced and not state.charged)
        reservation = Reservation(
            reservation_id, tuple(charges), final, reserved_at, tuple(packed), tuple(amounts)
        )
        return Admission(admitted=True, reservation=reservation, states=final, shadow_rejections=shadow)

    def _call_reserve(
        self,
        reservation_id: str,
        charges: Sequence[Charge],
        packed: Sequence[_PackedLimit],
        amounts: Sequence[bytes],
        meanwhile: Callable[[], object] | None = None,
        on_cancelled: Callable[[Awaitable[Admission]], object] | None = None,
    ) -> Coroutine[Any, Any, list[Any]]:
        """amounts: with one Redis, each charge's amount in RESP."""
        # Not a coroutine itself: one frame fewer between the reply and the request.
        if self._batcher is not None:
            command = self._reserve_command(reservation_id, packed, amounts)
            orphaned = None
            if on_cancelled is not None:
                late = (reservation_id, charges, packed, amounts)
                orphaned = functools.partial(self._orphaned, on_cancelled, late)
            return self._run(
                "reserve", self._reserve, [], [], command=command, meanwhile=meanwhile, orphaned=orphaned
            )
        keys, args = self._reserve_call(reservation_id, charges, packed)
        return self._run("reserve", self._reserve, keys, args)

    def _orphaned(
        self,
        on_cancelled: Callable[[Awaitable[Admission]], object],
        call: tuple[str, Sequence[Charge], Sequence[_PackedLimit], Sequence[bytes]],
        reply: asyncio.Future[Any],
    ) -> None:
        """A cancelled reserve call's reply is owed still: its admission goes to on_cancelled."""
        on_cancelled(self._late_admission(reply, *call))

    async def _late_admission(
        self,
        reply: asyncio.Future[Any],
        reservation_id: str,
        charges: Sequence[Charge],
        packed: Sequence[_PackedLimit],
        amounts: Sequence[bytes],
    ) -> Admission:
        """What a reserve call with one Redis (one call for all limits) admitted, from its reply."""
        try:
            values = await reply
        except Exception as exc:
            raise QuotaStoreUnavailable(str(exc)) from exc
        admitted, reserved_at = values[:2]
        if not admitted:  # nor charged (an unsynced subject is not admitted either)
            return Admission(admitted=False, reservation=Reservation(reservation_id, (), (), reserved_at))
        states = tuple(_states(charges, values))
        reservation = Reservation(
            reservation_id, tuple(charges), states, reserved_at, tuple(packed), tuple(amounts)
        )
        return Admission(admitted=True, reservation=reservation, states=states)

    def _reserve_call(
        self, reservation_id: str, charges: Sequence[Charge], packed: Sequence[_PackedLimit]
    ) -> tuple[list[str], list[str | int]]:
        """KEYS and ARGV of reserve_quota.lua."""
        keys: list[str] = []
        args: list[str | int] = [self._now_arg(), reservation_id, self.reservation_ttl_ms]
        for charge, parts in zip(charges, packed, strict=True):
            kind, window, span_a, span_b = parts.spans
            keys.extend(charge.limit.script_keys(self.key_prefix))
            args += [kind, window, charge.limit.rule.capacity, span_a, span_b, charge.amount]
            args.append(1 if charge.limit.enforced else 0)
        return keys, args

    def _reserve_command(
        self, reservation_id: str, packed: Sequence[_PackedLimit], amounts: Sequence[bytes]
    ) -> bytes:
        """EVALSHA of `_reserve_call`, joined from each limit's parts packed ahead (`_packed`)."""
        pieces = [self._head("reserve", len(packed))]
        pieces += [parts.reserve_keys for parts in packed]
        pieces += (self._now_resp(), bulk(reservation_id.encode()), self._ttl_resp)
        for parts, amount in zip(packed, amounts, strict=True):
            pieces += (parts.reserve_args, amount, parts.enforced)
        return b"".join(pieces)

    def _packed(self, limit: AppliedLimit, now_ms: int) -> _PackedLimit:
        """A limit's keys and fixed arguments in RESP, made once per limiter and period."""
        made: _PackedLimit | None = limit.__dict__.get("_packed")
        if made is None or made.owner is not self or not made.valid_from_ms <= now_ms < made.valid_until_ms:
            made = _PackedLimit(self, limit, self._spans(limit, now_ms))
            # Frozen, so past __setattr__; not a field, so outside equality and hashing.
            limit.__dict__["_packed"] = made
        return made

    async def _roll_back(
        self,
        reservation_id: str,
        charges: Sequence[Charge],
        packed: Sequence[_PackedLimit],
        states: Sequence[LimitState | None],
        groups: list[list[int]],
    ) -> None:
        for group in groups:
            await self._call_settle(
                reservation_id,
                [(charges[i], packed[i].spans, states[i], 0) for i in group],
            )

    def settle(self, reservation: Reservation, actual: Sequence[int]) -> Awaitable[object]:
        """Replace each charge's reserved amount with `actual[i]` (same order as charges).

        Not a coroutine itself: with one Redis it hands back the script call's own, two
        frames fewer for every request's settlement to pass through.
        """
        if not reservation.charges:
            return _nothing()
        if self._batcher is not None:
            command = self._settle_command(reservation, actual)
            if command is None:
                return _nothing()
            return self._run("settle", self._settle, [], [], defer=True, command=command)
        entries = [
            (charge, parts.spans, state, amount)
            for charge, state, amount, parts in zip(
                reservation.charges, reservation.states, actual, reservation.packed, strict=True
            )
            if state.charged
        ]
        groups = self._groups(len(entries), [entry[0] for entry in entries])
        if len(groups) == 1:  # all of them (see _groups)
            return self._call_settle(reservation.id, entries)
        return self._settle_groups(reservation.id, entries, groups)

    def settle_queued(
        self,
        reservation: Reservation,
        actual: Sequence[int],
        settled: Callable[[asyncio.Future[Any], BaseException | None], object],
    ) -> asyncio.Future[Any] | None:
        """`settle` with one Redis (`hands_over_cancelled`), queued now and not awaited: the
        future of its reply, or None if nothing was charged. `settled` is called with it and
        the error it failed with (a NoScriptError if Redis lost the script), if any, once done.
        """
        assert self._batcher is not None, "settle_queued needs one Redis (hands_over_cancelled)"
        command = self._settle_command(reservation, actual)
        if command is None:
            return None
        reply = self._batcher.queue(command, defer=True)
        reply.add_done_callback(functools.partial(self._settled, time.monotonic(), settled))
        return reply

    def _settled(
        self,
        started: float,
        settled: Callable[[asyncio.Future[Any], BaseException | None], object],
        reply: asyncio.Future[Any],
    ) -> None:
        if self.observe is not None:
            self.observe("settle", time.monotonic() - started)
        settled(reply, None if reply.cancelled() else reply.exception())

    async def _settle_groups(
        self,
        reservation_id: str,
        entries: Sequence[tuple[Charge, tuple[str, str, int, int], LimitState | None, int]],
        groups: list[list[int]],
    ) -> None:
        for group in groups:
            await self._call_settle(reservation_id, [entries[i] for i in group])

    def _call_settle(
        self,
        reservation_id: str,
        entries: Sequence[tuple[Charge, tuple[str, str, int, int], LimitState | None, int]],
    ) -> Awaitable[object]:
        keys, args = self._settle_call(reservation_id, entries)
        if not keys:
            return _nothing()
        return self._run("settle", self._settle, keys, args, defer=True)

    def _settle_command(self, reservation: Reservation, actual: Sequence[int]) -> bytes | None:
        """EVALSHA of `_settle_call` for a reservation made with one Redis, joined from the
        parts of its reserve call; None if nothing was charged."""
        keys: list[bytes] = []
        args = [self._now_resp(), bulk(reservation.id.encode())]
        last_used, last_used_resp = -1, b""
        for charge, parts, state, reserved, used in zip(
            reservation.charges,
            reservation.packed,
            reservation.states,
            reservation.amounts,
            actual,
            strict=True,
        ):
            if not state.charged:
                continue
            keys.append(parts.settle_keys)
            bucket = parts.bucket_resp if state.bucket == parts.bucket else parts.bucket_of(state.bucket)
            if used == charge.amount:
                used_resp = reserved
            else:
                if used != last_used:  # limits of one kind in a row are settled with one figure
                    last_used, last_used_resp = used, _int_resp(used)
                used_resp = last_used_resp
            args += (parts.settle_args, bucket, reserved, used_resp)
        if not keys:
            return None
        return b"".join([self._head("settle", len(keys)), *keys, *args])

    def _settle_call(
        self,
        reservation_id: str,
        entries: Sequence[tuple[Charge, tuple[str, str, int, int], LimitState | None, int]],
    ) -> tuple[list[str], list[str | int]]:
        """KEYS and ARGV of settle_quota.lua, for the charged entries."""
        keys: list[str] = []
        args: list[str | int] = [self._now_arg(), reservation_id]
        for charge, (kind, window, span_a, span_b), state, actual in entries:
            if state is None or not state.charged:
                continue
            keys.extend(charge.limit.script_keys(self.key_prefix)[:2])
            args += [kind, window, span_a, span_b, state.bucket, charge.amount, actual]
        return keys, args

    async def sync_calendar(self, limits: Sequence[AppliedLimit], recorded: Sequence[int]) -> bool:
        """Write a subject's calendar counters as the ledger recorded them, unless done already."""
        assert limits, "nothing to sync"
        now_ms = self._now_ms()
        keys = [limits[0].sync_marker(self.key_prefix)]
        args: list[str | int] = []
        keep_ms = 1000
        for limit, amount in zip(limits, recorded, strict=True):
            assert limit.rule.window is not None and limit.rule.calendar
            start, end = period_bounds(limit.rule.window, now_ms, self._zone)
            keys.append(limit.redis_keys(self.key_prefix)[0])
            args += [start, amount]
            keep_ms = max(keep_ms, end - now_ms + 1000)
        args.append(keep_ms)
        return bool(await self._run("sync", self._sync, keys, args))

    def period_start(self, window: str) -> int:
        return period_bounds(window, self._now_ms(), self._zone)[0]

    async def read(self, limits: Sequence[AppliedLimit]) -> list[LimitReading]:
        """Used, reserved and reset of each limit, as the scripts see them now."""
        now_ms = self._now_ms()
        readings: list[LimitReading] = []
        charges = [Charge(limit, 0) for limit in limits]
        for group in self._groups(len(limits), charges):
            keys: list[str] = []
            args: list[str | int] = [self._now_arg()]
            for index in group:
                kind, window, span_a, span_b = self._spans(limits[index], now_ms)
                keys.extend(limits[index].redis_keys(self.key_prefix))
                args += [kind, window, span_a, span_b]
            reply = await self._run("read", self._read, keys, args)
            for position, index in enumerate(group):
                used, reserved, reset_ms = (int(v) for v in reply[1 + 3 * position : 4 + 3 * position])
                rule = limits[index].rule
                started = (
                    period_bounds(rule.window, now_ms, self._zone)[0]
                    if rule.calendar and rule.window
                    else None
                )
                readings.append(LimitReading(limits[index], used, reserved, reset_ms, started))
        order = {id(limit): position for position, limit in enumerate(limits)}
        return sorted(readings, key=lambda reading: order[id(reading.limit)])

    async def reset(self, limits: Sequence[AppliedLimit]) -> int:
        """Forget all usage and reservations of these limits; returns keys deleted."""
        deleted = 0
        for limit in limits:
            try:
                for key in limit.redis_keys(self.key_prefix):
                    deleted += int(await self.redis.delete(key))
                # Reset means zero: do not rebuild these counters from the ledger.
                await self.redis.set(limit.sync_marker(self.key_prefix), "1")
            except Exception as exc:
                raise QuotaStoreUnavailable(str(exc)) from exc
        return deleted


def _states(charges: Sequence[Charge], reply: list[Any]) -> list[LimitState]:
    """The state of each charge's limit, from a reserve call's reply for all of them.

    Made by tuple.__new__, as LimitState._make does, without the Python-level __new__ a
    named tuple is called through (3,000 instructions for each of five limits per request).
    """
    return [
        _new_tuple(LimitState, (charge.limit, used, reset_ms, charged == 1, bucket))
        for charge, used, reset_ms, charged, bucket in zip(
            charges, reply[5::4], reply[6::4], reply[7::4], reply[8::4], strict=True
        )
    ]


_new_tuple = tuple.__new__


def _in_process(redis: Redis) -> bool:
    """The embedded store (fakeredis, see store.py): no socket, so each call goes through redis-py."""
    # Its scripts run in this process: there is no trip to share, and no connection to
    # speak RESP on. Told by module, so that a real Redis does not import fakeredis.
    return type(redis).__module__.partition(".")[0] == "fakeredis"


async def _nothing() -> None:
    """An awaitable that does nothing: a settlement with nothing charged."""


async def _drop_idle_connections(redis: Redis) -> None:
    # redis-py's pool does not always notice that a restarted Redis closed its idle
    # connections; each would then fail one request long after Redis is back.
    # One failure drops them all, so the next calls connect afresh.
    with contextlib.suppress(Exception):
        await redis.connection_pool.disconnect(inuse_connections=False)


def _report_rolled_back(
    states: list[LimitState | None], charges: Sequence[Charge], groups: list[list[int]]
) -> None:
    """Report rolled-back limits as uncharged, with their usage before this request.

    That is what a single node reports for limits of a rejected request (the 429's
    x-ratelimit-* headers come from it); reset_ms is left as the charge saw it.
    """
    for group in groups:
        for index in group:
            state = states[index]
            if state is not None and state.charged:
                used = state.used - charges[index].amount
                states[index] = state._replace(
                    used=used, charged=False, reset_ms=state.reset_ms if used else 0
                )
