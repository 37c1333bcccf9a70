"""Translation end to end: each official SDK against a model served in the other API family.

A real gateway (Redis, PostgreSQL) in front of the fake providers, which speak each
provider's wire format: the OpenAI SDK reaches a Claude model on the fake Anthropic,
the Anthropic SDK a GPT model on the fake OpenAI, whole and streamed, with tools, images,
refusals, provider errors and our own limits; one model served by both families fails
over from one to the other. Every figure is exact: the SDK's usage, the ledger row and
the quota counters once settled.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import aiohttp
import anthropic
import asyncpg
import openai
import pytest
import tiktoken

from gateway import state
from tests.conftest import USER_KEY, ConfigWriter, RunningGateway, StartGateway
from tests.fakes.anthropic_upstream import FakeAnthropic
from tests.fakes.openai_upstream import FakeUpstream, openai_chat_prompt_tokens
from tests.test_tokens_images import png

# Prices per million tokens chosen so that every cost is a whole number of micro-USD.
MODELS = """\
claude-priced:
  provider: anthropic
  upstream_model: claude-sonnet-4-5
  price: {input: 3, output: 15, cached_input: 0.5, cache_write_input: 4}
gpt-priced:
  provider: fake
  upstream_model: gpt-4o-mini
  price: {input: 2, output: 8, cached_input: 1}
# A Claude model on Anthropic with an OpenAI-compatible fallback (weight 0: always tried last).
claude-fallback:
  deployments:
    - {provider: anthropic, upstream_model: claude-sonnet-4-5}
    - {provider: fake, upstream_model: claude-sonnet-4-5, weight: 0}
  price: {input: 3, output: 15}
# A GPT model with a Claude fallback, which cannot carry everything a chat caller asks.
gpt-fallback:
  deployments:
    - {provider: fake, upstream_model: gpt-4o-mini}
    - {provider: anthropic, upstream_model: claude-sonnet-4-5, weight: 0}
"""
POLICIES = """
policies:
  - name: per-user
    scope: user
    limits:
      - {requests: 1000, per: minute}
      - {tokens: 1000000, per: minute}
      - {cost_usd: 10, per: day}
"""
# Quick failover for the tests: two attempts per deployment, no backoff; two failures open a breaker.
ROUTING = "routing: {attempts_per_deployment: 2, backoff_seconds: 0, breaker_failures: 2}\n"

BRIEF = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
# The Messages body it becomes, counted with o200k_base (Claude's tokenizer is not
# public): 3 + "Be brief." (3) + 3 + "user" (1) + "hi" (1) = 11, x 1.15 -> 13.
BRIEF_ESTIMATE = 13
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
WEATHER_TOOL_ANTHROPIC = {
    "name": "get_weather",
    "description": "The weather in a city.",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
ROW_COLUMNS = (
    "model, provider, route, stream, status, error_code, prompt_tokens_estimated, prompt_tokens, "
    "completion_tokens, cached_prompt_tokens, cache_write_tokens, cost_usd, usage_source, caller_api, "
    "provider_api, attempts"
)


@pytest.fixture
async def gateway(
    start_gateway: StartGateway, config_writer: ConfigWriter, pg: asyncpg.Connection
) -> RunningGateway:
    config_writer.extra_models = MODELS
    return await start_gateway(POLICIES, extra=ROUTING)


def anthropic_client(gateway: RunningGateway, **kwargs: Any) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=gateway.url, api_key=USER_KEY, max_retries=0, **kwargs)


async def rows(gateway: RunningGateway, pg: asyncpg.Connection) -> list[dict[str, Any]]:
    """The ledger's rows, once every finished request is settled and written."""
    await gateway.settle()
    records = await pg.fetch(f"SELECT {ROW_COLUMNS} FROM usage_events ORDER BY created_at")
    return [dict(record) for record in records]


async def used(gateway: RunningGateway) -> dict[str, int]:
    """What alice's counters hold once every request is settled (nothing left reserved)."""
    await gateway.settle()
    limits = gateway.app[state.POLICIES].current.limits_of_subject("user", "alice")
    readings = await gateway.app[state.QUOTA].limiter.read(limits)
    assert [reading.reserved for reading in readings] == [0] * len(readings)
    return {reading.limit.rule.label: reading.used for reading in readings}


def charged(requests: int, tokens: int, micro_usd: int) -> dict[str, int]:
    return {"requests_per_minute": requests, "tokens_per_minute": tokens, "cost_usd_per_day": micro_usd}


