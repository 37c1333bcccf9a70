"""Every endpoint through the official SDKs, against fakes that speak each wire format."""

from __future__ import annotations

import anthropic
import asyncpg
import openai
import pytest

from gateway import state
from tests.conftest import ANTHROPIC_PROVIDER_KEY, PROVIDER_KEY, USER_KEY, RunningGateway, StartGateway
from tests.fakes.anthropic_upstream import FakeAnthropic
from tests.fakes.openai_upstream import FakeUpstream

HI = [{"role": "user", "content": "hi"}]


async def rows(pg: asyncpg.Connection) -> list[asyncpg.Record]:
    return await pg.fetch(
        "SELECT route, model, provider, upstream_model, stream, status, prompt_tokens, completion_tokens, "
        "usage_source, attempts, client_request_id FROM usage_events ORDER BY created_at"
    )


async def test_legacy_completions_plain_and_streamed(
    gateway: RunningGateway, fake_upstream: FakeUpstream, pg: asyncpg.Connection
) -> None:
    client = gateway.client()
    completion = await client.completions.create(model="gpt-4o-mini", prompt="Say hi", max_tokens=3)
    assert completion.choices[0].text == "Hello from the"
    stream = await client.completions.create(
        model="gpt-4o-mini", prompt=["a b", "c"], max_tokens=2, stream=True
    )
    text = "".join([chunk.choices[0].text async for chunk in stream if chunk.choices])
    assert text == "Hello from"
    await gateway.settle()
    recorded = await rows(pg)
    assert [(r["route"], r["stream"], r["prompt_tokens"], r["completion_tokens"]) for r in recorded] == [
        ("completions", False, 2, 3),
        ("completions", True, 3, 4),  # two prompts, two tokens each, as the provider billed
    ]
    # Two prompts reserve two completions.
    assert fake_upstream.requests[1]["stream_options"] == {"include_usage": True}


async def test_embeddings(gateway: RunningGateway, pg: asyncpg.Connection) -> None:
    result = await gateway.client().embeddings.create(
        model="text-embedding-3-small", input=["one", "two words"]
    )
    assert len(result.data) == 2 and result.usage.prompt_tokens == 3
    await gateway.settle()
    (row,) = await rows(pg)
    assert (row["route"], row["prompt_tokens"], row["completion_tokens"], row["usage_source"]) == (
        "embeddings",
        3,
        0,
        "provider",
    )


async def test_responses_plain_and_streamed(
    gateway: RunningGateway, fake_upstream: FakeUpstream, pg: asyncpg.Connection
) -> None:
    client = gateway.client()
    response = await client.responses.create(model="gpt-4o-mini", input="hi", max_output_tokens=4)
    assert response.output_text == "Hello from the fake"
    stream = await client.responses.create(model="gpt-4o-mini", input="hi", max_output_tokens=2, stream=True)
    deltas = [event.delta async for event in stream if event.type == "response.output_text.delta"]
    assert "".join(deltas) == "Hello from"
    await gateway.settle()
    recorded = await rows(pg)
    assert [(r["route"], r["stream"], r["prompt_tokens"], r["completion_tokens"]) for r in recorded] == [
        ("responses", False, 12, 4),
        ("responses", True, 12, 2),
    ]


async def test_models_lists_what_the_key_may_use(start_gateway: StartGateway, pg: asyncpg.Connection) -> None:
    gateway = await start_gateway(
        "policies:\n  - {name: no-claude, scope: key, models: {deny: ['claude*']}}\n"
    )
    models = await gateway.client().models.list()
    names = [model.id async for model in models]
    assert "gpt-4o-mini" in names and "mock-model" in names
    assert not [name for name in names if name.startswith("claude")]


async def test_azure_deployment_urls(gateway: RunningGateway, fake_upstream: FakeUpstream) -> None:
    completion = await gateway.client().chat.completions.create(model="azure-gpt", messages=HI, max_tokens=2)
    assert completion.choices[0].message.content == "Hello from"
    assert fake_upstream.azure_calls == [("my-gpt4o-deployment", "2024-10-21")]
    headers = {name.lower(): value for name, value in fake_upstream.headers_seen[0].items()}
    assert headers["api-key"] == PROVIDER_KEY and "authorization" not in headers


