"""Every max-tokens field, n and best_of: validated, capped by policy, reserved in full;
and answers without usage counted from everything they generated."""

from __future__ import annotations

from typing import Any

import aiohttp
import asyncpg
import pytest

from gateway.providers import anthropic_wire, openai_wire
from tests.conftest import USER_KEY, RunningGateway, StartGateway
from tests.fakes.openai_upstream import FakeUpstream

HI = [{"role": "user", "content": "hi"}]
# OpenAI's formula in o200k_base: 3 priming + 3 for the message + "user" 1 + "hi" 1.
HI_PROMPT_TOKENS = 8
# Two prompts as token arrays: billed by their length, 3 + 2.
TWO_PROMPTS = [[1, 2, 3], [4, 5]]
TWO_PROMPTS_TOKENS = 5

CAPPED_AT_7 = """
policies:
  - name: per-user
    scope: user
    limits: [{requests: 1000, per: minute}, {tokens: 1000000, per: minute}]
  - name: interactive
    scope: key
    match: {tags: [interactive]}
    max_tokens_cap: 7
"""


async def post(gateway: RunningGateway, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    headers = {
        "Authorization": f"Bearer {USER_KEY}",
        "x-api-key": USER_KEY,
        "anthropic-version": "2023-06-01",
    }
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{gateway.url}/v1/{path}", headers=headers, json=body) as response,
    ):
        return response.status, await response.json()


async def reserved_tokens(gateway: RunningGateway, pg: asyncpg.Connection) -> list[int]:
    await gateway.settle()
    rows = await pg.fetch("SELECT reserved_tokens FROM usage_events ORDER BY created_at")
    return [row["reserved_tokens"] for row in rows]


def max_fields(sent: dict[str, Any]) -> tuple[int, int]:
    return sent["max_completion_tokens"], sent["max_tokens"]


CHAT = {"model": "gpt-4o-mini", "messages": HI}
COMPLETIONS = {"model": "gpt-4o-mini", "prompt": TWO_PROMPTS}


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("chat/completions", {**CHAT, "max_tokens": "lots", "max_completion_tokens": 50}, "max_tokens"),
        ("chat/completions", {**CHAT, "max_completion_tokens": 0, "max_tokens": 50}, "max_completion_tokens"),
        ("chat/completions", {**CHAT, "max_tokens": True}, "max_tokens"),
        ("responses", {"model": "gpt-4o-mini", "input": "hi", "max_output_tokens": 0}, "max_output_tokens"),
        ("completions", {**COMPLETIONS, "max_tokens": 1.5}, "max_tokens"),
        ("chat/completions", {**CHAT, "n": "3"}, "n"),
        ("chat/completions", {**CHAT, "n": 0}, "n"),
        ("chat/completions", {**CHAT, "n": -1}, "n"),
        ("chat/completions", {**CHAT, "n": True}, "n"),
        ("chat/completions", {**CHAT, "n": 129}, "n"),
        ("completions", {**COMPLETIONS, "n": 2.0}, "n"),
        ("completions", {**COMPLETIONS, "best_of": 0}, "best_of"),
        ("completions", {**COMPLETIONS, "best_of": 21}, "best_of"),
        ("completions", {**COMPLETIONS, "best_of": "2"}, "best_of"),
        ("completions", {**COMPLETIONS, "n": 3, "best_of": 2}, "best_of"),
    ],
)
async def test_a_bad_limit_field_is_a_400_naming_it(
    gateway: RunningGateway, fake_upstream: FakeUpstream, path: str, body: dict[str, Any], param: str
) -> None:
    status, answer = await post(gateway, path, body)
    assert status == 400
    assert answer["error"]["type"] == "invalid_request_error"
    assert answer["error"]["code"] == "invalid_request_error"
    assert answer["error"]["param"] == param
    assert fake_upstream.requests == []


