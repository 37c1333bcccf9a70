"""Redis stopped and started under load: each policy's `fail:` decides, nothing crashes.

Every test runs its own throwaway redis-server (never the shared one) on a free port,
stops it with SIGTERM while clients keep sending requests, and starts a new one on the
same port. The restarted server is empty (no RDB, no AOF), as after a real crash.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import openai
import pytest

from gateway import state
from tests.conftest import (
    ADMIN_KEY,
    OTHER_KEY,
    USER_KEY,
    ConfigWriter,
    RunningGateway,
    StartGateway,
    free_port,
)
from tests.fakes.openai_upstream import FakeUpstream

HI = [{"role": "user", "content": "hi"}]
MAX_TOKENS = 5
# Requests fail fast while Redis is away; it is tried again after this long.
RETRY_SECONDS = 0.2
WORKERS = 4
LOCAL = "0s"  # x-ratelimit-reset-requests of an answer from the per-process limiter


class ThrowawayRedis:
    """A redis-server of this test's own, stopped and restarted on the same port."""

    def __init__(self, log_dir: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed: the Redis outage tests need their own server")
        self.binary = binary
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.log_dir = log_dir
        self.process: asyncio.subprocess.Process | None = None
        self.starts = 0

    async def start(self) -> None:
        assert self.process is None, "already running"
        self.starts += 1
        log = self.log_dir / f"redis-{self.starts}.log"
        with log.open("wb") as output:
            self.process = await asyncio.create_subprocess_exec(
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                stdout=output,
                stderr=asyncio.subprocess.STDOUT,
            )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.process.returncode is not None:
                break
            if await self._pong():
                return
            await asyncio.sleep(0.02)
        pytest.fail(f"redis-server on port {self.port} did not answer PING:\n{log.read_text()}")

    async def _pong(self) -> bool:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", self.port), 0.5)
        except (OSError, TimeoutError):
            return False
        try:
            writer.write(b"PING\r\n")
            await writer.drain()
            return await asyncio.wait_for(reader.readline(), 0.5) == b"+PONG\r\n"
        except (OSError, TimeoutError):
            return False
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def stop(self) -> None:
        process, self.process = self.process, None
        assert process is not None, "not running"
        process.terminate()
        try:
            await asyncio.wait_for(process.wait(), 5)
        except TimeoutError:
            process.kill()
            await process.wait()


@pytest.fixture
async def own_redis(tmp_path: Path, config_writer: ConfigWriter) -> AsyncIterator[ThrowawayRedis]:
    """A running throwaway Redis, with the gateway configured to use it."""
    server = ThrowawayRedis(tmp_path)
    await server.start()
    config_writer.redis_url = server.url
    config_writer.quota_extra = f"redis_retry_seconds: {RETRY_SECONDS}"
    yield server
    if server.process is not None:
        await server.stop()


@dataclass(frozen=True)
class Outcome:
    sent: float
    done: float
    status: int | str  # an HTTP status, or what went wrong instead of an answer
    headers: dict[str, str]
    body: Any

    @property
    def local(self) -> bool:
        """Decided by the per-process limiter (fail open), not by Redis."""
        return self.headers.get("x-ratelimit-reset-requests") == LOCAL


class Load:
    """A few clients sending chat requests back to back, recording every outcome."""

    def __init__(self, gateway: RunningGateway, key: str = USER_KEY, workers: int = WORKERS) -> None:
        self.clients = [gateway.client(key, timeout=20) for _ in range(workers)]
        self.outcomes: list[Outcome] = []
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._run(client)) for client in self.clients]

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    async def _run(self, client: openai.AsyncOpenAI) -> None:
        while not self._stop.is_set():
            self.outcomes.append(await send(client))
            await asyncio.sleep(0.01)

    async def wait_for(self, count: int, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while len(self.outcomes) < count:
            assert time.monotonic() < deadline, f"only {len(self.outcomes)} answers in {timeout} s"
            await asyncio.sleep(0.01)


async def send(client: openai.AsyncOpenAI) -> Outcome:
    sent = time.monotonic()
    status: int | str
    headers: dict[str, str] = {}
    body: Any = None
    try:
        raw = await client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=HI, max_tokens=MAX_TOKENS
        )
        status, headers = raw.status_code, dict(raw.headers)
    except openai.APIStatusError as exc:
        status, headers = exc.status_code, dict(exc.response.headers)
        try:
            body = exc.response.json()
        except ValueError:
            body = exc.response.text
    except openai.APIConnectionError as exc:
        status = f"connection error: {exc!r}"
    except Exception as exc:
        status = f"unexpected: {exc!r}"
    return Outcome(sent, time.monotonic(), status, headers, body)