async def test_anthropic_messages_plain_and_streamed(
    gateway: RunningGateway, fake_anthropic: FakeAnthropic, pg: asyncpg.Connection
) -> None:
    client = anthropic.AsyncAnthropic(
        base_url=gateway.url,
        api_key=USER_KEY,
        max_retries=0,
        default_headers={"anthropic-version": "2023-06-01", "anthropic-beta": "tools-2024-04-04"},
    )
    message = await client.messages.create(model="claude-native", max_tokens=3, messages=HI)
    assert message.content[0].text == "Hello from the"
    assert message.usage.input_tokens == 21
    fake_anthropic.cache_read_input_tokens = 4
    async with client.messages.stream(model="claude-native", max_tokens=7, messages=HI) as stream:
        text = "".join([piece async for piece in stream.text_stream])
        final = await stream.get_final_message()
    assert text == "Hello from the fake Anthropic upstream!"
    assert final.usage.output_tokens == 7
    await client.close()
    sent = {name.lower(): value for name, value in fake_anthropic.headers_seen[0].items()}
    assert sent["x-api-key"] == ANTHROPIC_PROVIDER_KEY
    # The caller's API version and beta flags go upstream; its key does not.
    assert (sent["anthropic-version"], sent["anthropic-beta"]) == ("2023-06-01", "tools-2024-04-04")
    assert USER_KEY not in str(sent)
    await gateway.settle()
    recorded = await rows(pg)
    assert [
        (r["route"], r["stream"], r["prompt_tokens"], r["completion_tokens"], r["provider"]) for r in recorded
    ] == [
        ("messages", False, 21, 3, "anthropic"),
        # cache reads are input tokens too: 21 + 4
        ("messages", True, 25, 7, "anthropic"),
    ]


async def test_anthropic_errors_and_rejections_in_anthropics_shape(
    start_gateway: StartGateway, fake_anthropic: FakeAnthropic, pg: asyncpg.Connection
) -> None:
    gateway = await start_gateway(
        "policies:\n  - {name: tiny, scope: user, limits: [{requests: 1, per: hour}]}\n"
    )
    client = anthropic.AsyncAnthropic(base_url=gateway.url, api_key=USER_KEY, max_retries=0)
    await client.messages.create(model="claude-native", max_tokens=3, messages=HI)
    with pytest.raises(anthropic.RateLimitError) as caught:
        await client.messages.create(model="claude-native", max_tokens=3, messages=HI)
    response = caught.value.response
    assert response.json()["type"] == "error"
    assert response.json()["error"]["type"] == "rate_limit_error"
    assert response.headers["anthropic-ratelimit-requests-limit"] == "1"
    assert response.headers["anthropic-ratelimit-requests-remaining"] == "0"
    assert response.headers["anthropic-ratelimit-requests-reset"].endswith("Z")
    assert int(response.headers["retry-after"]) > 60
    with pytest.raises(anthropic.BadRequestError) as missing:
        await client.messages.create(model="claude-native", max_tokens=3, messages=[])  # type: ignore[arg-type]
    assert missing.value.response.json()["error"]["type"] == "invalid_request_error"
    # A GPT model through the Messages API is translated (docs/translation.md), and held
    # to the same limits as any request.
    with pytest.raises(anthropic.RateLimitError) as translated:
        await client.messages.create(model="gpt-4o-mini", max_tokens=3, messages=HI)
    assert translated.value.response.json()["error"]["type"] == "rate_limit_error"
    await client.close()


async def test_each_sdk_retries_a_gateway_429_by_itself(
    start_gateway: StartGateway,
    fake_upstream: FakeUpstream,
    fake_anthropic: FakeAnthropic,
    pg: asyncpg.Connection,
) -> None:
    """One request per second: the second call waits for retry-after and goes through."""
    gateway = await start_gateway(
        "policies:\n  - {name: rps, scope: user, limits: [{requests: 1, per: second}]}\n"
    )
    openai_client = openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key=USER_KEY, max_retries=3)
    anthropic_client = anthropic.AsyncAnthropic(base_url=gateway.url, api_key=USER_KEY, max_retries=3)
    retries = []
    for _ in range(2):
        answer = await openai_client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=HI, max_tokens=1
        )
        retries.append(answer.retries_taken)
    for _ in range(2):
        message = await anthropic_client.messages.with_raw_response.create(
            model="claude-native", max_tokens=1, messages=HI
        )
        retries.append(message.retries_taken)
    await openai_client.close()
    await anthropic_client.close()
    # Every call went through in the end; the back-to-back ones only after waiting.
    assert (len(fake_upstream.requests), len(fake_anthropic.requests)) == (2, 2)
    assert retries[1] >= 1 and retries[3] >= 1
    metrics = gateway.app[state.METRICS]
    assert metrics.quota_rejections.labels("requests_per_second", "user")._value.get() == sum(retries)