def row(**fields: Any) -> dict[str, Any]:
    """A ledger row with the defaults of a whole answer from the provider."""
    defaults: dict[str, Any] = {
        "route": "chat/completions",
        "stream": False,
        "status": 200,
        "error_code": None,
        "cached_prompt_tokens": 0,
        "cache_write_tokens": 0,
        "usage_source": "provider",
        "caller_api": "openai",
        "provider_api": "anthropic",
        "attempts": 1,
    }
    return {**defaults, **fields}


# ---------------------------------------------------------------- OpenAI SDK → Claude


async def test_openai_sdk_reaches_claude_with_the_providers_usage_and_cache_figures(
    gateway: RunningGateway, fake_anthropic: FakeAnthropic, pg: asyncpg.Connection
) -> None:
    fake_anthropic.cache_read_input_tokens = 4
    fake_anthropic.cache_creation_input_tokens = 6
    completion = await gateway.client().chat.completions.create(
        model="claude-priced", messages=BRIEF, max_tokens=5
    )
    assert completion.object == "chat.completion"
    assert completion.choices[0].message.content == "Hello from the fake Anthropic"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.model == "claude-sonnet-4-5"
    # Claude's input (21) with its cache reads (4) and writes (6) are the prompt.
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (31, 5)
    assert completion.usage.total_tokens == 36
    assert completion.usage.prompt_tokens_details is not None
    assert completion.usage.prompt_tokens_details.cached_tokens == 4
    # Claude got a Messages body: the system prompt apart, the cap as max_tokens.
    assert fake_anthropic.requests == [
        {
            "model": "claude-sonnet-4-5",
            "max_tokens": 5,
            "system": [{"type": "text", "text": "Be brief."}],
            "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        }
    ]
    # Plain 21 x $3 + cached 4 x $0.5 + written 6 x $4 + output 5 x $15 = 164 micro-USD.
    assert await rows(gateway, pg) == [
        row(
            model="claude-priced",
            provider="anthropic",
            prompt_tokens_estimated=BRIEF_ESTIMATE,
            prompt_tokens=31,
            completion_tokens=5,
            cached_prompt_tokens=4,
            cache_write_tokens=6,
            cost_usd=164 / 1_000_000,
        )
    ]
    assert await used(gateway) == charged(1, 36, 164)


async def test_openai_sdk_streams_from_claude_with_and_without_the_usage_chunk(
    gateway: RunningGateway, fake_anthropic: FakeAnthropic, pg: asyncpg.Connection
) -> None:
    fake_anthropic.cache_creation_input_tokens = 6
    client = gateway.client()
    stream = await client.chat.completions.create(
        model="claude-priced", messages=BRIEF, max_tokens=5, stream=True
    )
    chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert (
        "".join(chunk.choices[0].delta.content or "" for chunk in chunks) == "Hello from the fake Anthropic"
    )
    assert [chunk.choices[0].finish_reason for chunk in chunks][-1] == "stop"
    # Not asked for: no usage chunk, and no chunk carries usage.
    assert all(chunk.choices and chunk.usage is None for chunk in chunks)

    stream = await client.chat.completions.create(
        model="claude-priced",
        messages=BRIEF,
        max_tokens=3,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices) == (
        "Hello from the"
    )
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens, last.usage.total_tokens) == (27, 3, 30)
    assert all(chunk.usage is None for chunk in chunks[:-1])
    # Claude was asked to stream; the usage option is not Claude's to read.
    assert [request.get("stream") for request in fake_anthropic.requests] == [True, True]
    assert "stream_options" not in fake_anthropic.requests[1]
    # Settled with Claude's own figures either way: 21 + 6 written. 21 x 3 + 6 x 4 = 87,
    # plus 5 x 15 = 75 or 3 x 15 = 45.
    assert await rows(gateway, pg) == [
        row(
            model="claude-priced",
            provider="anthropic",
            stream=True,
            prompt_tokens_estimated=BRIEF_ESTIMATE,
            prompt_tokens=27,
            completion_tokens=completion,
            cache_write_tokens=6,
            cost_usd=(87 + 15 * completion) / 1_000_000,
        )
        for completion in (5, 3)
    ]
    assert await used(gateway) == charged(2, 27 + 5 + 27 + 3, 162 + 132)


