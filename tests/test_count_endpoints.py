"""Counting without forwarding: Anthropic's count_tokens, our count endpoint, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import aiohttp
import anthropic
import asyncpg
import pytest

from tests.conftest import USER_KEY, RunningGateway
from tests.fakes.openai_upstream import FakeUpstream
from tests.test_tokens_chat import COOKBOOK_MESSAGES, COOKBOOK_TOOL_MESSAGES, COOKBOOK_TOOLS


async def post(gateway: RunningGateway, path: str, body: object, key: str = USER_KEY) -> tuple[int, dict]:  # type: ignore[type-arg]
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{gateway.url}{path}", json=body, headers={"Authorization": f"Bearer {key}"}
        ) as response,
    ):
        return response.status, await response.json()


async def test_count_endpoint_returns_the_preflight_count(
    gateway: RunningGateway, fake_upstream: FakeUpstream
) -> None:
    status, body = await post(
        gateway, "/v1/tokens/count", {"model": "gpt-4o-mini", "messages": COOKBOOK_MESSAGES}
    )
    assert status == 200
    assert body == {
        "object": "token_count",
        "model": "gpt-4o-mini",
        "route": "chat",
        "prompt_tokens": 124,
        "raw_tokens": 124,
        "exact": True,
        "tokenizer": "o200k_base",
        "factor": 1.0,
        "reason": "exact: OpenAI's tokenizer and published counting rule",
    }
    status, body = await post(
        gateway,
        "/v1/tokens/count",
        {"model": "gpt-4", "messages": COOKBOOK_TOOL_MESSAGES, "tools": COOKBOOK_TOOLS},
    )
    assert (status, body["prompt_tokens"], body["tokenizer"]) == (200, 105, "cl100k_base")
    status, body = await post(
        gateway, "/v1/tokens/count", {"model": "gpt-4o-mini", "prompt": [[1, 2, 3], [4]]}
    )
    assert (status, body["route"], body["prompt_tokens"]) == (200, "completions", 4)
    # Nothing was forwarded.
    assert fake_upstream.requests == []


async def test_count_endpoint_errors_are_openai_shaped(gateway: RunningGateway) -> None:
    status, body = await post(gateway, "/v1/tokens/count", {"model": "gpt-4o-mini"})
    assert status == 400 and body["error"]["code"] == "invalid_request_error"
    status, body = await post(gateway, "/v1/tokens/count", {"model": "nope", "messages": []})
    assert status == 404 and body["error"]["code"] == "model_not_found"


async def test_anthropic_count_tokens_through_the_sdk(gateway: RunningGateway) -> None:
    client = anthropic.AsyncAnthropic(base_url=gateway.url, api_key=USER_KEY, max_retries=0)
    counted = await client.messages.count_tokens(
        model="claude-sonnet",
        system="You are terse.",
        messages=[{"role": "user", "content": "Hello, Claude"}],
    )
    # claude-sonnet is served by an OpenAI-compatible deployment: the body is counted as the
    # chat body it is translated into. o200k_base: 3 + "system" (1) + "You are terse." (4)
    # + 3 + "user" (1) + "Hello, Claude" (3) + 3 = 18; x 1.15 -> 21
    assert counted.input_tokens == 21
    with pytest.raises(anthropic.AuthenticationError) as caught:
        await anthropic.AsyncAnthropic(
            base_url=gateway.url, api_key="wrong", max_retries=0
        ).messages.count_tokens(model="claude-sonnet", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.response.json()["type"] == "error"
    assert caught.value.response.json()["error"]["type"] == "authentication_error"
    with pytest.raises(anthropic.NotFoundError) as missing:
        await client.messages.count_tokens(model="claude-nope", messages=[{"role": "user", "content": "hi"}])
    assert missing.value.response.json()["error"]["type"] == "not_found_error"
    await client.close()


async def test_estimated_models_are_marked_in_the_ledger(
    gateway: RunningGateway, fake_upstream: FakeUpstream, pg: asyncpg.Connection
) -> None:
    fake_upstream.prompt_tokens = 40
    await gateway.client().chat.completions.create(
        model="claude-sonnet", messages=[{"role": "user", "content": "hi"}], max_tokens=2
    )
    await gateway.client().chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], max_tokens=2
    )
    await gateway.settle()
    rows = await pg.fetch(
        "SELECT model, prompt_tokens_estimated, prompt_estimate_exact, prompt_tokens FROM usage_events"
    )
    assert sorted(tuple(row) for row in rows) == [
        # 8 counted with o200k_base x 1.15 = 9.2 -> 10 reserved; billed 40.
        ("claude-sonnet", 10, False, 40),
        ("gpt-4o-mini", 8, True, 40),
    ]


def run_cli(*args: str, stdin: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", "tokens", "count", "--config", "/nonexistent/gateway.yaml", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_cli_counts_a_body_from_stdin() -> None:
    result = run_cli(stdin=json.dumps({"model": "gpt-4", "messages": COOKBOOK_MESSAGES}))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == "prompt tokens: 129 (exact)"
    assert "tokenizer:     cl100k_base" in result.stdout


def test_cli_json_output_and_estimates() -> None:
    body = {"model": "claude-sonnet-4-5", "messages": [{"role": "user", "content": "hello"}]}
    result = run_cli("--json", "--route", "messages", stdin=json.dumps(body))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {
        "model": "claude-sonnet-4-5",
        "upstream_model": "claude-sonnet-4-5",
        "route": "messages",
        "prompt_tokens": 10,
        "raw_tokens": 8,
        "exact": False,
        "tokenizer": "o200k_base",
        "factor": 1.15,
        "method": "messages (anthropic format) with o200k_base",
        "reason": "estimate: Claude's tokenizer is not public; o200k_base x 1.15",
    }


def test_cli_rejects_bad_bodies() -> None:
    assert run_cli(stdin="{not json").returncode == 2
    result = run_cli("--model", "gpt-4o", stdin=json.dumps({"prompt": 5}))
    assert result.returncode == 2 and "'prompt' must be" in result.stderr