async def test_a_bad_max_tokens_on_messages_is_an_anthropic_400(gateway: RunningGateway) -> None:
    body = {"model": "claude-native", "messages": HI, "max_tokens": 0}
    status, answer = await post(gateway, "messages", body)
    assert status == 400
    assert answer["type"] == "error" and answer["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in answer["error"]["message"]


async def test_n_is_left_alone_where_the_route_takes_none(
    gateway: RunningGateway, fake_upstream: FakeUpstream, pg: asyncpg.Connection
) -> None:
    status, _ = await post(gateway, "responses", {"model": "gpt-4o-mini", "input": "hi", "n": "3"})
    assert status == 200
    assert fake_upstream.requests[-1]["n"] == "3"


async def test_a_policy_cap_goes_into_every_max_field_above_it(
    start_gateway: StartGateway, fake_upstream: FakeUpstream, pg: asyncpg.Connection
) -> None:
    gateway = await start_gateway(CAPPED_AT_7)
    client = gateway.client()
    await client.chat.completions.create(
        model="gpt-4o-mini", messages=HI, max_completion_tokens=50, max_tokens=60
    )
    assert max_fields(fake_upstream.requests[-1]) == (7, 7)
    # A field the caller set below the cap stays as it is.
    await client.chat.completions.create(
        model="gpt-4o-mini", messages=HI, max_completion_tokens=5, max_tokens=500
    )
    assert max_fields(fake_upstream.requests[-1]) == (5, 7)
    # None given: the cap goes into the route's own field.
    await client.chat.completions.create(model="gpt-4o-mini", messages=HI)
    assert fake_upstream.requests[-1]["max_tokens"] == 7
    assert "max_completion_tokens" not in fake_upstream.requests[-1]
    await client.responses.create(model="gpt-4o-mini", input="hi", max_output_tokens=50)
    assert fake_upstream.requests[-1]["max_output_tokens"] == 7
    reserved = await reserved_tokens(gateway, pg)
    assert reserved[:3] == [HI_PROMPT_TOKENS + 7, HI_PROMPT_TOKENS + 7, HI_PROMPT_TOKENS + 7]


async def test_chat_reserves_the_larger_max_field_times_n(
    gateway: RunningGateway, fake_upstream: FakeUpstream, pg: asyncpg.Connection
) -> None:
    await gateway.client().chat.completions.create(
        model="gpt-4o-mini", messages=HI, max_completion_tokens=10, max_tokens=20, n=3
    )
    # Forwarded as sent: the provider picks which field it honours.
    sent = fake_upstream.requests[-1]
    assert (sent["max_completion_tokens"], sent["max_tokens"], sent["n"]) == (10, 20, 3)
    assert await reserved_tokens(gateway, pg) == [HI_PROMPT_TOKENS + 20 * 3]


async def test_completions_reserve_max_tokens_times_best_of_times_prompts(
    gateway: RunningGateway, fake_upstream: FakeUpstream, pg: asyncpg.Connection
) -> None:
    client = gateway.client()
    await client.completions.create(model="gpt-4o-mini", prompt=TWO_PROMPTS, max_tokens=10, n=2, best_of=3)
    await client.completions.create(model="gpt-4o-mini", prompt=TWO_PROMPTS, max_tokens=4, n=2)
    await client.completions.create(model="gpt-4o-mini", prompt=TWO_PROMPTS, max_tokens=4, best_of=2)
    assert fake_upstream.requests[0]["best_of"] == 3
    assert await reserved_tokens(gateway, pg) == [
        TWO_PROMPTS_TOKENS + 10 * 3 * 2,
        TWO_PROMPTS_TOKENS + 4 * 2 * 2,
        TWO_PROMPTS_TOKENS + 4 * 2 * 2,
    ]


# Answers without usage: what they generated is counted, all of it.

WEATHER_CALL = {
    "id": "call_1",
    "type": "function",
    "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
}


@pytest.mark.parametrize(
    ("body", "text"),
    [
        (
            {
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": None, "tool_calls": [WEATHER_CALL]},
                    }
                ]
            },
            'get_weather{"city":"Paris"}',
        ),
        (
            {
                "choices": [
                    {
                        "index": 0,
                        "message": {
                            "role": "assistant",
                            "content": "Let me look.",
                            "function_call": {"name": "lookup", "arguments": '{"q":"x"}'},
                        },
                    }
                ]
            },
            'Let me look.lookup{"q":"x"}',
        ),
        (
            {
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": None, "refusal": "I can't help."},
                    }
                ]
            },
            "I can't help.",
        ),
        ({"choices": [{"index": 0, "text": "legacy text"}]}, "legacy text"),
        (
            {
                "output": [
                    {
                        "type": "reasoning",
                        "id": "rs_1",
                        "summary": [{"type": "summary_text", "text": "Weather asked."}],
                    },
                    {
                        "type": "function_call",
                        "id": "fc_1",
                        "call_id": "call_1",
                        "name": "get_weather",
                        "arguments": '{"city":"Oslo"}',
                    },
                    {
                        "type": "message",
                        "role": "assistant",
                        "content": [
                            {"type": "refusal", "refusal": "No."},
                            {"type": "output_text", "text": "Sunny.", "annotations": []},
                        ],
                    },
                ]
            },
            'Weather asked.get_weather{"city":"Oslo"}No.Sunny.',
        ),
    ],
)
def test_body_text_is_everything_generated(body: dict[str, Any], text: str) -> None:
    assert openai_wire.body_text(body) == text


