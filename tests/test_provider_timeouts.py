"""The provider client's timeouts, each met by a provider that stalls at exactly that point.

connect_seconds bounds opening a connection; first_byte_seconds the wait for the
response head and, for a stream, its first piece (counted from the start); idle_seconds
every later read; total_seconds a whole non-streamed call. Each failure names the
timeout that ran out (its detail), and the router retries, fails over and opens the
breaker on timeouts as on any failed attempt (README, Routing).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import aiohttp
import asyncpg
import pytest

from gateway import state
from gateway.config import ProviderConfig, TimeoutsConfig
from gateway.errors import UpstreamError, UpstreamTimeout
from gateway.providers import build_http_provider
from gateway.providers.base import UpstreamRequest
from tests.conftest import USER_KEY, ConfigWriter, StartGateway
from tests.fakes.openai_upstream import FakeUpstream

BODY = b'{"id":"chatcmpl-1","object":"chat.completion","choices":[],"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}'
EVENT = b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"Hi"}}]}\n\n'
JSON_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
SSE_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"

Answer = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def until_closed(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Stalls until the gateway gives up and closes the connection."""
    await reader.read()


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


@contextlib.asynccontextmanager
async def provider_that(
    answer: Answer, host: str = "127.0.0.1", port: int = 0
) -> AsyncIterator[tuple[str, list[bytes]]]:
    """A provider on a real socket: reads each request whole, then answers with `answer`."""
    received: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(
                int(line.split(b":")[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length")
            )
            received.append(await reader.readexactly(length))
            await answer(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, host, port)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{port}/v1", received
    finally:
        server.close()


def provider_config(base_url: str, **timeouts: float) -> ProviderConfig:
    seconds = {"connect_seconds": 5.0, "first_byte_seconds": 5.0, "idle_seconds": 5.0, "total_seconds": 10.0}
    return ProviderConfig(
        name="stalling", type="openai", base_url=base_url, timeouts=TimeoutsConfig(**(seconds | timeouts))
    )


def chat(stream: bool) -> UpstreamRequest:
    return UpstreamRequest(
        "chat/completions", {"model": "m", "messages": [], "stream": stream}, stream=stream
    )


async def call(base_url: str, stream: bool, **timeouts: float) -> tuple[UpstreamRequest, bytes]:
    """One call; for a stream, every piece read."""
    provider = build_http_provider(provider_config(base_url, **timeouts))
    request = chat(stream)
    try:
        reply = await provider.send(request)
        if reply.chunks is None:
            return request, reply.body
        return request, b"".join([piece async for piece in reply.chunks])
    finally:
        await provider.close()


async def timed_out(base_url: str, stream: bool, **timeouts: float) -> UpstreamTimeout:
    with pytest.raises(UpstreamTimeout) as caught:
        await call(base_url, stream, **timeouts)
    return caught.value


async def test_the_head_waits_first_byte_seconds_not_idle_seconds() -> None:
    stall = until_closed

    async with provider_that(stall) as (url, received):
        error = await timed_out(url, False, first_byte_seconds=0.4, idle_seconds=0.1)
    assert (error.status, error.code, error.detail) == (504, "upstream_timeout", "first_byte_timeout")
    assert isinstance(error, UpstreamError)  # retried and failed over like the others
    assert len(received) == 1


async def test_a_head_that_comes_slower_than_idle_seconds_is_still_taken() -> None:
    async def slow_head(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(0.3)
        writer.write(JSON_HEAD % len(BODY) + BODY)

    async with provider_that(slow_head) as (url, _):
        request, body = await call(url, False, first_byte_seconds=2, idle_seconds=0.1)
    assert body == BODY
    assert request.delivery.sent


async def test_a_streams_first_event_is_bounded_by_first_byte_seconds() -> None:
    async def head_only(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(SSE_HEAD)
        await until_closed(reader, writer)

    async with provider_that(head_only) as (url, _):
        error = await timed_out(url, True, first_byte_seconds=0.4, idle_seconds=0.1)
    assert (error.code, error.detail) == ("upstream_timeout", "first_byte_timeout")


async def test_a_stream_stalling_after_its_first_event_ends_after_idle_seconds() -> None:
    async def one_event(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(SSE_HEAD + chunk(EVENT))
        await until_closed(reader, writer)

    async with provider_that(one_event) as (url, _):
        provider = build_http_provider(provider_config(url, first_byte_seconds=5, idle_seconds=0.3))
        try:
            reply = await provider.send(chat(True))
            assert reply.chunks is not None
            pieces = []
            with pytest.raises(UpstreamTimeout) as caught:
                async for piece in reply.chunks:
                    pieces.append(piece)
        finally:
            await provider.close()
    assert pieces == [EVENT]
    assert (caught.value.code, caught.value.detail) == ("upstream_timeout", "idle_timeout")


async def test_a_body_stalling_midway_ends_after_idle_seconds() -> None:
    async def half_a_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(JSON_HEAD % len(BODY) + BODY[:10])
        await until_closed(reader, writer)

    async with provider_that(half_a_body) as (url, _):
        error = await timed_out(url, False, idle_seconds=0.3, total_seconds=10)
    assert error.detail == "idle_timeout"


async def test_a_body_that_trickles_ends_after_total_seconds() -> None:
    async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(JSON_HEAD % len(BODY))
        for byte in BODY:
            writer.write(bytes([byte]))
            await asyncio.sleep(0.05)

    async with provider_that(trickle) as (url, _):
        error = await timed_out(url, False, first_byte_seconds=5, idle_seconds=0.5, total_seconds=0.8)
    assert error.detail == "total_timeout"


async def test_total_seconds_below_first_byte_seconds_bounds_the_head_too() -> None:
    stall = until_closed

    async with provider_that(stall) as (url, _):
        error = await timed_out(url, False, first_byte_seconds=5, total_seconds=0.3)
    assert error.detail == "total_timeout"


@contextlib.contextmanager
def a_full_accept_queue() -> Iterator[str]:
    """A port whose listen queue is full: the kernel drops further SYNs, so connecting hangs."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    try:
        for _ in range(4):
            filler = socket.socket()
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(("127.0.0.1", port))
            fillers.append(filler)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


async def test_connecting_is_bounded_by_connect_seconds_and_sends_nothing() -> None:
    with a_full_accept_queue() as url:
        provider = build_http_provider(provider_config(url, connect_seconds=0.3, first_byte_seconds=5))
        request = chat(False)
        try:
            with pytest.raises(UpstreamTimeout) as caught:
                await provider.send(request)
        finally:
            await provider.close()
    assert (caught.value.code, caught.value.detail) == ("upstream_timeout", "connect_timeout")
    assert not request.delivery.sent


async def test_happy_eyeballs_races_past_a_stalled_address() -> None:
    """The host's first address stalls (a full accept queue), its second answers: the
    second is tried 0.25 s in, well before connect_seconds (3 s) or the first byte (1.5 s)
    would run out, as they would if addresses were tried one after another."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(JSON_HEAD % len(BODY) + BODY)

    with a_full_accept_queue() as stalled_url:
        port = int(stalled_url.rsplit(":", 1)[1].split("/")[0])
        async with provider_that(answer, host="127.0.0.2", port=port) as (_, received):
            config = dataclasses.replace(
                provider_config(f"http://provider.test:{port}/v1", connect_seconds=3, first_byte_seconds=1.5),
                addresses=("127.0.0.1", "127.0.0.2"),
            )
            provider = build_http_provider(config)
            try:
                reply = await provider.send(chat(False))
            finally:
                await provider.close()
    assert (reply.status, reply.body) == (200, BODY)
    assert len(received) == 1


# Through the gateway: timeouts retried, failed over, counted by the breaker.


@pytest.fixture
async def stalling_provider() -> AsyncIterator[tuple[str, list[bytes]]]:
    stall = until_closed

    async with provider_that(stall) as provider:
        yield provider


def stalling_yaml(url: str, timeouts: str) -> str:
    """gateway.yaml's entry for the stalling provider, with these timeouts."""
    return f"stalling:\n  type: openai\n  base_url: {url}\n  timeouts: {timeouts}\n"


async def test_timeouts_are_retried_failed_over_and_open_the_breaker(
    start_gateway: StartGateway,
    config_writer: ConfigWriter,
    fake_upstream: FakeUpstream,
    stalling_provider: tuple[str, list[bytes]],
    pg: asyncpg.Connection,
) -> None:
    stalling_url, stalled = stalling_provider
    config_writer.extra_providers = stalling_yaml(
        stalling_url, "{first_byte_seconds: 0.3, idle_seconds: 0.1}"
    )
    config_writer.extra_models = textwrap.dedent(
        """\
        routed:
          deployments:
            - {provider: stalling, upstream_model: gpt-4o-mini, weight: 3}
            - {provider: fake, upstream_model: gpt-4o-mini, weight: 1}
        """
    )
    config_writer.extra = (
        "routing: {attempts_per_deployment: 2, backoff_seconds: 0.01, breaker_failures: 3, "
        "breaker_cooldown_seconds: 30}\n"
    )
    gateway = await start_gateway()
    router = gateway.app[state.ROUTER]
    router._choose = lambda weights: list(range(len(weights)))  # the stalling one first
    client = gateway.client()
    metrics = gateway.app[state.METRICS]

    # Two timed-out attempts on the stalling deployment, then the other answers.
    first = await client.chat.completions.create(
        model="routed", messages=[{"role": "user", "content": "hi"}], max_tokens=2
    )
    assert first.choices[0].message.content == "Hello from"
    assert (len(stalled), len(fake_upstream.requests)) == (2, 1)
    # A third timeout in a row takes it out; the fourth request does not wait on it.
    await client.chat.completions.create(
        model="routed", messages=[{"role": "user", "content": "hi"}], max_tokens=2
    )
    assert router.breaker_states()["stalling"] == "open"
    await client.chat.completions.create(
        model="routed", messages=[{"role": "user", "content": "hi"}], max_tokens=2
    )
    assert (len(stalled), len(fake_upstream.requests)) == (3, 3)
    assert metrics.upstream_failures.labels("stalling", "first_byte_timeout")._value.get() == 3
    assert metrics.breaker_openings.labels("stalling")._value.get() == 1

    await gateway.settle()
    rows = await pg.fetch(
        "SELECT provider, attempts, status, usage_source, prompt_tokens, prompt_tokens_estimated"
        " FROM usage_events ORDER BY created_at"
    )
    # Each timed-out send reached the provider, which may bill it: its prompt is charged
    # on top of the usage the answering deployment reported (the fake counts the prompt
    # exactly as the gateway does, so each prompt is prompt_tokens_estimated).
    assert [tuple(row) for row in rows] == [
        (
            "fake",
            3,
            200,
            "counted",
            3 * rows[0]["prompt_tokens_estimated"],
            rows[0]["prompt_tokens_estimated"],
        ),
        (
            "fake",
            2,
            200,
            "counted",
            2 * rows[1]["prompt_tokens_estimated"],
            rows[1]["prompt_tokens_estimated"],
        ),
        ("fake", 1, 200, "provider", rows[2]["prompt_tokens_estimated"], rows[2]["prompt_tokens_estimated"]),
    ]


async def test_every_attempt_timing_out_is_a_504_with_its_attempts_and_detail(
    start_gateway: StartGateway,
    config_writer: ConfigWriter,
    stalling_provider: tuple[str, list[bytes]],
    pg: asyncpg.Connection,
) -> None:
    stalling_url, stalled = stalling_provider
    config_writer.extra_providers = stalling_yaml(stalling_url, "{first_byte_seconds: 0.2}")
    config_writer.extra_models = (
        "stalled:\n  deployments:\n    - {provider: stalling, upstream_model: gpt-4o-mini}\n"
    )
    config_writer.extra = (
        "routing: {attempts_per_deployment: 3, backoff_seconds: 0.01, breaker_failures: 10}\n"
    )
    gateway = await start_gateway()
    async with aiohttp.ClientSession() as session:
        response = await session.post(
            f"{gateway.url}/v1/chat/completions",
            headers={"Authorization": f"Bearer {USER_KEY}"},
            json={"model": "stalled", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5},
        )
        body = await response.json()
    assert (response.status, body["error"]["code"]) == (504, "upstream_timeout")
    assert len(stalled) == 3
    await gateway.settle()
    row = await pg.fetchrow(
        "SELECT status, error_code, error_detail, attempts, usage_source, completion_tokens,"
        " prompt_tokens, prompt_tokens_estimated FROM usage_events"
    )
    assert row is not None
    # Three sends reached the provider and went unanswered: three prompts, nothing completed.
    assert tuple(row)[:6] == (504, "upstream_timeout", "first_byte_timeout", 3, "counted", 0)
    assert row["prompt_tokens"] == 3 * row["prompt_tokens_estimated"] > 0
