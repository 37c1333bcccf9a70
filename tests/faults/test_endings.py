"""The endings table: every way a request can end, on each route, and what it is charged.

For chat completions, the Responses API and Anthropic Messages, whole and streamed, a
scripted provider (tests/fakes/scripted_upstream.py) ends the answer one way per row:
complete, stalled, cut, garbled, truncated, answered in JSON, failed in-band or with
its own error status; or the client leaves at a chosen moment. Each row asserts the
request's one ledger row (exact prompt and completion tokens, status, error code,
usage source), that the quota charged exactly that (reserved back to 0), and for
streams what the client got: whole events only, and exactly one error event in the
route's own format where the stream failed. The expected figures are worked out here:
OpenAI counts with tiktoken, the provider's figures from its script; only Claude's
count (an estimate) is taken from the gateway's own tokenizer.

The table is printed and written to tests/faults/endings.md (docs/reliability.md
includes it).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import asyncpg
import openai
import pytest
import tiktoken
from aiohttp.test_utils import TestServer

from gateway import state
from tests.conftest import T0_MS, USER_KEY, ConfigWriter, RunningGateway, StartGateway, refused_port
from tests.fakes.openai_upstream import openai_chat_prompt_tokens
from tests.fakes.scripted_upstream import (
    ANTHROPIC_INPUT_TOKENS,
    HIDDEN_PROMPT_TOKENS,
    PIECE,
    REASONING_TOKENS,
    Call,
    Script,
    ScriptedUpstream,
)

TABLE = Path(__file__).with_name("endings.md")
PROMPT = "Say six words, please."
MESSAGES = [{"role": "user", "content": PROMPT}]
MAX_TOKENS = 50
# Short, so that the stalls end soon; pauses in scripts (0.2 s) stay well inside them.
TIMEOUTS = "{connect_seconds: 1, first_byte_seconds: 0.5, idle_seconds: 0.5, total_seconds: 2}"
# One attempt and no circuit breaker: each row is one call to the provider.
ROUTING = "routing: {attempts_per_deployment: 1, breaker_failures: 1000}\n"
ABORT = "server: {host: 127.0.0.1, port: 0, on_client_disconnect: abort}\n"
POLICY = "policies:\n  - {name: per-user, scope: user, limits: [{tokens: 1000000, per: minute}]}\n"
ANTHROPIC_KEY_LINE = "    api_key_env: FAKE_ANTHROPIC_KEY\n"
O200K = tiktoken.get_encoding("o200k_base")


@dataclass(frozen=True)
class RouteInfo:
    path: str
    model: str
    # Whether the gateway's pre-flight prompt count is exact, and its completion counts.
    prompt_exact: bool
    model_exact: bool


ROUTES = {
    "chat": RouteInfo("/v1/chat/completions", "gpt-4o-mini", True, True),
    # The Responses input is counted as the equivalent chat: an estimate.
    "responses": RouteInfo("/v1/responses", "gpt-4o-mini", False, True),
    # Claude's tokenizer is not public: every count is an estimate.
    "messages": RouteInfo("/v1/messages", "claude-native", False, False),
}


def pinned_clock() -> int:
    return T0_MS


# The scripted provider, and gateways pointed at it.


@pytest.fixture
async def scripted(config_writer: ConfigWriter) -> AsyncIterator[ScriptedUpstream]:
    """The scripted provider, serving both the `fake` (OpenAI) and `anthropic` providers."""
    upstream = ScriptedUpstream()
    server = TestServer(upstream.app())
    await server.start_server()
    root = str(server.make_url("")).rstrip("/")
    point_at(config_writer, root)
    yield upstream
    await server.close()


def point_at(config_writer: ConfigWriter, root: str) -> None:
    """Both providers at `root`, with short timeouts (the anthropic provider's too)."""
    config_writer.upstream_url = f"{root}/v1"
    config_writer.anthropic_url = root
    config_writer.timeouts = TIMEOUTS
    config_writer.extra = ROUTING
    write = config_writer.write
    if getattr(write, "with_anthropic_timeouts", False):
        return

    def with_anthropic_timeouts(*args: Any, **kwargs: Any) -> Path:
        path = write(*args, **kwargs)
        text = path.read_text()
        assert text.count(ANTHROPIC_KEY_LINE) == 1
        path.write_text(text.replace(ANTHROPIC_KEY_LINE, f"{ANTHROPIC_KEY_LINE}    timeouts: {TIMEOUTS}\n"))
        return path

    with_anthropic_timeouts.with_anthropic_timeouts = True  # type: ignore[attr-defined]
    config_writer.write = with_anthropic_timeouts  # type: ignore[method-assign]


# Requests: through the official SDKs, or raw aiohttp when the client must leave early.


@dataclass
class Answer:
    status: int
    content_type: str
    body: bytes


def request_body(route: str, stream: bool, tag: str) -> dict[str, Any]:
    """What a client sends; the tag names the request's script (and is its client id)."""
    if route == "chat":
        return {
            "model": "gpt-4o-mini",
            "messages": MESSAGES,
            "max_tokens": MAX_TOKENS,
            "user": tag,
            "stream": stream,
        }
    if route == "responses":
        return {
            "model": "gpt-4o-mini",
            "input": PROMPT,
            "max_output_tokens": MAX_TOKENS,
            "user": tag,
            "stream": stream,
        }
    return {
        "model": "claude-native",
        "messages": MESSAGES,
        "max_tokens": MAX_TOKENS,
        "metadata": {"user_id": tag},
        "stream": stream,
    }


def request_headers(route: str, tag: str) -> dict[str, str]:
    headers = {"X-Client-Request-Id": tag}
    if route == "messages":
        return {**headers, "x-api-key": USER_KEY, "anthropic-version": "2023-06-01"}
    return {**headers, "Authorization": f"Bearer {USER_KEY}"}


async def via_sdk(gateway: RunningGateway, route: str, stream: bool, tag: str) -> Answer:
    """The request through the provider's official SDK; the answer's raw bytes."""
    ids = {"X-Client-Request-Id": tag}
    try:
        if route == "messages":
            client = anthropic.AsyncAnthropic(base_url=gateway.url, api_key=USER_KEY, max_retries=0)
            try:
                async with client.messages.with_streaming_response.create(
                    model="claude-native",
                    max_tokens=MAX_TOKENS,
                    messages=[{"role": "user", "content": PROMPT}],
                    metadata={"user_id": tag},
                    stream=stream,
                    extra_headers=ids,
                ) as response:
                    return Answer(
                        response.status_code, response.headers["content-type"], await response.read()
                    )
            finally:
                await client.close()
        sdk = gateway.client()
        if route == "chat":
            async with sdk.chat.completions.with_streaming_response.create(
                model="gpt-4o-mini",
                messages=[{"role": "user", "content": PROMPT}],
                max_tokens=MAX_TOKENS,
                user=tag,
                stream=stream,
                extra_headers=ids,
            ) as response:
                return Answer(response.status_code, response.headers["content-type"], await response.read())
        async with sdk.responses.with_streaming_response.create(
            model="gpt-4o-mini",
            input=PROMPT,
            max_output_tokens=MAX_TOKENS,
            user=tag,
            stream=stream,
            extra_headers=ids,
        ) as response:
            return Answer(response.status_code, response.headers["content-type"], await response.read())
    except (openai.APIStatusError, anthropic.APIStatusError) as exc:
        return Answer(exc.status_code, exc.response.headers["content-type"], exc.response.content)


async def leave_early(
    gateway: RunningGateway, upstream: ScriptedUpstream, route: str, stream: bool, tag: str, leave: str
) -> None:
    """The request over raw HTTP; the client goes away at `leave`:
    "arrived" (the provider has the request), "waiting" (the provider paused, having sent
    its head and half its body or nothing), or "events:N" (N content events received)."""
    session = aiohttp.ClientSession()
    try:
        posting = session.post(
            f"{gateway.url}{ROUTES[route].path}",
            json=request_body(route, stream, tag),
            headers=request_headers(route, tag),
        )
        if leave.startswith("events:"):
            async with posting as response:
                assert response.status == 200
                received = b""
                while received.count(json.dumps(PIECE).encode()) < int(leave.removeprefix("events:")):
                    received += await response.content.readany()
                response.close()
            return
        sending = asyncio.ensure_future(posting)
        call = await upstream.wait_for_call(tag)
        if leave == "waiting":
            await asyncio.wait_for(call.waiting.wait(), 5)
        assert not sending.done()
        sending.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sending
    finally:
        await session.close()


# The ledger and the quota.


async def ledger_rows(pg: asyncpg.Connection, tag: str) -> list[asyncpg.Record]:
    return await pg.fetch("SELECT * FROM usage_events WHERE client_request_id = $1", tag)


async def settled_rows(gateway: RunningGateway, pg: asyncpg.Connection, tag: str) -> list[asyncpg.Record]:
    """The request's ledger rows once it is settled (a client that left is noticed later)."""
    for _ in range(200):
        await gateway.settle()
        rows = await ledger_rows(pg, tag)
        if rows:
            await gateway.settle()
            return rows
        await asyncio.sleep(0.025)
    return []


async def quota_reading(gateway: RunningGateway, user: str = "alice") -> tuple[int, int]:
    """(used, reserved) of the user's one tokens limit."""
    limits = gateway.app[state.POLICIES].current.limits_of_subject("user", user)
    (reading,) = await gateway.app[state.QUOTA].limiter.read(limits)
    return reading.used, reading.reserved


# Streams as the client got them.


def sse_events(body: bytes) -> list[tuple[str | None, Any]]:
    """Every event of a stream as (event name, parsed data); asserts each one is whole.

    A stream must end on an event's end, and every event must carry JSON (or [DONE]):
    half an event relayed to a client fails here.
    """
    text = body.decode().replace("\r\n", "\n")
    assert text.endswith("\n\n") or not text, f"the stream ends inside an event: {text[-80:]!r}"
    events: list[tuple[str | None, Any]] = []
    for block in text.split("\n\n")[:-1]:
        name = None
        data: list[str] = []
        for line in block.split("\n"):
            if line.startswith("event:"):
                name = line.removeprefix("event:").strip()
            elif line.startswith("data:"):
                data.append(line.removeprefix("data:").lstrip(" "))
        assert data, f"an event without data: {block!r}"
        payload = "\n".join(data)
        events.append((name, payload if payload == "[DONE]" else json.loads(payload)))
    return events


def error_events(route: str, events: list[tuple[str | None, Any]]) -> list[Any]:
    """The events that tell the client its stream failed, in the route's format."""
    if route == "chat":
        return [data for _, data in events if isinstance(data, dict) and "error" in data]
    if route == "responses":
        return [
            data
            for _, data in events
            if isinstance(data, dict) and data.get("type") in ("response.failed", "error")
        ]
    return [
        data
        for name, data in events
        if name == "error" or (isinstance(data, dict) and data.get("type") == "error")
    ]


LAST_EVENTS = {"chat": "[DONE]", "responses": "response.completed", "messages": "message_stop"}


def last_event_type(events: list[tuple[str | None, Any]]) -> str | None:
    if not events:
        return None
    _, data = events[-1]
    return data if isinstance(data, str) else data.get("type")


# The table.


@dataclass(frozen=True)
class Ending:
    """One row for each route: what the provider does, when the client leaves, what follows."""

    name: str
    stream: bool
    # None: no provider listens (the connection is refused).
    script: Script | None
    status: int
    error_code: str | None
    # What is charged: "provider" (its usage block), "counted" (prompt: the pre-flight count,
    # or Anthropic's message_start figure; completion: `pieces` counted), or "none".
    charge: str
    pieces: int = 0
    # When the client leaves (see leave_early); None: it reads the whole answer.
    leave: str | None = None
    abort: bool = False
    # A stream that ends in one error event in the route's format.
    error_event: bool = False


STALL_HEAD = Script("stall_head")
# fmt: off
ENDINGS = [
    # Streams.
    Ending("complete", True, Script(), 200, None, "provider"),
    Ending("client leaves before the first byte", True, STALL_HEAD, 499, "client_disconnected", "counted", leave="arrived"),
    Ending("client leaves after the first chunk", True, Script("stall", after=1), 499, "client_disconnected", "counted", 1, leave="events:1"),
    Ending("client leaves mid-stream", True, Script("stall", after=3), 499, "client_disconnected", "counted", 3, leave="events:3"),
    Ending("upstream times out before the head", True, STALL_HEAD, 504, "upstream_timeout", "counted"),
    Ending("upstream times out mid-stream", True, Script("stall"), 200, "upstream_timeout", "counted", 2, error_event=True),
    Ending("connection cut before the head", True, Script("cut_head"), 502, "upstream_connection_lost", "counted"),
    Ending("connection cut mid-stream", True, Script("cut"), 200, "upstream_stream_cut", "counted", 2, error_event=True),
    Ending("garbage", True, Script("garbage"), 200, "upstream_stream_cut", "counted", error_event=True),
    Ending("truncated (half an event, no final event)", True, Script("truncated"), 200, "upstream_stream_cut", "counted", 2, error_event=True),
    Ending("JSON answer to a stream request", True, Script("json"), 200, None, "provider"),
    Ending("in-band error event", True, Script("error_event"), 200, "upstream_stream_error", "counted", 2, error_event=True),
    Ending("provider's own error status", True, Script("error_status"), 502, "upstream_error", "none"),
    Ending("connection refused", True, None, 502, "upstream_unreachable", "none"),
    # Whole answers.
    Ending("complete", False, Script(), 200, None, "provider"),
    Ending("client leaves before the first byte (finish)", False, Script("delay_head"), 499, "client_disconnected", "provider", leave="waiting"),
    Ending("client leaves before the first byte (abort)", False, Script("delay_head"), 499, "client_disconnected", "counted", leave="waiting", abort=True),
    Ending("client leaves mid-wait (finish)", False, Script("pause_body"), 499, "client_disconnected", "provider", leave="waiting"),
    Ending("client leaves mid-wait (abort)", False, Script("pause_body"), 499, "client_disconnected", "counted", leave="waiting", abort=True),
    Ending("upstream times out before the head", False, STALL_HEAD, 504, "upstream_timeout", "counted"),
    Ending("upstream times out mid-body", False, Script("stall"), 504, "upstream_timeout", "counted"),
    Ending("connection cut before the head", False, Script("cut_head"), 502, "upstream_connection_lost", "counted"),
    Ending("connection cut mid-body", False, Script("cut"), 502, "upstream_connection_lost", "counted"),
    Ending("garbage", False, Script("garbage"), 502, "upstream_invalid_response", "counted"),
    Ending("truncated JSON body", False, Script("truncated"), 502, "upstream_invalid_response", "counted"),
    Ending("provider's own error status", False, Script("error_status"), 502, "upstream_error", "none"),
    Ending("connection refused", False, None, 502, "upstream_unreachable", "none"),
]
# fmt: on
ROWS = [(route, ending) for route in ROUTES for ending in ENDINGS]


def row_id(route: str, ending: Ending) -> str:
    mode = "stream" if ending.stream else "plain"
    return f"{route}-{mode}-{ending.name}".replace(" ", "_")


@dataclass(frozen=True)
class Outcome:
    estimate: int
    prompt: int | None
    completion: int | None
    status: int
    error_code: str | None
    source: str
    used: int
    reserved: int


RESULTS: dict[str, Outcome] = {}


def expected_source(route: str, ending: Ending, prompt_reported: bool, completion: int) -> str:
    """docs/reliability.md's rule: "counted" when both figures are exact (an exact
    tokenizer or the provider's own figure), else "estimated"."""
    if ending.charge in ("provider", "none"):
        return ending.charge
    info = ROUTES[route]
    exact = (prompt_reported or info.prompt_exact) and (completion == 0 or info.model_exact)
    return "counted" if exact else "estimated"


def provider_usage(route: str, pieces: int) -> tuple[int, int]:
    """What the scripted provider bills for a whole answer of `pieces` (worked out here)."""
    output = len(O200K.encode(PIECE * pieces))
    if route == "messages":
        return ANTHROPIC_INPUT_TOKENS, output
    # The Responses input is billed as the equivalent chat message.
    return openai_chat_prompt_tokens(MESSAGES, "o200k_base") + HIDDEN_PROMPT_TOKENS, output + REASONING_TOKENS


async def pre_flight_count(gateway: RunningGateway, route: str) -> int:
    """The gateway's pre-flight prompt count: tiktoken's for OpenAI models (worked out
    here), the gateway's own estimate for Claude (its tokenizer is not public)."""
    if route != "messages":
        return openai_chat_prompt_tokens(MESSAGES, "o200k_base")
    counter = gateway.app[state.COUNTER]
    profile = counter.registry.profile("claude-sonnet-4-5")
    body = request_body(route, False, "")
    return (await counter.count("messages", body, profile, len(json.dumps(body)))).tokens


def counted_tokens(gateway: RunningGateway, route: str, text: str) -> int:
    if route == "messages":
        # Claude's tokenizer is not public: the estimate, calibrated like the prompt's count.
        counter = gateway.app[state.COUNTER]
        profile = counter.registry.profile("claude-sonnet-4-5")
        return math.ceil(profile.tokenizer.count(text) * counter.calibration.factor(profile))
    return len(O200K.encode(text))


@pytest.mark.parametrize(("route", "ending"), ROWS, ids=[row_id(*row) for row in ROWS])
async def test_ending(
    route: str,
    ending: Ending,
    scripted: ScriptedUpstream,
    config_writer: ConfigWriter,
    start_gateway: StartGateway,
    pg: asyncpg.Connection,
) -> None:
    if ending.script is None:
        point_at(config_writer, f"http://127.0.0.1:{refused_port()}")
    else:
        scripted.default = ending.script
    gateway = await start_gateway(POLICY, clock_ms=pinned_clock, extra=ABORT if ending.abort else "")
    tag = row_id(route, ending)

    answer: Answer | None = None
    if ending.leave is None:
        answer = await via_sdk(gateway, route, ending.stream, tag)
    else:
        await leave_early(gateway, scripted, route, ending.stream, tag, ending.leave)
    rows = await settled_rows(gateway, pg, tag)
    assert len(rows) == 1, f"{len(rows)} ledger rows"
    (row,) = rows
    used, reserved = await quota_reading(gateway)

    # What the provider saw and did.
    calls = scripted.calls_of(tag)
    call: Call | None = None
    if ending.script is None:
        assert calls == []
    else:
        (call,) = calls
        await asyncio.wait_for(call.done.wait(), 5)
        assert call.text == PIECE * sent_pieces(ending)
        # A stream whose client left, or a call aborted with it, is closed upstream (so is
        # a provider that hangs or cuts); a whole answer is otherwise read to its end.
        left = ending.leave is not None and (ending.stream or ending.abort)
        assert call.closed_early == (left or call.script.ending in ("stall_head", "stall", "cut_head", "cut"))

    # The charge, worked out independently.
    estimate = await pre_flight_count(gateway, route)
    assert row["prompt_tokens_estimated"] == estimate
    prompt_reported = route == "messages" and call is not None and call.started
    if ending.charge == "provider":
        assert call is not None and call.usage is not None
        prompt, completion = provider_usage(route, call.script.pieces)
        assert call.usage == (prompt, completion)
    elif ending.charge == "counted":
        prompt = ANTHROPIC_INPUT_TOKENS if prompt_reported else estimate
        completion = counted_tokens(gateway, route, PIECE * ending.pieces)
    else:
        prompt = completion = None
    source = expected_source(route, ending, prompt_reported, completion or 0)
    assert (row["prompt_tokens"], row["completion_tokens"]) == (prompt, completion)
    assert (row["status"], row["error_code"], row["usage_source"]) == (
        ending.status,
        ending.error_code,
        source,
    )
    assert (used, reserved) == ((prompt or 0) + (completion or 0), 0)

    if answer is not None:
        check_answer(route, ending, answer)
    RESULTS[tag] = Outcome(
        estimate, prompt, completion, row["status"], row["error_code"], row["usage_source"], used, reserved
    )


def sent_pieces(ending: Ending) -> int:
    """The pieces the provider sends in whole events (or in a whole body)."""
    if ending.charge == "provider":
        assert ending.script is not None
        return ending.script.pieces
    return ending.pieces


def check_answer(route: str, ending: Ending, answer: Answer) -> None:
    """What the client got: a clean error body, or whole events and the right error event."""
    if answer.status != 200:
        assert answer.status == ending.status
        error = json.loads(answer.body)
        if route == "messages":
            assert error["type"] == "error" and error["error"]["type"] == "api_error"
        else:
            assert error["error"]["code"] == ending.error_code
        return
    if not answer.content_type.startswith("text/event-stream"):
        # A whole answer, or the JSON answer to a stream request: relayed as JSON.
        assert not ending.stream or ending.script == Script("json")
        assert json.loads(answer.body)["usage"]
        return
    events = sse_events(answer.body)
    errors = error_events(route, events)
    # Every piece the provider sent in a whole event reached the client, and nothing else.
    assert answer.body.count(json.dumps(PIECE).encode()) == sent_pieces(ending)
    if not ending.error_event:
        assert errors == []
        assert last_event_type(events) == LAST_EVENTS[route]
        return
    assert len(errors) == 1, errors
    (error,) = errors
    assert events[-1][1] == error, "the error event is the stream's last"
    provider_own = ending.error_code == "upstream_stream_error"
    if route == "chat":
        assert error["error"]["code"] == (None if provider_own else ending.error_code)
    elif route == "responses":
        assert error["type"] == "response.failed"
        assert error["response"]["error"]["code"] == ("server_error" if provider_own else ending.error_code)
    else:
        assert error["error"]["type"] == ("overloaded_error" if provider_own else "api_error")


def render_table() -> str:
    lines = [
        "| route | mode | ending | pre-flight | prompt | completion | status | error_code | source | used | reserved |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for route, ending in ROWS:
        outcome = RESULTS[row_id(route, ending)]
        cells: list[Any] = [
            route,
            "stream" if ending.stream else "plain",
            ending.name,
            outcome.estimate,
            outcome.prompt,
            outcome.completion,
            outcome.status,
            outcome.error_code,
            outcome.source,
            outcome.used,
            outcome.reserved,
        ]
        lines.append("| " + " | ".join("—" if cell is None else str(cell) for cell in cells) + " |")
    return "\n".join(lines) + "\n"


def test_the_table_is_written(capsys: pytest.CaptureFixture[str]) -> None:
    """Runs after every row: prints the table and keeps it in endings.md (all rows only)."""
    if len(RESULTS) < len(ROWS):
        pytest.skip("only part of the table ran")
    table = render_table()
    header = (
        "<!-- Written by tests/faults/test_endings.py: do not edit by hand. -->\n"
        f"Prompt `{PROMPT}`, answers of six pieces `{PIECE}` (one token each); the provider bills {HIDDEN_PROMPT_TOKENS} prompt tokens more than the"
        f" chat formula and {REASONING_TOKENS} reasoning tokens (OpenAI), or"
        f" {ANTHROPIC_INPUT_TOKENS} input tokens (Anthropic). Timeouts: first byte 0.5 s,"
        " idle 0.5 s, total 2 s; one attempt per request.\n\n"
    )
    TABLE.write_text(header + table)
    with capsys.disabled():
        print("\n" + table)


async def test_a_connection_cut_before_the_head_sends_the_request_once(
    scripted: ScriptedUpstream, start_gateway: StartGateway, pg: asyncpg.Connection
) -> None:
    """A provider that reads a request and closes without answering, on a kept-alive
    connection: the request is not sent again behind the router's back (one attempt
    allowed here), and the one send is counted and charged."""
    gateway = await start_gateway(POLICY, clock_ms=pinned_clock)
    # Four calls at once leave four kept-alive connections idle in the pool.
    scripted.default = Script("delay_head", pause_seconds=0.1)
    await asyncio.gather(*(via_sdk(gateway, "chat", False, f"warm-{index}") for index in range(4)))
    scripted.scripts["cut"] = Script("cut_head")
    answer = await via_sdk(gateway, "chat", False, "cut")
    assert (answer.status, json.loads(answer.body)["error"]["code"]) == (502, "upstream_connection_lost")
    (row,) = await settled_rows(gateway, pg, "cut")
    assert (row["prompt_tokens"], row["completion_tokens"]) == (row["prompt_tokens_estimated"], 0)
    assert (row["attempts"], row["error_detail"]) == (1, "closed")
    assert len(scripted.calls_of("cut")) == 1, len(scripted.calls_of("cut"))