async def test_headers_never_leak_either_way(
    gateway: RunningGateway, fake_upstream: FakeUpstream, pg: asyncpg.Connection
) -> None:
    fake_upstream.response_headers = {"Set-Cookie": "session=provider-secret", "X-Provider-Secret": "s3cret"}
    client = gateway.client(
        default_headers={
            "Cookie": "caller=cookie",
            "X-Request-Id": "caller-req-42",
            "Connection": "keep-alive",
        }
    )
    raw = await client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=HI, max_tokens=2
    )
    assert "set-cookie" not in raw.headers and "x-provider-secret" not in raw.headers
    assert raw.headers["x-request-id"] == "caller-req-42"
    gateway_id = raw.headers["x-gateway-request-id"]
    sent = {name.lower(): value for name, value in fake_upstream.headers_seen[0].items()}
    assert sent["authorization"] == f"Bearer {PROVIDER_KEY}"
    for header in ("cookie", "x-request-id", "x-stainless-lang"):
        assert header not in sent
    assert USER_KEY not in str(sent)
    await gateway.settle()
    row = await pg.fetchrow("SELECT request_id, client_request_id FROM usage_events")
    assert row is not None and (row["request_id"], row["client_request_id"]) == (gateway_id, "caller-req-42")

    # A key pasted into the caller's id is echoed to that caller, never kept in clear.
    generated = "gw-q3VxN8kz0Lr5fT2bYw7HcJ9mDs4pAe1uGiXo6nKtR-E"  # as `gateway keys create` makes them
    pasted = gateway.client(default_headers={"X-Request-Id": f"trace-{generated}"})
    raw = await pasted.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=HI, max_tokens=2
    )
    await gateway.settle()
    kept = await pg.fetchval(
        "SELECT client_request_id FROM usage_events WHERE request_id = $1",
        raw.headers["x-gateway-request-id"],
    )
    assert kept == "[redacted]"


async def test_mock_speaks_both_apis_with_pacing(
    start_gateway: StartGateway, config_writer, pg: asyncpg.Connection
) -> None:  # type: ignore[no-untyped-def]
    gateway = await start_gateway(embedded=True)
    openai_client = gateway.client()
    stream = await openai_client.chat.completions.create(
        model="mock-model", messages=HI, max_tokens=4, stream=True
    )
    assert "".join([c.choices[0].delta.content or "" async for c in stream if c.choices]) == "This is a mock"
    embedded = await openai_client.embeddings.create(model="mock-model", input="hello")
    assert len(embedded.data[0].embedding) == 8
    claude = anthropic.AsyncAnthropic(base_url=gateway.url, api_key=USER_KEY, max_retries=0)
    message = await claude.messages.create(model="mock-model", max_tokens=3, messages=HI)
    assert message.content[0].text == "This is a"
    async with claude.messages.stream(model="mock-model", max_tokens=2, messages=HI) as stream_:
        assert "".join([piece async for piece in stream_.text_stream]) == "This is"
    await claude.close()


async def test_an_anthropic_stream_cut_upstream_ends_with_an_error_event(
    gateway: RunningGateway, fake_anthropic: FakeAnthropic, pg: asyncpg.Connection
) -> None:
    fake_anthropic.mode = "cut_stream"
    client = anthropic.AsyncAnthropic(base_url=gateway.url, api_key=USER_KEY, max_retries=0)
    with pytest.raises(anthropic.APIStatusError) as caught:
        async with client.messages.stream(model="claude-native", max_tokens=7, messages=HI) as stream:
            async for _ in stream.text_stream:
                pass
    assert "cut the stream" in str(caught.value)
    await client.close()
    await gateway.settle()
    row = await pg.fetchrow(
        "SELECT error_code, usage_source, prompt_tokens, completion_tokens FROM usage_events"
    )
    assert row is not None
    # message_start told the input tokens; three words were relayed before the cut, counted
    # by the Claude estimate and its calibration, 3 x 1.15 rounded up (so the row says estimated).
    assert (row["error_code"], row["usage_source"]) == ("upstream_stream_cut", "estimated")
    assert (row["prompt_tokens"], row["completion_tokens"]) == (21, 4)