@pytest.mark.parametrize(
    ("chunk", "text"),
    [
        (
            {
                "choices": [
                    {
                        "index": 0,
                        "delta": {
                            "tool_calls": [
                                {
                                    "index": 0,
                                    "id": "c",
                                    "type": "function",
                                    "function": {"name": "get_weather", "arguments": ""},
                                }
                            ]
                        },
                    }
                ]
            },
            "get_weather",
        ),
        (
            {
                "choices": [
                    {"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": '{"ci'}}]}}
                ]
            },
            '{"ci',
        ),
        (
            {"choices": [{"index": 0, "delta": {"function_call": {"name": "lookup", "arguments": "{"}}}]},
            "lookup{",
        ),
        ({"choices": [{"index": 0, "delta": {"refusal": "I can't"}}]}, "I can't"),
        ({"choices": [{"index": 0, "delta": {"content": "Hel"}}]}, "Hel"),
        (
            {
                "type": "response.output_item.added",
                "output_index": 0,
                "item": {"type": "function_call", "id": "fc_1", "name": "get_weather", "arguments": ""},
            },
            "get_weather",
        ),
        (
            {"type": "response.function_call_arguments.delta", "item_id": "fc_1", "delta": '{"city"'},
            '{"city"',
        ),
        ({"type": "response.refusal.delta", "delta": "No"}, "No"),
        ({"type": "response.output_text.delta", "delta": "Sun"}, "Sun"),
        ({"type": "response.output_item.done", "item": {"type": "function_call", "name": "get_weather"}}, ""),
    ],
)
def test_chunk_text_is_everything_generated(chunk: dict[str, Any], text: str) -> None:
    assert openai_wire.chunk_text(chunk) == text


def test_message_text_counts_thinking_and_tool_use() -> None:
    message = {
        "type": "message",
        "role": "assistant",
        "content": [
            {"type": "thinking", "thinking": "Paris, then.", "signature": "sig"},
            {"type": "text", "text": "Checking."},
            {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
        ],
    }
    assert anthropic_wire.message_text(message) == 'Paris, then.Checking.get_weather{"city": "Paris"}'


def test_a_tool_use_only_message_counts() -> None:
    message = {"content": [{"type": "tool_use", "id": "toolu_1", "name": "ping", "input": {}}]}
    assert anthropic_wire.message_text(message) == "ping{}"