async def test_openai_sdk_tool_round_trip_with_claude(
    gateway: RunningGateway, fake_anthropic: FakeAnthropic, pg: asyncpg.Connection
) -> None:
    fake_anthropic.tool_calls = [("get_weather", {"city": "Paris"})]
    client = gateway.client()
    question = [{"role": "user", "content": "Weather in Paris?"}]
    first = await client.chat.completions.create(
        model="claude-priced", messages=question, tools=[WEATHER_TOOL], max_tokens=50
    )
    message = first.choices[0].message
    assert first.choices[0].finish_reason == "tool_calls"
    assert message.content == "Let me check."
    assert message.tool_calls is not None and len(message.tool_calls) == 1
    call = message.tool_calls[0]
    assert call.type == "function"
    assert (call.id, call.function.name, json.loads(call.function.arguments)) == (
        "toolu_fake_0",
        "get_weather",
        {"city": "Paris"},
    )
    # The same call streamed: its id and name first, then the arguments in pieces.
    stream = await client.chat.completions.create(
        model="claude-priced", messages=question, tools=[WEATHER_TOOL], max_tokens=50, stream=True
    )
    pieces = [
        delta
        async for chunk in stream
        for delta in (chunk.choices[0].delta.tool_calls or [] if chunk.choices else [])
    ]
    assert (pieces[0].index, pieces[0].id, pieces[0].function and pieces[0].function.name) == (
        0,
        "toolu_fake_0",
        "get_weather",
    )
    arguments = "".join(piece.function.arguments or "" for piece in pieces if piece.function)
    assert json.loads(arguments) == {"city": "Paris"}

    fake_anthropic.tool_calls = []
    answer = await client.chat.completions.create(
        model="claude-priced",
        messages=[
            *question,
            message.model_dump(exclude_none=True),  # type: ignore[list-item]
            {"role": "tool", "tool_call_id": call.id, "content": "18C and sunny"},
        ],
        tools=[WEATHER_TOOL],
        max_tokens=2,
    )
    assert answer.choices[0].message.content == "Hello from"
    # Claude got the call back as a tool_use block and the result as a tool_result.
    assert fake_anthropic.requests[-1]["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "Weather in Paris?"}]},
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Let me check."},
                {"type": "tool_use", "id": "toolu_fake_0", "name": "get_weather", "input": {"city": "Paris"}},
            ],
        },
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": "toolu_fake_0", "content": "18C and sunny"}],
        },
    ]
    assert fake_anthropic.requests[-1]["tools"] == [
        {
            "name": "get_weather",
            "description": "The weather in a city.",
            "input_schema": WEATHER_TOOL["function"]["parameters"],  # type: ignore[index]
        }
    ]
    # The calls: 1 word + len('{"city": "Paris"}') // 4 = 4 output tokens; the answer 2.
    recorded = await rows(gateway, pg)
    assert [(r["stream"], r["prompt_tokens"], r["completion_tokens"]) for r in recorded] == [
        (False, 21, 5),
        (True, 21, 5),
        (False, 21, 2),
    ]
    assert {(r["caller_api"], r["provider_api"], r["usage_source"]) for r in recorded} == {
        ("openai", "anthropic", "provider")
    }
    assert await used(gateway) == charged(3, 26 + 26 + 23, 3 * 63 + 15 * 12)


async def test_openai_sdk_sends_claude_images_by_url_and_base64(
    gateway: RunningGateway, fake_anthropic: FakeAnthropic, pg: asyncpg.Connection
) -> None:
    image = base64.b64encode(png(64, 64)).decode()
    client = gateway.client()
    answers = []
    for url in ("https://example.com/cat.png", f"data:image/png;base64,{image}"):
        completion = await client.chat.completions.create(
            model="claude-priced",
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "What is this?"},
                        {"type": "image_url", "image_url": {"url": url, "detail": "high"}},
                    ],
                }
            ],
            max_tokens=20,
        )
        answers.append(completion.choices[0].message.content)
    assert answers == [
        "I see the image at https://example.com/cat.png.",
        f"I see a base64 image/png image of {len(image)} characters.",
    ]
    assert [request["messages"][0]["content"][1]["source"] for request in fake_anthropic.requests] == [
        {"type": "url", "url": "https://example.com/cat.png"},
        {"type": "base64", "media_type": "image/png", "data": image},
    ]
    # Estimated as Claude sizes images (width x height / 750): a remote image as 1024 x 1024
    # (1399), the 64 x 64 one from its header (6); with 3 + 3 + "user" (1) + "What is this?"
    # (4): 1410 and 17, x 1.15 -> 1622 and 20.
    recorded = await rows(gateway, pg)
    assert [(r["prompt_tokens_estimated"], r["prompt_tokens"], r["completion_tokens"]) for r in recorded] == [
        (1622, 21, 6),
        (20, 21, 9),
    ]