@dataclass
class Outage:
    """When Redis went away and came back, and what the load saw in each phase."""

    outcomes: list[Outcome]
    stopping: float = 0.0  # SIGTERM sent
    down: float = 0.0  # the process has exited
    restarting: float = 0.0  # a new process is being started
    up: float = 0.0  # it answers PING
    ready_during_outage: tuple[int, Any] = (0, None)

    @property
    def before(self) -> list[Outcome]:
        """Answered before Redis was stopped."""
        return [o for o in self.outcomes if o.done < self.stopping]

    @property
    def during(self) -> list[Outcome]:
        """Sent after Redis had exited, answered before the new one was started."""
        return [o for o in self.outcomes if o.sent >= self.down and o.done < self.restarting]

    @property
    def after(self) -> list[Outcome]:
        """Sent once the new Redis answered PING."""
        return [o for o in self.outcomes if o.sent >= self.up]

    @property
    def straddling(self) -> list[Outcome]:
        """In flight while Redis was stopping or starting: any allowed answer will do."""
        phases = {id(o) for o in self.before + self.during + self.after}
        return [o for o in self.outcomes if id(o) not in phases]

    @property
    def recovery_seconds(self) -> float | None:
        """From PING answering again to the first answer decided by Redis."""
        decided = [o.done for o in self.after if o.status in (200, 429) and not o.local]
        return min(decided) - self.up if decided else None

    @staticmethod
    def tally(outcomes: list[Outcome]) -> str:
        counts: dict[str, int] = {}
        for outcome in outcomes:
            name = str(outcome.status) + (" local" if outcome.local else "")
            counts[name] = counts.get(name, 0) + 1
        slowest = max((o.done - o.sent for o in outcomes), default=0.0)
        return f"{dict(sorted(counts.items()))} (slowest {slowest * 1000:.0f} ms)"

    def report(self) -> str:
        recovery = self.recovery_seconds
        return (
            f"before: {self.tally(self.before)}; during: {self.tally(self.during)}; "
            f"after: {self.tally(self.after)}; straddling: {self.tally(self.straddling)}; "
            f"total {len(self.outcomes)}; outage {self.restarting - self.down:.2f} s; "
            f"recovery {'none' if recovery is None else f'{recovery * 1000:.0f} ms'}"
        )


async def ready(gateway: RunningGateway) -> tuple[int, Any]:
    async with httpx.AsyncClient(timeout=10) as http:
        # The components are shown to the admin key.
        response = await http.get(
            f"{gateway.url}/health/ready", headers={"Authorization": f"Bearer {ADMIN_KEY}"}
        )
    return response.status_code, response.json()


async def outage_under_load(
    gateway: RunningGateway,
    redis: ThrowawayRedis,
    load: Load,
    *,
    down_seconds: float = 1.0,
    after_seconds: float = 1.5,
) -> Outage:
    """Load with Redis up, Redis stopped for a while, Redis back; then the load stops."""
    outage = Outage(load.outcomes)
    load.start()
    try:
        await load.wait_for(WORKERS * 3)
        outage.stopping = time.monotonic()
        await redis.stop()
        outage.down = time.monotonic()
        await asyncio.sleep(down_seconds / 2)
        outage.ready_during_outage = await ready(gateway)
        await asyncio.sleep(max(0.0, outage.down + down_seconds - time.monotonic()))
        outage.restarting = time.monotonic()
        await redis.start()
        outage.up = time.monotonic()
        await asyncio.sleep(after_seconds)
    finally:
        await load.stop()
    print(f"\n{outage.report()}")
    # A Redis failure seen just before the restart makes the gateway skip Redis for
    # RETRY_SECONDS; after that every request must go to Redis again.
    await asyncio.sleep(RETRY_SECONDS + 0.1)
    return outage


def assert_never_crashed(outage: Outage, allowed: set[int]) -> None:
    statuses = {outcome.status for outcome in outage.outcomes}
    assert statuses <= allowed, outage.report()


