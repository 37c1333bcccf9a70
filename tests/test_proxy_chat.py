"""Completions through the official OpenAI SDK, forwarded, relayed and recorded."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import asyncpg
import openai
import pytest
import tiktoken

from tests.conftest import PROVIDER_KEY, USER_KEY, ConfigWriter, RunningGateway, StartGateway
from tests.fakes.openai_upstream import FakeUpstream, openai_chat_prompt_tokens

MESSAGES = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "Say hello to the gateway.", "name": "alice"},
]
# OpenAI's formula in o200k_base: 3 priming + 2 x 3 per message + 1 for the name, plus
# the encoded lengths: "system" 1, "You are a terse assistant." 6, "user" 1,
# "Say hello to the gateway." 6, "alice" 1.
MESSAGES_PROMPT_TOKENS = 3 + 3 + 1 + 6 + 3 + 1 + 6 + 1 + 1


async def ledger_rows(pg: asyncpg.Connection) -> list[asyncpg.Record]:
    return await pg.fetch("SELECT * FROM usage_events ORDER BY created_at")


async def raw_stream(gateway: RunningGateway, max_tokens: int) -> bytes:
    """A streamed completion read as raw SSE bytes, as it arrives on the wire."""
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{gateway.url}/v1/chat/completions",
            headers={"Authorization": f"Bearer {USER_KEY}"},
            json={"model": "gpt-4o-mini", "messages": MESSAGES, "max_tokens": max_tokens, "stream": True},
        ) as response,
    ):
        return await response.read()


def last_error_code(stream_body: bytes) -> str:
    last_event = stream_body.strip().split(b"\n\n")[-1]
    assert last_event.startswith(b'data: {"error"')
    return str(json.loads(last_event[6:])["error"]["code"])


async def test_completion_through_the_sdk_is_forwarded_and_recorded(
    gateway: RunningGateway, fake_upstream: FakeUpstream, pg: asyncpg.Connection
) -> None:
    client = gateway.client()
    raw = await client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=MESSAGES, max_tokens=5
    )
    completion = raw.parse()
    assert completion.choices[0].message.content == "Hello from the fake upstream"
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (
        MESSAGES_PROMPT_TOKENS,
        5,
    )
    request_id = raw.headers["x-request-id"]

    # The provider got its own key and never the caller's.
    sent_headers = fake_upstream.headers_seen[0]
    assert sent_headers["Authorization"] == f"Bearer {PROVIDER_KEY}"
    assert USER_KEY not in json.dumps(sent_headers) + json.dumps(fake_upstream.requests[0])

    await gateway.settle()
    rows = await ledger_rows(pg)
    assert len(rows) == 1
    row = rows[0]
    assert row["request_id"] == request_id
    assert (row["key_id"], row["user_id"], row["team_id"]) == ("alice-key", "alice", "research")
    assert (row["model"], row["provider"], row["upstream_model"]) == ("gpt-4o-mini", "fake", "gpt-4o-mini")
    assert row["status"] == 200 and row["stream"] is False and row["error_code"] is None
    assert row["prompt_tokens_estimated"] == MESSAGES_PROMPT_TOKENS
    assert row["prompt_estimate_exact"] is True
    assert row["reserved_tokens"] == MESSAGES_PROMPT_TOKENS + 5
    assert (row["prompt_tokens"], row["completion_tokens"]) == (MESSAGES_PROMPT_TOKENS, 5)
    assert row["usage_source"] == "provider"
    assert row["latency_ms"] > 0 and row["upstream_latency_ms"] > 0


async def test_ledger_keeps_the_providers_usage_apart_from_the_estimate(
    gateway: RunningGateway, fake_upstream: FakeUpstream, pg: asyncpg.Connection
) -> None:
    fake_upstream.prompt_tokens, fake_upstream.completion_tokens = 40, 9
    await gateway.client().chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=20)
    await gateway.settle()
    (row,) = await ledger_rows(pg)
    assert row["prompt_tokens_estimated"] == MESSAGES_PROMPT_TOKENS
    assert (row["prompt_tokens"], row["completion_tokens"]) == (40, 9)
    assert row["reserved_tokens"] == MESSAGES_PROMPT_TOKENS + 20


async def test_streamed_completion_through_the_sdk(
    gateway: RunningGateway, fake_upstream: FakeUpstream, pg: asyncpg.Connection
) -> None:
    stream = await gateway.client().chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, max_tokens=6, stream=True
    )
    chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello from the fake upstream!"
    # The client did not ask for usage: the usage chunk the gateway requested is not shown.
    assert all(chunk.choices for chunk in chunks)
    assert fake_upstream.requests[0]["stream_options"] == {"include_usage": True}

    await gateway.settle()
    (row,) = await ledger_rows(pg)
    assert row["stream"] is True and row["status"] == 200
    assert (row["prompt_tokens"], row["completion_tokens"]) == (MESSAGES_PROMPT_TOKENS, 6)
    assert row["prompt_tokens_estimated"] == MESSAGES_PROMPT_TOKENS
    assert row["usage_source"] == "provider"


async def test_stream_with_include_usage_shows_the_usage_chunk(
    gateway: RunningGateway, pg: asyncpg.Connection
) -> None:
    stream = await gateway.client().chat.completions.create(
        model="gpt-4o-mini",
        messages=MESSAGES,
        max_tokens=3,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    usage_chunks = [chunk for chunk in chunks if chunk.usage is not None]
    assert len(usage_chunks) == 1 and usage_chunks[0].choices == []
    assert usage_chunks[0].usage is not None
    assert usage_chunks[0].usage.completion_tokens == 3
    assert usage_chunks[0].usage.prompt_tokens == MESSAGES_PROMPT_TOKENS


async def test_stream_arrives_event_by_event(gateway: RunningGateway, fake_upstream: FakeUpstream) -> None:
    """Each SSE event reaches the client as its own read: nothing is buffered whole."""
    fake_upstream.reply = " ".join(["word"] * 50)
    events = 0
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{gateway.url}/v1/chat/completions",
            headers={"Authorization": f"Bearer {USER_KEY}"},
            json={"model": "gpt-4o-mini", "messages": MESSAGES, "max_tokens": 50, "stream": True},
        ) as response,
    ):
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        async for line in response.content:
            if line.startswith(b"data: "):
                events += 1
    # role chunk + 50 tokens + finish chunk + [DONE]; the usage chunk is withheld.
    assert events == 1 + 50 + 1 + 1


async def test_stream_cut_by_the_provider_ends_with_an_error_event_and_is_settled(
    gateway: RunningGateway, fake_upstream: FakeUpstream, pg: asyncpg.Connection
) -> None:
    fake_upstream.mode = "cut_stream"
    assert last_error_code(await raw_stream(gateway, max_tokens=8)) == "upstream_stream_cut"
    await gateway.settle()
    (row,) = await ledger_rows(pg)
    # Half of the 8 tokens were relayed; the provider's usage never came, so they are counted.
    assert row["error_code"] == "upstream_stream_cut"
    assert row["usage_source"] == "counted"
    assert (row["prompt_tokens"], row["completion_tokens"]) == (MESSAGES_PROMPT_TOKENS, 4)


async def test_a_long_stream_without_usage_is_counted_whole(
    gateway: RunningGateway, fake_upstream: FakeUpstream, pg: asyncpg.Connection
) -> None:
    # Chunks wait unparsed for the usage; past 256 KB of them they are counted as they come.
    fake_upstream.reply = "hello " * 20_000
    fake_upstream.mode = "no_usage"
    body = await raw_stream(gateway, max_tokens=50_000)
    assert len(body) > 1_000_000
    await gateway.settle()
    (row,) = await ledger_rows(pg)
    expected = len(tiktoken.get_encoding("o200k_base").encode(fake_upstream.reply))
    assert (row["usage_source"], row["completion_tokens"]) == ("counted", expected)
    assert expected == 20_001


async def test_model_alias_is_renamed_for_the_provider(
    gateway: RunningGateway, fake_upstream: FakeUpstream
) -> None:
    completion = await gateway.client().chat.completions.create(
        model="team-model", messages=MESSAGES, max_tokens=2
    )
    assert fake_upstream.requests[0]["model"] == "gpt-4o-mini"
    assert completion.choices[0].message.content == "Hello from"


async def post_bytes(gateway: RunningGateway, sent: bytes) -> None:
    """A chat completion whose body is exactly `sent`, read to the end."""
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{gateway.url}/v1/chat/completions",
            headers={"Authorization": f"Bearer {USER_KEY}", "Content-Type": "application/json"},
            data=sent,
        ) as response,
    ):
        assert response.status == 200
        await response.read()


async def test_an_unchanged_body_is_forwarded_as_the_callers_bytes(
    gateway: RunningGateway, fake_upstream: FakeUpstream
) -> None:
    # Odd spacing and key order: re-serialising would change them.
    sent = b'{ "max_tokens":2,  "messages": [{"content": "hi", "role": "user"}], "model": "gpt-4o-mini" }'
    await post_bytes(gateway, sent)
    assert fake_upstream.raw_requests == [sent]


async def test_a_changed_body_is_serialised_again(
    gateway: RunningGateway, fake_upstream: FakeUpstream
) -> None:
    # The alias is renamed and a stream asks for usage: both change what is sent.
    await gateway.client().chat.completions.create(model="team-model", messages=MESSAGES, max_tokens=2)
    stream = await gateway.client().chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, max_tokens=2, stream=True
    )
    async for _chunk in stream:
        pass
    renamed, streamed = (json.loads(raw) for raw in fake_upstream.raw_requests)
    assert renamed["model"] == "gpt-4o-mini"
    assert streamed["stream_options"] == {"include_usage": True}


@pytest.mark.parametrize("words", [0, 4096])
async def test_a_changed_body_keeps_the_callers_text_but_for_the_changed_values(
    gateway: RunningGateway, fake_upstream: FakeUpstream, words: int
) -> None:
    # Serialised again, this would lose the spacing and the raw UTF-8 ("\u00e9" instead).
    content = "Say hello to the caf\u00e9 " + "word " * words
    sent = (
        '{ "messages" : [{"role": "user", "content": ' + json.dumps(content, ensure_ascii=False) + "}],\n"
        '  "model":  "team-model", "max_tokens": 2 }'
    ).encode()
    await post_bytes(gateway, sent)
    assert fake_upstream.raw_requests == [sent.replace(b'"team-model"', b'"gpt-4o-mini"')]
    streamed = sent.replace(b'"max_tokens": 2', b'"max_tokens": 2, "stream": true')
    await post_bytes(gateway, streamed)
    assert (
        fake_upstream.raw_requests[1]
        == b'{"stream_options":{"include_usage":true},'
        + streamed.replace(b'"team-model"', b'"gpt-4o-mini"')[1:]
    )


async def test_slow_provider_times_out_with_504(
    start_gateway: StartGateway,
    config_writer: ConfigWriter,
    fake_upstream: FakeUpstream,
    pg: asyncpg.Connection,
) -> None:
    config_writer.timeouts = "{connect_seconds: 1, idle_seconds: 5, total_seconds: 0.3}"
    fake_upstream.delay_seconds = 2
    gateway = await start_gateway()
    with pytest.raises(openai.APIStatusError) as caught:
        await gateway.client().chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=5)
    assert caught.value.status_code == 504
    assert caught.value.response.json()["error"]["code"] == "upstream_timeout"
    await gateway.settle()
    (row,) = await ledger_rows(pg)
    # A timeout is retried (attempts_per_deployment: 2 by default), and the provider had the
    # prompt each time the gateway gave up: each send's prompt is charged, by our exact count.
    assert len(fake_upstream.requests) == row["attempts"] == 2
    assert (row["status"], row["error_code"], row["usage_source"]) == (504, "upstream_timeout", "counted")
    assert row["error_detail"] == "total_timeout"
    expected_prompt = openai_chat_prompt_tokens(MESSAGES, "o200k_base")
    assert (row["prompt_tokens"], row["completion_tokens"]) == (2 * expected_prompt, 0)


async def test_stalled_stream_ends_with_a_timeout_event(
    start_gateway: StartGateway,
    config_writer: ConfigWriter,
    fake_upstream: FakeUpstream,
    pg: asyncpg.Connection,
) -> None:
    config_writer.timeouts = "{connect_seconds: 1, idle_seconds: 0.3, total_seconds: 10}"
    fake_upstream.mode = "stall_stream"
    gateway = await start_gateway()
    assert last_error_code(await raw_stream(gateway, max_tokens=8)) == "upstream_timeout"
    await gateway.settle()
    (row,) = await ledger_rows(pg)
    # One token ("Hello") was relayed before the stall.
    assert (row["error_code"], row["usage_source"], row["completion_tokens"]) == (
        "upstream_timeout",
        "counted",
        1,
    )


async def test_client_leaving_mid_stream_is_settled_and_recorded(
    gateway: RunningGateway, fake_upstream: FakeUpstream, pg: asyncpg.Connection
) -> None:
    fake_upstream.reply = " ".join(["word"] * 200)
    fake_upstream.chunk_delay_seconds = 0.01
    async with aiohttp.ClientSession() as session:
        response = await session.post(
            f"{gateway.url}/v1/chat/completions",
            headers={"Authorization": f"Bearer {USER_KEY}"},
            json={"model": "gpt-4o-mini", "messages": MESSAGES, "max_tokens": 200, "stream": True},
        )
        for _ in range(3):
            await response.content.readline()
        response.close()
    # The gateway notices on its next write, stops reading upstream and settles.
    for _ in range(100):
        await gateway.settle()
        rows = await ledger_rows(pg)
        if rows:
            break
        await asyncio.sleep(0.05)
    (row,) = rows
    assert row["error_code"] == "client_disconnected"
    assert row["usage_source"] == "counted"
    assert 1 <= row["completion_tokens"] < 200
    # The provider was not left streaming all 200 tokens.
    assert row["upstream_latency_ms"] < 200 * 10


async def test_time_to_first_byte_is_bounded_for_streams(
    start_gateway: StartGateway,
    config_writer: ConfigWriter,
    fake_upstream: FakeUpstream,
    pg: asyncpg.Connection,
) -> None:
    config_writer.timeouts = (
        "{connect_seconds: 1, first_byte_seconds: 0.3, idle_seconds: 5, total_seconds: 10}"
    )
    config_writer.extra = "routing: {attempts_per_deployment: 1, backoff_seconds: 0.01}\n"
    fake_upstream.delay_seconds = 2
    gateway = await start_gateway()
    with pytest.raises(openai.APIStatusError) as caught:
        await gateway.client().chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, max_tokens=5, stream=True
        )
    assert caught.value.status_code == 504
    assert caught.value.response.json()["error"]["code"] == "upstream_timeout"


def test_upstream_bodies_are_made_once_per_model_and_prepare_never_raises() -> None:
    """The usual deployment's body is serialised while Redis decides (UpstreamBodies.prepare):
    the same bytes as made later, once; a failover model gets its own; a body that cannot
    be serialised fails where it is sent, not in the admission."""
    from gateway.config import DeploymentConfig
    from gateway.proxy import ROUTES, UpstreamBodies
    from gateway.routing import Plan

    chat = ROUTES["chat"]
    deployment = DeploymentConfig("fake", "gpt-4o-mini")
    plan = Plan((deployment,))
    body = {"model": "fast", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    raw = json.dumps(body).encode()
    headers = {"anthropic-version": "2023-06-01", "authorization": "Bearer sk-caller"}
    bodies = UpstreamBodies(headers, body, raw, None, {}, chat, True, deployment, plan, 100)
    bodies.prepare()
    usual = bodies.for_model("gpt-4o-mini")
    assert bodies.for_model("gpt-4o-mini") is usual  # made once, in prepare
    sent = json.loads(usual.raw or b"")
    assert sent == {**body, "model": "gpt-4o-mini", "stream_options": {"include_usage": True}}
    assert usual.raw == json.dumps(usual.body).encode()
    assert usual.headers == {"anthropic-version": "2023-06-01"}  # never the caller's key
    assert json.loads(bodies.for_model("gpt-4o").raw or b"")["model"] == "gpt-4o"
    # Not renamed, not streamed: the caller's own bytes go as they are.
    plain = {"model": "gpt-4o-mini", "messages": []}
    plain_raw = b'{"model": "gpt-4o-mini", "messages": []}'
    same = UpstreamBodies({}, plain, plain_raw, None, {}, chat, False, deployment, plan, 100)
    assert same.for_model("gpt-4o-mini").raw == plain_raw
    # A policy's cap is a change too.
    capped = UpstreamBodies({}, plain, plain_raw, None, {"max_tokens": 5}, chat, False, deployment, plan, 100)
    assert capped.for_model("gpt-4o-mini").raw == json.dumps({**plain, "max_tokens": 5}).encode()
    broken = UpstreamBodies(
        {}, {"model": "fast", "x": object()}, b"", None, {}, chat, False, deployment, plan, 100
    )
    broken.prepare()
    with pytest.raises(TypeError):
        broken.for_model("gpt-4o-mini")