async def test_openai_sdk_a_field_claude_cannot_honour_is_a_400_that_costs_nothing(
    gateway: RunningGateway, fake_anthropic: FakeAnthropic, pg: asyncpg.Connection
) -> None:
    before = await used(gateway)
    with pytest.raises(openai.BadRequestError) as caught:
        await gateway.client().chat.completions.create(model="claude-priced", messages=BRIEF, n=2)
    assert caught.value.status_code == 400
    assert caught.value.body == {
        "message": "n: Claude returns one choice per request; send n: 1 or leave it out.",
        "type": "invalid_request_error",
        "param": "n",
        "code": "unsupported_by_provider",
    }
    assert fake_anthropic.requests == []
    assert await rows(gateway, pg) == []
    assert await used(gateway) == before


async def test_openai_sdk_gets_claudes_overload_in_openais_shape_without_its_text(
    gateway: RunningGateway, fake_anthropic: FakeAnthropic, pg: asyncpg.Connection
) -> None:
    fake_anthropic.mode = "overloaded"
    with pytest.raises(openai.APIStatusError) as caught:
        await gateway.client().chat.completions.create(model="claude-priced", messages=BRIEF, max_tokens=5)
    assert caught.value.status_code == 502
    body = caught.value.body
    assert isinstance(body, dict)
    assert (body["type"], body["code"], body["param"]) == ("server_error", "upstream_error", None)
    assert body["message"].startswith("Provider 'anthropic' answered HTTP 529 (type overloaded_error).")
    assert "Overloaded" not in body["message"]
    assert len(fake_anthropic.requests) == 2  # retried once, as any 529
    # The provider refused it: nothing is charged but the request itself.
    assert await rows(gateway, pg) == [
        row(
            model="claude-priced",
            provider="anthropic",
            status=502,
            error_code="upstream_error",
            prompt_tokens_estimated=BRIEF_ESTIMATE,
            prompt_tokens=None,
            completion_tokens=None,
            cached_prompt_tokens=None,
            cache_write_tokens=None,
            cost_usd=None,
            usage_source="none",
            attempts=2,
        )
    ]
    assert await used(gateway) == charged(1, 0, 0)


async def test_openai_sdk_is_limited_by_the_gateway_in_openais_shape(
    start_gateway: StartGateway, config_writer: ConfigWriter, pg: asyncpg.Connection
) -> None:
    config_writer.extra_models = MODELS
    gateway = await start_gateway(
        "policies:\n  - {name: tiny, scope: user, limits: [{requests: 1, per: hour}]}\n", extra=ROUTING
    )
    client = gateway.client()
    answer = await client.chat.completions.with_raw_response.create(
        model="claude-priced", messages=BRIEF, max_tokens=5
    )
    assert (
        answer.headers["x-ratelimit-limit-requests"],
        answer.headers["x-ratelimit-remaining-requests"],
    ) == (
        "1",
        "0",
    )
    with pytest.raises(openai.RateLimitError) as caught:
        await client.chat.completions.create(model="claude-priced", messages=BRIEF, max_tokens=5)
    response = caught.value.response
    assert response.json()["error"]["code"] == "rate_limit_exceeded"
    assert response.json()["error"]["type"] == "requests"
    assert response.headers["x-ratelimit-limit-requests"] == "1"
    assert response.headers["x-ratelimit-remaining-requests"] == "0"
    assert response.headers["x-ratelimit-reset-requests"].endswith("s")
    assert "anthropic-ratelimit-requests-limit" not in response.headers


# ---------------------------------------------------------------- Anthropic SDK → GPT


async def test_anthropic_sdk_reaches_gpt_with_the_providers_usage(
    gateway: RunningGateway, fake_upstream: FakeUpstream, pg: asyncpg.Connection
) -> None:
    fake_upstream.cached_tokens = 2
    client = anthropic_client(gateway)
    raw = await client.messages.with_raw_response.create(
        model="gpt-priced", max_tokens=5, system="Be brief.", messages=[{"role": "user", "content": "hi"}]
    )
    message = await raw.parse()
    prompt = openai_chat_prompt_tokens(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}], "o200k_base"
    )
    assert prompt == 15
    assert message.type == "message" and message.role == "assistant"
    assert [(block.type, getattr(block, "text", None)) for block in message.content] == [
        ("text", "Hello from the fake upstream")
    ]
    assert (message.stop_reason, message.model) == ("end_turn", "gpt-4o-mini")
    # OpenAI's prompt includes the cached part; Anthropic's input_tokens does not.
    assert (message.usage.input_tokens, message.usage.cache_read_input_tokens) == (13, 2)
    assert (message.usage.cache_creation_input_tokens, message.usage.output_tokens) == (0, 5)
    assert raw.headers["anthropic-ratelimit-requests-limit"] == "1000"
    assert raw.headers["anthropic-ratelimit-requests-remaining"] == "999"
    assert "x-ratelimit-limit-requests" not in raw.headers
    assert fake_upstream.requests == [
        {
            "model": "gpt-4o-mini",
            "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}],
            "max_completion_tokens": 5,
        }
    ]
    # Plain 13 x $2 + cached 2 x $1 + output 5 x $8 = 68 micro-USD; counted exactly before.
    assert await rows(gateway, pg) == [
        row(
            model="gpt-priced",
            provider="fake",
            route="messages",
            prompt_tokens_estimated=15,
            prompt_tokens=15,
            completion_tokens=5,
            cached_prompt_tokens=2,
            cost_usd=68 / 1_000_000,
            caller_api="anthropic",
            provider_api="openai",
        )
    ]
    assert await used(gateway) == charged(1, 20, 68)
    await client.close()


