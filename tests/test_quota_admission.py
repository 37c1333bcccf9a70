"""Quota limits enforced through the gateway, seen by the official OpenAI SDK."""

from __future__ import annotations

import asyncio

import asyncpg
import openai
import pytest

from tests.conftest import T0_MS, StartGateway
from tests.fakes.openai_upstream import FakeUpstream

HI = [{"role": "user", "content": "hi"}]
HI_PROMPT_TOKENS = 8  # 3 priming + 3 per message + "user" 1 + "hi" 1
MAX_TOKENS = 40
RESERVED = HI_PROMPT_TOKENS + MAX_TOKENS


def pinned_clock() -> int:
    return T0_MS


async def test_tokens_per_minute_limit_rejects_with_openai_headers(
    start_gateway: StartGateway, fake_upstream: FakeUpstream, pg: asyncpg.Connection
) -> None:
    # The provider bills every reserved token, so settlement changes nothing.
    fake_upstream.bill_max_tokens = True
    gateway = await start_gateway(
        """
        policies:
          - name: tpm
            scope: user
            limits:
              - {tokens: 100, per: minute}
              - {requests: 1000, per: minute}
        """,
        clock_ms=pinned_clock,
    )
    client = gateway.client()
    first = await client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=HI, max_tokens=MAX_TOKENS
    )
    assert first.headers["x-ratelimit-limit-tokens"] == "100"
    assert first.headers["x-ratelimit-remaining-tokens"] == str(100 - RESERVED)
    assert first.headers["x-ratelimit-limit-requests"] == "1000"
    assert first.headers["x-ratelimit-remaining-requests"] == "999"
    await gateway.settle()
    second = await client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=HI, max_tokens=MAX_TOKENS
    )
    assert second.headers["x-ratelimit-remaining-tokens"] == str(100 - 2 * RESERVED)
    await gateway.settle()

    with pytest.raises(openai.RateLimitError) as caught:
        await client.chat.completions.create(model="gpt-4o-mini", messages=HI, max_tokens=MAX_TOKENS)
    response = caught.value.response
    assert response.status_code == 429
    error = response.json()["error"]
    assert error["code"] == "rate_limit_exceeded"
    assert error["type"] == "tokens"
    assert error["param"] is None
    assert "limit 100, used 96, requested 48" in error["message"]
    headers = response.headers
    assert headers["x-ratelimit-limit-tokens"] == "100"
    assert headers["x-ratelimit-remaining-tokens"] == "4"
    # All usage sits in the bucket of T0; it leaves the rolling minute 61 s later.
    assert headers["x-ratelimit-reset-tokens"] == "1m1s"
    assert headers["x-ratelimit-limit-requests"] == "1000"
    assert headers["x-ratelimit-remaining-requests"] == "998"
    assert headers["x-ratelimit-reset-requests"] == "1m1s"
    assert headers["retry-after"] == "61"
    assert headers["retry-after-ms"] == "61000"
    # A wait past a minute is not worth the SDK's blind retries.
    assert headers["x-should-retry"] == "false"
    assert len(fake_upstream.requests) == 2

    await gateway.settle()
    assert await pg.fetchval("SELECT count(*) FROM usage_events") == 2


async def test_request_larger_than_the_limit_is_told_it_can_never_fit(
    start_gateway: StartGateway, fake_upstream: FakeUpstream
) -> None:
    gateway = await start_gateway(
        """
        policies:
          - name: small
            scope: key
            limits: [{tokens: 30, per: minute}]
        """
    )
    with pytest.raises(openai.RateLimitError) as caught:
        await gateway.client().chat.completions.create(
            model="gpt-4o-mini", messages=HI, max_tokens=MAX_TOKENS
        )
    response = caught.value.response
    assert "Request too large" in response.json()["error"]["message"]
    assert response.headers["x-should-retry"] == "false"
    assert "retry-after" not in response.headers
    assert fake_upstream.requests == []


@pytest.mark.parametrize(
    "limit",
    ["{requests: 20, per: minute}", f"{{tokens: {20 * RESERVED}, per: minute}}"],
    ids=["requests", "tokens"],
)
async def test_200_concurrent_requests_admit_exactly_20(
    start_gateway: StartGateway, fake_upstream: FakeUpstream, pg: asyncpg.Connection, limit: str
) -> None:
    fake_upstream.bill_max_tokens = True
    fake_upstream.delay_seconds = 0.05
    gateway = await start_gateway(
        f"""
        policies:
          - name: tight
            scope: team
            limits: [{limit}]
        """,
        clock_ms=pinned_clock,
    )
    client = gateway.client()

    async def one() -> bool:
        try:
            await client.chat.completions.create(model="gpt-4o-mini", messages=HI, max_tokens=MAX_TOKENS)
        except openai.RateLimitError:
            return False
        return True

    outcomes = await asyncio.gather(*(one() for _ in range(200)))
    assert outcomes.count(True) == 20
    assert outcomes.count(False) == 180
    assert len(fake_upstream.requests) == 20
    await gateway.settle()
    assert await pg.fetchval("SELECT count(*) FROM usage_events") == 20


async def test_settlement_refunds_unused_tokens(
    start_gateway: StartGateway, fake_upstream: FakeUpstream
) -> None:
    """The reservation (prompt + max_tokens) is replaced by the provider's usage."""
    gateway = await start_gateway(
        """
        policies:
          - name: tpm
            scope: user
            limits: [{tokens: 1000, per: minute}]
        """,
        clock_ms=pinned_clock,
    )
    client = gateway.client()
    # The fake answers "Hello from the fake upstream!..." cut at 5 tokens.
    await client.chat.completions.create(model="gpt-4o-mini", messages=HI, max_tokens=5)
    await gateway.settle()
    raw = await client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=HI, max_tokens=5
    )
    used_by_first = HI_PROMPT_TOKENS + 5
    assert raw.headers["x-ratelimit-remaining-tokens"] == str(1000 - used_by_first - (HI_PROMPT_TOKENS + 5))


async def test_a_failed_upstream_releases_the_reserved_tokens(
    start_gateway: StartGateway, fake_upstream: FakeUpstream, pg: asyncpg.Connection
) -> None:
    gateway = await start_gateway(
        """
        policies:
          - name: tpm
            scope: user
            limits: [{tokens: 1000, per: minute}]
        """,
        clock_ms=pinned_clock,
    )
    client = gateway.client()
    fake_upstream.mode = "error_500"
    with pytest.raises(openai.APIStatusError) as caught:
        await client.chat.completions.create(model="gpt-4o-mini", messages=HI, max_tokens=MAX_TOKENS)
    assert caught.value.status_code == 502
    assert caught.value.response.json()["error"]["code"] == "upstream_error"
    await gateway.settle()
    fake_upstream.mode = "ok"
    raw = await client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=HI, max_tokens=1
    )
    # Only this request's own reservation is taken: the failed one was refunded.
    assert raw.headers["x-ratelimit-remaining-tokens"] == str(1000 - (HI_PROMPT_TOKENS + 1))
    (row,) = await pg.fetch("SELECT status, error_code, usage_source FROM usage_events WHERE status <> 200")
    assert tuple(row) == (502, "upstream_error", "none")
