"""Policy files are reloaded without a restart; a broken edit keeps the old policies."""

from __future__ import annotations

import asyncpg
import openai
import pytest

from gateway import state
from tests.conftest import T0_MS, ConfigWriter, StartGateway

HI = [{"role": "user", "content": "hi"}]


async def test_edited_policy_applies_without_restart(
    start_gateway: StartGateway, config_writer: ConfigWriter, pg: asyncpg.Connection
) -> None:
    gateway = await start_gateway(
        "policies:\n  - {name: rpm, scope: user, limits: [{requests: 1, per: minute}]}\n",
        clock_ms=lambda: T0_MS,
    )
    client = gateway.client()
    await client.chat.completions.create(model="gpt-4o-mini", messages=HI, max_tokens=1)
    with pytest.raises(openai.RateLimitError):
        await client.chat.completions.create(model="gpt-4o-mini", messages=HI, max_tokens=1)

    policy_file = config_writer.directory / "policies" / "test.yaml"
    policy_file.write_text("policies:\n  - {name: rpm, scope: user, limits: [{requests: 3, per: minute}]}\n")
    holder = gateway.app[state.POLICIES]
    assert holder.reload_if_changed() is True
    raw = await client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=HI, max_tokens=1
    )
    assert raw.headers["x-ratelimit-limit-requests"] == "3"
    assert raw.headers["x-ratelimit-remaining-requests"] == "1"

    policy_file.write_text(
        "policies:\n  - {name: rpm, scope: user, limits: [{requests: 3, per: fortnight}]}\n"
    )
    assert holder.reload_if_changed() is False
    assert holder.last_error is not None and "limits[0].per" in holder.last_error
    raw = await client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=HI, max_tokens=1
    )
    assert raw.headers["x-ratelimit-remaining-requests"] == "0"
    assert holder.reloads == 1