async def test_anthropic_sdk_streams_from_gpt_in_anthropics_event_order(
    gateway: RunningGateway, fake_upstream: FakeUpstream, pg: asyncpg.Connection
) -> None:
    client = anthropic_client(gateway)
    events = await client.messages.create(
        model="gpt-priced", max_tokens=3, messages=[{"role": "user", "content": "hi"}], stream=True
    )
    kinds = [event.type async for event in events]
    assert kinds == [
        "message_start",
        "content_block_start",
        *["content_block_delta"] * 3,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    async with client.messages.stream(
        model="gpt-priced", max_tokens=5, system="Be brief.", messages=[{"role": "user", "content": "hi"}]
    ) as stream:
        text = "".join([piece async for piece in stream.text_stream])
        final = await stream.get_final_message()
    assert text == "Hello from the fake upstream"
    assert [block.type for block in final.content] == ["text"]
    assert final.stop_reason == "end_turn"
    assert (final.usage.input_tokens, final.usage.output_tokens) == (15, 5)
    # Usage is always asked for upstream: it settles the reservation.
    assert [request["stream_options"] for request in fake_upstream.requests] == [{"include_usage": True}] * 2
    # "hi" as chat: 3 + "user" (1) + "hi" (1) + 3 = 8.
    recorded = await rows(gateway, pg)
    assert [
        (r["stream"], r["prompt_tokens_estimated"], r["prompt_tokens"], r["completion_tokens"], r["cost_usd"])
        for r in recorded
    ] == [(True, 8, 8, 3, 40 / 1_000_000), (True, 15, 15, 5, 70 / 1_000_000)]
    assert {(r["caller_api"], r["provider_api"], r["usage_source"]) for r in recorded} == {
        ("anthropic", "openai", "provider")
    }
    assert await used(gateway) == charged(2, 11 + 20, 110)
    await client.close()


async def test_anthropic_sdk_tool_round_trip_with_gpt(
    gateway: RunningGateway, fake_upstream: FakeUpstream, pg: asyncpg.Connection
) -> None:
    fake_upstream.tool_arguments = {"city": "Paris"}
    client = anthropic_client(gateway)
    question = [{"role": "user", "content": "Weather in Paris?"}]
    first = await client.messages.create(
        model="gpt-priced",
        max_tokens=50,
        messages=question,  # type: ignore[arg-type]
        tools=[WEATHER_TOOL_ANTHROPIC],  # type: ignore[list-item]
    )
    assert first.stop_reason == "tool_use"
    (call,) = first.content
    assert call.type == "tool_use"
    assert (call.id, call.name, call.input) == ("call_fake0", "get_weather", {"city": "Paris"})
    assert fake_upstream.requests[0]["tools"] == [WEATHER_TOOL]
    # Streamed: the call as a tool_use block whose input comes in input_json_delta pieces.
    async with client.messages.stream(
        model="gpt-priced",
        max_tokens=50,
        messages=question,  # type: ignore[arg-type]
        tools=[WEATHER_TOOL_ANTHROPIC],  # type: ignore[list-item]
    ) as stream:
        streamed = await stream.get_final_message()
    assert [(block.type, getattr(block, "input", None)) for block in streamed.content] == [
        ("tool_use", {"city": "Paris"})
    ]
    answer = await client.messages.create(
        model="gpt-priced",
        max_tokens=2,
        messages=[
            *question,  # type: ignore[list-item]
            {"role": "assistant", "content": [block.model_dump() for block in first.content]},  # type: ignore[misc]
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "18C"}]},
        ],
        tools=[WEATHER_TOOL_ANTHROPIC],  # type: ignore[list-item]
    )
    assert [getattr(block, "text", None) for block in answer.content] == ["Hello from"]
    arguments = '{"city":"Paris"}'
    assert fake_upstream.requests[-1]["messages"] == [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_fake0",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": arguments},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_fake0", "content": "18C"},
    ]
    # The fake bills a call as its name and arguments in o200k_base: 2 + 5.
    o200k = tiktoken.get_encoding("o200k_base")
    assert len(o200k.encode("get_weather")) + len(o200k.encode(arguments)) == 7
    recorded = await rows(gateway, pg)
    assert [(r["stream"], r["completion_tokens"], r["usage_source"]) for r in recorded] == [
        (False, 7, "provider"),
        (True, 7, "provider"),
        (False, 2, "provider"),
    ]
    assert [r["prompt_tokens"] for r in recorded] == [
        openai_chat_prompt_tokens(request["messages"], "o200k_base") for request in fake_upstream.requests
    ]
    await client.close()