async def assert_alive(gateway: RunningGateway) -> None:
    async with httpx.AsyncClient(timeout=10) as http:
        response = await http.get(f"{gateway.url}/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}
    status, body = await ready(gateway)
    assert status == 200, body
    assert body["components"]["redis"]["status"] == "healthy"


def metric(gateway: RunningGateway, name: str, *labels: str) -> float:
    counter = getattr(gateway.app[state.METRICS], name)
    if labels:
        counter = counter.labels(*labels)
    return float(counter._value.get())


def assert_quota_unavailable(outcome: Outcome, closed_policy: str) -> None:
    assert outcome.status == 503
    assert outcome.headers["retry-after"] == "1"
    error = outcome.body["error"]
    assert error["code"] == "quota_backend_unavailable"
    assert error["type"] == "server_error"
    assert f"policy '{closed_policy}' fails closed" in error["message"]


async def test_fail_closed_answers_503_while_redis_is_down_and_recovers(
    own_redis: ThrowawayRedis, start_gateway: StartGateway, pg: asyncpg.Connection
) -> None:
    gateway = await start_gateway(
        """
        policies:
          - name: guarded
            scope: user
            fail: closed
            limits:
              - {requests: 1000, per: minute}
          - name: probe
            scope: key
            match: {keys: [bob-key]}
            limits:
              - {requests: 3, per: minute}
        """
    )
    outage = await outage_under_load(gateway, own_redis, Load(gateway))

    # Never a 500, never a dropped connection: admitted, or 503 while Redis is away.
    assert_never_crashed(outage, {200, 503})
    assert outage.before and all(o.status == 200 for o in outage.before), outage.report()
    assert outage.during and all(o.status == 503 for o in outage.during), outage.report()
    for outcome in outage.during:
        assert_quota_unavailable(outcome, "guarded")
    status, body = outage.ready_during_outage
    assert status == 503
    assert body["status"] == "unhealthy"
    assert body["components"]["redis"]["status"] == "unhealthy"
    assert body["components"]["database"]["status"] == "healthy"
    assert metric(gateway, "quota_errors", "reserve") > 0
    assert metric(gateway, "quota_fail_open") == 0

    # Redis back: admitted again, counted by the new (empty) Redis from zero, each
    # admission once.
    assert outage.recovery_seconds is not None, outage.report()
    assert any(o.status == 200 for o in outage.after), outage.report()
    since_stop = [o for o in outage.outcomes if o.sent >= outage.down and o.status == 200]
    remaining = [int(o.headers["x-ratelimit-remaining-requests"]) for o in since_stop]
    assert max(remaining) == 999
    assert len(set(remaining)) == len(remaining)

    # Enforcement is back: a tight limit of another subject admits 3, then rejects.
    bob = gateway.client(OTHER_KEY)
    probe = [await send(bob) for _ in range(4)]
    assert [o.status for o in probe] == [200, 200, 200, 429]
    assert [o.headers["x-ratelimit-remaining-requests"] for o in probe[:3]] == ["2", "1", "0"]
    assert not any(o.local for o in probe)
    assert probe[3].body["error"]["code"] == "rate_limit_exceeded"
    assert "policy 'probe'" in probe[3].body["error"]["message"]
    alice = await send(gateway.client())
    assert alice.status == 200
    assert int(alice.headers["x-ratelimit-remaining-requests"]) < min(remaining)
    await assert_alive(gateway)


async def test_fail_open_admits_locally_while_redis_is_down(
    own_redis: ThrowawayRedis, start_gateway: StartGateway, pg: asyncpg.Connection
) -> None:
    gateway = await start_gateway(
        """
        policies:
          - name: open-door
            scope: user
            fail: open
            limits:
              - {requests: 5, per: minute}
        """
    )
    outage = await outage_under_load(gateway, own_redis, Load(gateway))

    # Never a 503 (nor a 500): admitted, or rejected by a limit.
    assert_never_crashed(outage, {200, 429})
    # Redis up: Redis admits 5 in the minute, then rejects.
    assert not any(o.local for o in outage.before)
    assert sorted(o.status for o in outage.before)[:6] == [200] * 5 + [429], outage.report()
    # Redis away: only this process's limiter decides, 5 in its own minute, then 429.
    assert outage.during and all(o.local for o in outage.during), outage.report()
    local_admitted = [o for o in outage.outcomes if o.status == 200 and o.local]
    local_rejected = [o for o in outage.outcomes if o.status == 429 and o.local]
    assert len(local_admitted) == 5, outage.report()
    assert sorted(o.headers["x-ratelimit-remaining-requests"] for o in local_admitted) == [
        "0",
        "1",
        "2",
        "3",
        "4",
    ]
    assert local_rejected, outage.report()
    for outcome in local_rejected:
        assert outcome.headers["retry-after"] == "1"
        assert outcome.body["error"]["code"] == "rate_limit_exceeded"
        assert "policy 'open-door'" in outcome.body["error"]["message"]
    # Admissions without Redis are counted as such; the local 429s as rejections.
    assert metric(gateway, "quota_fail_open") == 5
    rejected = [o for o in outage.outcomes if o.status == 429]
    assert metric(gateway, "quota_rejections", "requests_per_minute", "user") == len(rejected)
    assert metric(gateway, "quota_errors", "reserve") > 0

    # Redis back (empty): it counts from zero again, admits 5, then rejects.
    assert outage.recovery_seconds is not None, outage.report()
    redis_admitted = [o for o in outage.outcomes if o.status == 200 and not o.local]
    remaining = sorted(o.headers["x-ratelimit-remaining-requests"] for o in redis_admitted)
    assert remaining == ["0", "0", "1", "1", "2", "2", "3", "3", "4", "4"], outage.report()

    # Every later decision is Redis's: the fail-open counter stays where it is.
    client = gateway.client()
    more = [await send(client) for _ in range(3)]
    assert [o.status for o in more] == [429] * 3
    assert not any(o.local for o in more)
    assert all(o.headers["retry-after"] != "1" for o in more)
    assert metric(gateway, "quota_fail_open") == 5
    await assert_alive(gateway)


async def test_fail_closed_wins_when_both_kinds_of_policy_apply(
    own_redis: ThrowawayRedis, start_gateway: StartGateway, pg: asyncpg.Connection
) -> None:
    gateway = await start_gateway(
        """
        policies:
          - name: lenient
            scope: user
            fail: open
            limits:
              - {requests: 1000, per: minute}
          - name: strict
            scope: key
            fail: closed
            limits:
              - {requests: 1000, per: minute}
        """
    )
    outage = await outage_under_load(gateway, own_redis, Load(gateway), after_seconds=1.0)

    assert_never_crashed(outage, {200, 503})
    assert outage.before and all(o.status == 200 for o in outage.before), outage.report()
    assert outage.during and all(o.status == 503 for o in outage.during), outage.report()
    for outcome in outage.during:
        assert_quota_unavailable(outcome, "strict")
    assert not any(o.local for o in outage.outcomes)
    assert metric(gateway, "quota_fail_open") == 0
    assert outage.recovery_seconds is not None, outage.report()
    after = await send(gateway.client())
    assert after.status == 200
    assert not after.local
    await assert_alive(gateway)


async def test_settlement_during_an_outage_keeps_the_ledger_row(
    own_redis: ThrowawayRedis,
    start_gateway: StartGateway,
    fake_upstream: FakeUpstream,
    pg: asyncpg.Connection,
) -> None:
    gateway = await start_gateway(
        """
        policies:
          - name: guarded
            scope: user
            fail: closed
            limits:
              - {requests: 1000, per: minute}
        """
    )
    fake_upstream.delay_seconds = 0.5
    request = asyncio.create_task(send(gateway.client()))
    # Admitted (reserved in Redis) once the provider has it.
    deadline = time.monotonic() + 5
    while not fake_upstream.requests:
        assert time.monotonic() < deadline, "the request never reached the provider"
        await asyncio.sleep(0.01)
    await own_redis.stop()
    outcome = await request
    assert outcome.status == 200
    assert outcome.headers["x-ratelimit-remaining-requests"] == "999"
    await gateway.settle()

    rows = await pg.fetch(
        "SELECT request_id, status, user_id, prompt_tokens, completion_tokens FROM usage_events"
    )
    assert len(rows) == 1
    assert rows[0]["request_id"] == outcome.headers["x-request-id"]
    assert rows[0]["status"] == 200
    assert rows[0]["user_id"] == "alice"
    assert rows[0]["completion_tokens"] == MAX_TOKENS
    assert metric(gateway, "quota_errors", "settle") == 1
    assert metric(gateway, "quota_errors", "reserve") == 0

    await own_redis.start()
    after = await send(gateway.client())
    assert after.status == 200
    await gateway.settle()
    assert await pg.fetchval("SELECT count(*) FROM usage_events") == 2
    await assert_alive(gateway)
