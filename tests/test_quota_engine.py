"""The quota engine through the gateway: every limit kind, policy effects, quota APIs."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import aiohttp
import asyncpg
import openai
import pytest

from gateway import state
from gateway.auth import Principal
from gateway.quota.limiter import period_bounds
from gateway.quota.service import Amounts
from tests.conftest import ADMIN_KEY, OTHER_KEY, T0_MS, USER_KEY, ConfigWriter, RunningGateway, StartGateway
from tests.fakes.openai_upstream import FakeUpstream

HI = [{"role": "user", "content": "hi"}]  # 8 prompt tokens


def pinned() -> int:
    return T0_MS


async def complete(
    gateway: RunningGateway, max_tokens: int = 10, key: str = USER_KEY, model: str = "gpt-4o-mini"
):  # type: ignore[no-untyped-def]
    return await gateway.client(key=key).chat.completions.with_raw_response.create(
        model=model, messages=HI, max_tokens=max_tokens
    )


async def rejected(
    gateway: RunningGateway, max_tokens: int = 10, key: str = USER_KEY
) -> openai.RateLimitError:
    with pytest.raises(openai.RateLimitError) as caught:
        await complete(gateway, max_tokens, key)
    return caught.value


async def test_input_and_output_token_limits(
    start_gateway: StartGateway, fake_upstream: FakeUpstream, pg: asyncpg.Connection
) -> None:
    fake_upstream.bill_max_tokens = True
    gateway = await start_gateway(
        """
        policies:
          - name: io
            scope: user
            limits:
              - {input_tokens: 20, per: minute}
              - {output_tokens: 25, per: minute}
        """,
        clock_ms=pinned,
    )
    await complete(gateway, max_tokens=10)  # input 8, output 10
    await gateway.settle()
    await complete(gateway, max_tokens=10)  # input 16, output 20
    await gateway.settle()
    error = await rejected(gateway, max_tokens=1)  # input would be 24 > 20
    assert error.response.headers["x-ratelimit-limit-name"] == "input_tokens_per_minute"
    readings = await gateway.app[state.QUOTA].limiter.read(
        gateway.app[state.POLICIES].current.limits_of_subject("user", "alice")
    )
    assert [(r.limit.rule.label, r.used) for r in readings] == [
        ("input_tokens_per_minute", 16),
        ("output_tokens_per_minute", 20),
    ]


async def test_cost_limit_from_the_price_table(
    start_gateway: StartGateway, fake_upstream: FakeUpstream, pg: asyncpg.Connection
) -> None:
    # gpt-4o-mini: $0.15 / M input, $0.60 / M output. 8 in + 1000 out reserved = $0.0006012.
    fake_upstream.bill_max_tokens = True
    gateway = await start_gateway(
        """
        policies:
          - name: budget
            scope: team
            limits: [{cost_usd: 0.0015, per: day}]
        """,
        clock_ms=pinned,
    )
    await complete(gateway, max_tokens=1000)
    await gateway.settle()
    await complete(gateway, max_tokens=1000)
    await gateway.settle()
    error = await rejected(gateway, max_tokens=1000)
    body = error.response.json()["error"]
    assert body["code"] == "rate_limit_exceeded" and "cost_usd_per_day" in body["message"]
    assert error.response.headers["x-should-retry"] == "false"
    costs = await pg.fetch("SELECT cost_usd FROM usage_events ORDER BY created_at")
    assert [row["cost_usd"] for row in costs] == pytest.approx([0.0006012, 0.0006012])


async def test_concurrent_requests_in_flight(
    start_gateway: StartGateway, fake_upstream: FakeUpstream, pg: asyncpg.Connection
) -> None:
    fake_upstream.delay_seconds = 0.3
    gateway = await start_gateway(
        "policies:\n  - {name: lanes, scope: key, limits: [{concurrent: 3}]}\n",
        clock_ms=pinned,
    )

    async def one() -> bool:
        try:
            await complete(gateway)
        except openai.RateLimitError:
            return False
        return True

    outcomes = await asyncio.gather(*(one() for _ in range(10)))
    assert outcomes.count(True) == 3
    await gateway.settle()
    # Finished requests leave their lane: three more fit now.
    outcomes = await asyncio.gather(*(one() for _ in range(3)))
    assert outcomes == [True, True, True]


async def test_calendar_day_resets_at_midnight_in_the_configured_zone(
    start_gateway: StartGateway,
    config_writer: ConfigWriter,
    fake_upstream: FakeUpstream,
    pg: asyncpg.Connection,
) -> None:
    config_writer.quota_extra = "time_zone: Asia/Tokyo"
    zone = ZoneInfo("Asia/Tokyo")
    # 23:59:30 in Tokyo.
    late = int(datetime(2027, 3, 1, 23, 59, 30, tzinfo=zone).timestamp() * 1000)
    clock = {"now": late}
    gateway = await start_gateway(
        "policies:\n  - {name: daily, scope: user, limits: [{requests: 2, per: day}]}\n",
        clock_ms=lambda: clock["now"],
    )
    await complete(gateway)
    await complete(gateway)
    error = await rejected(gateway)
    # The day ends in 30 s; that is when the limit is whole again.
    assert error.response.headers["retry-after-ms"] == "30000"
    assert error.response.headers["x-ratelimit-reset-requests"] == "30s"
    clock["now"] = late + 30_000
    raw = await complete(gateway)
    assert raw.headers["x-ratelimit-remaining-requests"] == "1"
    assert period_bounds("day", late, zone) == (
        int(datetime(2027, 3, 1, tzinfo=zone).timestamp() * 1000),
        int(datetime(2027, 3, 2, tzinfo=zone).timestamp() * 1000),
    )


def test_month_periods_follow_the_calendar() -> None:
    utc = ZoneInfo("UTC")
    moment = int(datetime(2028, 2, 15, 12, tzinfo=UTC).timestamp() * 1000)
    start, end = period_bounds("month", moment, utc)
    assert datetime.fromtimestamp(start / 1000, UTC) == datetime(2028, 2, 1, tzinfo=UTC)
    assert datetime.fromtimestamp(end / 1000, UTC) == datetime(2028, 3, 1, tzinfo=UTC)


async def test_shadow_policy_counts_but_never_rejects(
    start_gateway: StartGateway, fake_upstream: FakeUpstream, pg: asyncpg.Connection
) -> None:
    gateway = await start_gateway(
        "policies:\n  - {name: trial, scope: user, mode: shadow, limits: [{requests: 2, per: minute}]}\n",
        clock_ms=pinned,
    )
    for _ in range(5):
        await complete(gateway)
    assert len(fake_upstream.requests) == 5
    metric = gateway.app[state.METRICS].quota_shadow_rejections.labels("requests_per_minute", "user")
    assert metric._value.get() == 3


async def test_models_allowed_denied_by_tag_and_max_tokens_rules(
    start_gateway: StartGateway, fake_upstream: FakeUpstream, pg: asyncpg.Connection
) -> None:
    fake_upstream.bill_max_tokens = True
    gateway = await start_gateway(
        """
        policies:
          - name: batch-keys
            scope: key
            match: {tags: [batch]}
            models: {deny: ["gpt-4*"]}
            require_max_tokens: true
          - name: interactive
            scope: key
            match: {tags: [interactive]}
            max_tokens_cap: 7
        """
    )
    with pytest.raises(openai.PermissionDeniedError) as denied:
        await complete(gateway, key=OTHER_KEY, model="gpt-4o-mini")
    assert denied.value.response.json()["error"]["code"] == "model_not_allowed"
    assert "batch-keys" in denied.value.response.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError) as missing:
        await gateway.client(key=OTHER_KEY).chat.completions.create(model="mock-model", messages=HI)
    assert missing.value.response.json()["error"]["code"] == "max_tokens_required"
    # Alice's key is capped at 7 completion tokens: the provider is asked for 7, not 50.
    await complete(gateway, max_tokens=50)
    assert fake_upstream.requests[-1]["max_tokens"] == 7
    await gateway.client().chat.completions.create(model="gpt-4o-mini", messages=HI)
    assert fake_upstream.requests[-1]["max_tokens"] == 7


async def test_overshoot_is_measured(
    start_gateway: StartGateway, fake_upstream: FakeUpstream, pg: asyncpg.Connection
) -> None:
    fake_upstream.completion_tokens = 130  # default reservation is 100
    gateway = await start_gateway()
    await gateway.client().chat.completions.create(model="gpt-4o-mini", messages=HI)
    await gateway.settle()
    assert gateway.app[state.METRICS].quota_overshoot_tokens._value.get() == 30


async def test_an_unsettled_reservation_expires_and_is_refunded(
    start_gateway: StartGateway, config_writer: ConfigWriter, pg: asyncpg.Connection
) -> None:
    """A gateway that dies mid-request leaves a reservation that nobody settles."""
    config_writer.quota_extra = "reservation_ttl_seconds: 30"
    clock = {"now": T0_MS}
    gateway = await start_gateway(
        "policies:\n  - {name: daily, scope: user, limits: [{tokens: 100, per: day}, {concurrent: 1}]}\n",
        clock_ms=lambda: clock["now"],
    )
    quota = gateway.app[state.QUOTA]
    alice = Principal("alice-key", "alice", "research", frozenset({"interactive"}))
    decision = gateway.app[state.POLICIES].current.for_request(alice, "gpt-4o-mini")
    await quota.admit(decision, Amounts(8, 80, 0))  # crashes: never settled
    error = await rejected(gateway, max_tokens=10)
    assert error.response.headers["x-ratelimit-limit-name"] in ("tokens_per_day", "concurrent")
    clock["now"] = T0_MS + 30_001
    raw = await complete(gateway, max_tokens=10)
    assert raw.headers["x-ratelimit-remaining-tokens"] == str(100 - 18)


async def test_counters_are_rebuilt_from_the_ledger_after_redis_loses_them(
    start_gateway: StartGateway, fake_upstream: FakeUpstream, pg: asyncpg.Connection
) -> None:
    fake_upstream.bill_max_tokens = True
    policy = "policies:\n  - {name: daily, scope: user, limits: [{tokens: 60, per: day}, {requests: 10, per: month}]}\n"
    gateway = await start_gateway(policy)
    await complete(gateway, max_tokens=10)
    await complete(gateway, max_tokens=10)
    await gateway.settle()
    # Redis restarts empty: every key of this gateway is gone.
    redis = gateway.app[state.QUOTA].limiter.redis
    prefix = gateway.app[state.QUOTA].limiter.key_prefix
    keys = [key async for key in redis.scan_iter(f"{prefix}*")]
    assert keys
    await redis.delete(*keys)
    raw = await complete(gateway, max_tokens=10)
    # 2 x 18 tokens from the ledger + 18 reserved now.
    assert raw.headers["x-ratelimit-remaining-tokens"] == str(60 - 54)
    assert raw.headers["x-ratelimit-remaining-requests"] == str(10 - 3)
    # Once when the subject was first seen (empty ledger), once after the loss.
    assert gateway.app[state.METRICS].quota_rebuilds._value.get() == 2
    await gateway.settle()
    await rejected(gateway, max_tokens=10)


async def test_own_quota_and_the_admin_api(
    start_gateway: StartGateway, fake_upstream: FakeUpstream, pg: asyncpg.Connection
) -> None:
    fake_upstream.bill_max_tokens = True
    gateway = await start_gateway(
        """
        policies:
          - name: per-user
            scope: user
            limits: [{tokens: 1000, per: minute}, {requests: 5, per: day}]
          - name: team-budget
            scope: team
            mode: shadow
            limits: [{cost_usd: 2.5, per: month}]
        """,
        clock_ms=pinned,
    )
    await complete(gateway, max_tokens=12)
    await gateway.settle()
    async with aiohttp.ClientSession() as session:
        async with session.get(
            f"{gateway.url}/v1/quota", headers={"Authorization": f"Bearer {USER_KEY}"}
        ) as r:
            assert r.status == 200
            own = await r.json()
        assert (own["key_id"], own["user"], own["team"]) == ("alice-key", "alice", "research")
        assert [
            (item["policy"], item["kind"], item["window"], item["limit"], item["used"], item["remaining"])
            for item in own["limits"]
        ] == [
            ("per-user", "tokens", "minute", 1000, 20, 980),
            ("per-user", "requests", "day", 5, 1, 4),
            # 8 x $0.15/M + 12 x $0.60/M = $0.0000084, counted in whole micro-dollars rounded up.
            ("team-budget", "cost_usd", "month", 2.5, 0.000009, 2.499991),
        ]
        assert own["limits"][0]["reset"] == "1m1s"
        # Calendar windows say when they last started (the pinned clock is 2027-01-15 08:00 UTC).
        assert (own["limits"][0]["last_reset"], own["limits"][1]["last_reset"]) == (
            None,
            "2027-01-15T00:00:00Z",
        )
        assert own["limits"][2]["last_reset"] == "2027-01-01T00:00:00Z"
        assert own["limits"][2]["mode"] == "shadow"

        admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
        async with session.get(f"{gateway.url}/admin/quota/user/alice", headers=admin) as r:
            shown = await r.json()
        assert [item["used"] for item in shown["limits"]] == [20, 1]
        async with session.get(
            f"{gateway.url}/admin/quota/user/alice", headers={"Authorization": f"Bearer {USER_KEY}"}
        ) as r:
            assert r.status == 401
        async with session.delete(f"{gateway.url}/admin/quota/user/alice", headers=admin) as r:
            # The two usage hashes; settled requests leave no pending reservations behind.
            assert r.status == 200 and (await r.json())["keys_deleted"] == 2
        async with session.get(f"{gateway.url}/admin/quota/user/alice", headers=admin) as r:
            assert [item["used"] for item in (await r.json())["limits"]] == [0, 0]


def test_quota_cli_show_and_reset(config_writer: ConfigWriter, pg: asyncpg.Connection) -> None:
    config = str(
        config_writer.write(
            "policies:\n  - {name: per-user, scope: user, limits: [{requests: 9, per: hour}]}\n"
        )
    )

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "gateway", "quota", *args, "--config", config],
            capture_output=True,
            text=True,
            timeout=60,
        )

    shown = cli("show", "user", "zoe", "--json")
    assert shown.returncode == 0, shown.stderr
    limits = json.loads(shown.stdout)["limits"]
    assert [(item["policy"], item["limit"], item["used"], item["remaining"]) for item in limits] == [
        ("per-user", 9, 0, 9)
    ]
    table = cli("show", "user", "zoe")
    assert re.search(r"per-user\s+requests_per_hour\s+0\s+0\s+9", table.stdout)
    reset = cli("reset", "user", "zoe")
    assert reset.returncode == 0 and "reset 1 limits of user zoe" in reset.stdout


def test_policy_check_cli(tmp_path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "good.yaml").write_text(
        "policies:\n  - {name: a, scope: user, limits: [{requests: 1, per: minute}]}\n"
    )
    (tmp_path / "bad.yaml").write_text(
        "policies:\n  - name: b\n    scope: user\n    limits:\n      - {concurrent: 2, per: minute}\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "policy", "check", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert f"error: {tmp_path / 'bad.yaml'}:5: policies[0].limits[0].per: concurrent limits" in result.stdout
    assert f"ok:    {tmp_path / 'good.yaml'} (1 policies)" in result.stdout


async def test_reload_under_load_keeps_serving(
    start_gateway: StartGateway,
    config_writer: ConfigWriter,
    fake_upstream: FakeUpstream,
    pg: asyncpg.Connection,
) -> None:
    gateway = await start_gateway(
        "policies:\n  - {name: rpm, scope: user, limits: [{requests: 1000, per: minute}]}\n", clock_ms=pinned
    )
    holder = gateway.app[state.POLICIES]
    policy_file = config_writer.directory / "policies" / "test.yaml"
    statuses: list[int] = []

    async def load() -> None:
        for _ in range(60):
            try:
                await complete(gateway, max_tokens=1)
                statuses.append(200)
            except openai.APIStatusError as error:
                statuses.append(error.status_code)

    async def edit() -> None:
        for round_ in range(6):
            await asyncio.sleep(0.02)
            if round_ % 2:
                policy_file.write_text(
                    "policies:\n  - {name: rpm, scope: user, limits: [{requests: 1000, per: fortnight}]}\n"
                )
                assert holder.reload_if_changed(force=True) is False
            else:
                policy_file.write_text(
                    f"policies:\n  - {{name: rpm, scope: user, limits: [{{requests: {900 + round_}, per: minute}}]}}\n"
                )
                assert holder.reload_if_changed(force=True) is True

    await asyncio.gather(load(), load(), edit())
    assert statuses == [200] * 120
    assert holder.reloads == 3
    failures = gateway.app[state.METRICS].policy_reloads.labels("failed")._value.get()
    assert failures == 3
    raw = await complete(gateway, max_tokens=1)
    assert raw.headers["x-ratelimit-limit-requests"] == "904"