async def test_anthropic_sdk_sends_gpt_an_image(
    gateway: RunningGateway, fake_upstream: FakeUpstream, pg: asyncpg.Connection
) -> None:
    image = base64.b64encode(png(64, 64)).decode()
    client = anthropic_client(gateway)
    message = await client.messages.create(
        model="gpt-priced",
        max_tokens=3,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": image}},
                    {"type": "text", "text": "What is this?"},
                ],
            }
        ],
    )
    assert [getattr(block, "text", None) for block in message.content] == ["Hello from the"]
    assert fake_upstream.requests[0]["messages"] == [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}},
                {"type": "text", "text": "What is this?"},
            ],
        }
    ]
    # Our count adds the image as OpenAI prices it (gpt-4o-mini at detail auto: 64 x 64
    # is one tile, 2833 + 5667); the fake bills text only (3 + 1 + 4 + 3 = 11).
    ((estimated, billed),) = [
        (r["prompt_tokens_estimated"], r["prompt_tokens"]) for r in await rows(gateway, pg)
    ]
    assert (estimated, billed) == (11 + 2833 + 5667, 11)
    await client.close()


async def test_anthropic_sdk_a_field_gpt_cannot_honour_is_a_400_that_costs_nothing(
    gateway: RunningGateway, fake_upstream: FakeUpstream, pg: asyncpg.Connection
) -> None:
    before = await used(gateway)
    client = anthropic_client(gateway)
    with pytest.raises(anthropic.BadRequestError) as caught:
        await client.messages.create(
            model="gpt-priced",
            max_tokens=5,
            messages=[{"role": "user", "content": "hi"}],
            extra_body={"top_k": 5},
        )
    assert caught.value.response.json() == {
        "type": "error",
        "error": {
            "type": "invalid_request_error",
            "message": "'top_k': OpenAI's chat API has no top_k sampling; leave it out "
            "(this model is served through OpenAI's chat API).",
        },
    }
    assert "anthropic-ratelimit-requests-limit" not in caught.value.response.headers  # not admitted
    assert fake_upstream.requests == []
    assert await rows(gateway, pg) == []
    assert await used(gateway) == before
    await client.close()


async def test_anthropic_sdk_gets_gpts_failure_in_anthropics_shape(
    gateway: RunningGateway, fake_upstream: FakeUpstream, pg: asyncpg.Connection
) -> None:
    fake_upstream.mode = "error_500"
    client = anthropic_client(gateway)
    with pytest.raises(anthropic.InternalServerError) as caught:
        await client.messages.create(
            model="gpt-priced", max_tokens=5, messages=[{"role": "user", "content": "hi"}]
        )
    response = caught.value.response
    assert response.status_code == 502
    body = response.json()
    assert (body["type"], body["error"]["type"]) == ("error", "api_error")
    assert body["error"]["message"].startswith("Provider 'fake' answered HTTP 500 (type server_error).")
    assert "processing your request" not in body["error"]["message"]
    assert response.headers["anthropic-ratelimit-requests-limit"] == "1000"
    ((status, code, source, caller, provider),) = [
        (r["status"], r["error_code"], r["usage_source"], r["caller_api"], r["provider_api"])
        for r in await rows(gateway, pg)
    ]
    assert (status, code, source, caller, provider) == (502, "upstream_error", "none", "anthropic", "openai")
    assert await used(gateway) == charged(1, 0, 0)
    await client.close()


