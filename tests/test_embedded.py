"""The embedded default: no Redis and no PostgreSQL configured, same behaviour."""

from __future__ import annotations

import sqlite3

import openai
import pytest
import tiktoken

from tests.conftest import T0_MS, ConfigWriter, StartGateway
from tests.fakes.openai_upstream import FakeUpstream

HI = [{"role": "user", "content": "hi"}]


async def test_embedded_default_serves_limits_and_records(
    start_gateway: StartGateway, config_writer: ConfigWriter, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.bill_max_tokens = True
    gateway = await start_gateway(
        """
        policies:
          - name: tpm
            scope: user
            limits: [{tokens: 30, per: minute}]
        """,
        embedded=True,
        clock_ms=lambda: T0_MS,
    )
    client = gateway.client()
    completion = await client.chat.completions.create(model="gpt-4o-mini", messages=HI, max_tokens=5)
    assert completion.choices[0].message.content == "Hello from the fake upstream"
    stream = await client.chat.completions.create(model="gpt-4o-mini", messages=HI, max_tokens=5, stream=True)
    assert "".join([c.choices[0].delta.content or "" async for c in stream]) == "Hello from the fake upstream"
    await gateway.settle()
    # 2 x (8 + 5) = 26 of 30 used: the same Lua scripts, run in-process, reject the next.
    with pytest.raises(openai.RateLimitError) as caught:
        await client.chat.completions.create(model="gpt-4o-mini", messages=HI, max_tokens=5)
    assert caught.value.response.headers["x-ratelimit-remaining-tokens"] == "4"
    await gateway.settle()

    with sqlite3.connect(config_writer.directory / "var" / "test.db") as connection:
        rows = connection.execute(
            "SELECT user_id, stream, prompt_tokens_estimated, prompt_tokens, completion_tokens "
            "FROM usage_events ORDER BY created_at"
        ).fetchall()
    assert rows == [("alice", 0, 8, 8, 5), ("alice", 1, 8, 8, 5)]


async def test_mock_provider_answers_in_openai_format(start_gateway: StartGateway) -> None:
    gateway = await start_gateway(embedded=True)
    client = gateway.client()
    completion = await client.chat.completions.create(model="mock-model", messages=HI, max_tokens=3)
    assert completion.object == "chat.completion"
    assert completion.choices[0].message.content == "This is a"
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None
    assert (
        completion.usage.prompt_tokens,
        completion.usage.completion_tokens,
        completion.usage.total_tokens,
    ) == (
        8,
        3,
        11,
    )
    stream = await client.chat.completions.create(
        model="mock-model", messages=HI, stream=True, stream_options={"include_usage": True}
    )
    chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.startswith("This is a mock completion from the gateway's built-in provider.")
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == len(tiktoken.get_encoding("o200k_base").encode(text))