async def test_anthropic_sdk_is_limited_by_the_gateway_in_anthropics_shape(
    start_gateway: StartGateway, config_writer: ConfigWriter, pg: asyncpg.Connection
) -> None:
    config_writer.extra_models = MODELS
    gateway = await start_gateway(
        "policies:\n  - {name: tiny, scope: user, limits: [{requests: 1, per: hour}]}\n", extra=ROUTING
    )
    client = anthropic_client(gateway)
    await client.messages.create(
        model="gpt-priced", max_tokens=5, messages=[{"role": "user", "content": "hi"}]
    )
    with pytest.raises(anthropic.RateLimitError) as caught:
        await client.messages.create(
            model="gpt-priced", max_tokens=5, messages=[{"role": "user", "content": "hi"}]
        )
    response = caught.value.response
    assert response.json()["type"] == "error"
    assert response.json()["error"]["type"] == "rate_limit_error"
    assert response.headers["anthropic-ratelimit-requests-limit"] == "1"
    assert response.headers["anthropic-ratelimit-requests-remaining"] == "0"
    assert response.headers["anthropic-ratelimit-requests-reset"].endswith("Z")
    assert "x-ratelimit-limit-requests" not in response.headers
    await client.close()


async def test_anthropic_count_tokens_for_gpt_is_the_exact_chat_count(
    gateway: RunningGateway, fake_upstream: FakeUpstream
) -> None:
    client = anthropic_client(gateway)
    counted = await client.messages.count_tokens(
        model="gpt-priced", system="Be brief.", messages=[{"role": "user", "content": "hi"}]
    )
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert counted.input_tokens == openai_chat_prompt_tokens(chat, "o200k_base") == 15
    # What the same request is billed, by the provider's own figures.
    message = await client.messages.create(
        model="gpt-priced", max_tokens=1, system="Be brief.", messages=[{"role": "user", "content": "hi"}]
    )
    assert message.usage.input_tokens == 15
    await client.close()


async def test_openai_count_for_claude_is_the_messages_estimate(gateway: RunningGateway) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{gateway.url}/v1/tokens/count",
            json={"model": "claude-priced", "messages": BRIEF},
            headers={"Authorization": f"Bearer {USER_KEY}"},
        ) as response,
    ):
        counted = await response.json()
    assert counted == {
        "object": "token_count",
        "model": "claude-priced",
        "route": "chat",
        "prompt_tokens": BRIEF_ESTIMATE,
        "raw_tokens": 11,
        "exact": False,
        "tokenizer": "o200k_base",
        "factor": 1.15,
        "reason": "estimate: Claude's tokenizer is not public; o200k_base x 1.15",
    }


# ---------------------------------------------------------------- one model, both families


async def test_failover_from_anthropic_to_an_openai_deployment_and_the_breaker(
    gateway: RunningGateway,
    fake_anthropic: FakeAnthropic,
    fake_upstream: FakeUpstream,
    pg: asyncpg.Connection,
) -> None:
    fake_anthropic.mode = "overloaded"
    fake_upstream.prompt_tokens = 30
    client = gateway.client()
    # An OpenAI caller: Anthropic through translation first, then the OpenAI deployment as it is.
    first = await client.chat.completions.create(model="claude-fallback", messages=BRIEF, max_tokens=4)
    assert first.choices[0].message.content == "Hello from the fake"
    assert len(fake_anthropic.requests) == 2
    assert fake_upstream.requests[0]["model"] == "claude-sonnet-4-5"
    assert gateway.app[state.ROUTER].breaker_states()["anthropic"] == "open"
    # Anthropic is out: a Messages caller goes straight to the OpenAI deployment, translated.
    client_anthropic = anthropic_client(gateway)
    second = await client_anthropic.messages.create(
        model="claude-fallback",
        max_tokens=4,
        system="Be brief.",
        messages=[{"role": "user", "content": "hi"}],
    )
    assert [getattr(block, "text", None) for block in second.content] == ["Hello from the fake"]
    assert (second.usage.input_tokens, second.usage.output_tokens) == (30, 4)
    assert len(fake_anthropic.requests) == 2
    assert fake_upstream.requests[1]["max_completion_tokens"] == 4
    # Each counted for its usual deployment (Anthropic): the Messages estimate, 13 both times;
    # each settled with the answering provider's figures: 30 x $3 + 4 x $15 = 150 micro-USD.
    assert await rows(gateway, pg) == [
        row(
            model="claude-fallback",
            provider="fake",
            route=route,
            prompt_tokens_estimated=BRIEF_ESTIMATE,
            prompt_tokens=30,
            completion_tokens=4,
            cost_usd=150 / 1_000_000,
            caller_api=caller,
            provider_api="openai",
            attempts=attempts,
        )
        for route, caller, attempts in (("chat/completions", "openai", 3), ("messages", "anthropic", 1))
    ]
    assert await used(gateway) == charged(2, 68, 300)
    await client_anthropic.close()


async def test_a_failover_deployment_that_cannot_carry_the_request_is_skipped_uncharged(
    gateway: RunningGateway,
    fake_anthropic: FakeAnthropic,
    fake_upstream: FakeUpstream,
    pg: asyncpg.Connection,
) -> None:
    """n=2 goes to the OpenAI deployment as it is; when it fails, the Claude fallback
    cannot carry n=2, so it is not tried: the caller gets the provider's failure."""
    fake_upstream.mode = "error_500"
    with pytest.raises(openai.APIStatusError) as caught:
        await gateway.client().chat.completions.create(
            model="gpt-fallback", messages=BRIEF, n=2, max_tokens=3
        )
    assert caught.value.status_code == 502
    assert fake_anthropic.requests == []
    ((provider, attempts, source, provider_api),) = [
        (r["provider"], r["attempts"], r["usage_source"], r["provider_api"]) for r in await rows(gateway, pg)
    ]
    assert (provider, attempts, source, provider_api) == ("fake", 2, "none", "openai")
    assert await used(gateway) == charged(1, 0, 0)
    # The fallback's breaker was never touched.
    assert gateway.app[state.ROUTER].breaker_states()["anthropic"] == "closed"


async def test_routes_without_a_translation_say_so(
    gateway: RunningGateway, fake_anthropic: FakeAnthropic
) -> None:
    client = gateway.client()
    with pytest.raises(openai.BadRequestError) as responses:
        await client.responses.create(model="claude-priced", input="hi")
    assert responses.value.body == {
        "message": "Model `claude-priced` is served by Anthropic's Messages API here, and the Responses API "
        "is served only by OpenAI deployments: use /v1/chat/completions or /v1/messages.",
        "type": "invalid_request_error",
        "param": "model",
        "code": "unsupported_by_provider",
    }
    with pytest.raises(openai.BadRequestError) as completions:
        await client.completions.create(model="claude-priced", prompt="hi")
    assert completions.value.code == "wrong_api_for_model"
    assert fake_anthropic.requests == []


# ---------------------------------------------------------------- streams that end badly


@pytest.mark.parametrize(
    ("mode", "code"), [("stream_error", "upstream_stream_error"), ("cut_stream", "upstream_stream_cut")]
)
async def test_a_claude_stream_that_ends_badly_reaches_the_openai_sdk_as_an_error(
    gateway: RunningGateway, fake_anthropic: FakeAnthropic, pg: asyncpg.Connection, mode: str, code: str
) -> None:
    fake_anthropic.mode = mode
    stream = await gateway.client().chat.completions.create(
        model="claude-priced", messages=BRIEF, max_tokens=7, stream=True
    )
    text = []
    with pytest.raises(openai.APIError) as caught:
        async for chunk in stream:
            text.append(chunk.choices[0].delta.content or "")
    assert "".join(text) == "Hello from the"
    assert code in str(caught.value.body) and "Overloaded" not in caught.value.message
    # Claude's own input figure (message_start), the text relayed counted: "Hello from the"
    # is 3 tokens in o200k_base, x 1.15 -> 4, an estimate (Claude's tokenizer is not public).
    ((status, error_code, prompt, completion, source, provider_api),) = [
        (
            r["status"],
            r["error_code"],
            r["prompt_tokens"],
            r["completion_tokens"],
            r["usage_source"],
            r["provider_api"],
        )
        for r in await rows(gateway, pg)
    ]
    assert (status, error_code, prompt, completion, source, provider_api) == (
        200,
        code,
        21,
        4,
        "estimated",
        "anthropic",
    )
    assert await used(gateway) == charged(1, 25, 21 * 3 + 4 * 15)


async def test_a_gpt_stream_error_reaches_the_anthropic_sdk_as_an_error_event(
    gateway: RunningGateway, fake_upstream: FakeUpstream, pg: asyncpg.Connection
) -> None:
    fake_upstream.mode = "stream_error"
    client = anthropic_client(gateway)
    events = await client.messages.create(
        model="gpt-priced", max_tokens=5, messages=[{"role": "user", "content": "hi"}], stream=True
    )
    kinds = []
    with pytest.raises(anthropic.APIStatusError) as caught:
        async for event in events:
            kinds.append(event.type)
    assert kinds == ["message_start", "content_block_start", "content_block_delta"]
    assert "The provider's stream ended with an error (server_error)." in str(caught.value.body)
    # No usage came: our exact count of the prompt (8) and of the text relayed ("Hello": 1).
    ((error_code, prompt, completion, source),) = [
        (r["error_code"], r["prompt_tokens"], r["completion_tokens"], r["usage_source"])
        for r in await rows(gateway, pg)
    ]
    assert (error_code, prompt, completion, source) == ("upstream_stream_error", 8, 1, "counted")
    await client.close()
