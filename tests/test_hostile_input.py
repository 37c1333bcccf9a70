"""Hostile input with exact answers: lone surrogates, header bytes, duplicate keys, and
what a public readiness probe may learn. Each refusal comes before admission: nothing
is reserved, charged, recorded or sent to a provider."""

from __future__ import annotations

import asyncio
import gzip
import json
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import asyncpg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import state
from gateway.requests import _may_hold_surrogates
from tests.conftest import ADMIN_KEY, USER_KEY, RunningGateway
from tests.fakes.anthropic_upstream import FakeAnthropic
from tests.fakes.openai_upstream import FakeUpstream

HI = [{"role": "user", "content": "hi"}]
PADDING = "p" * 4096  # a body as large as a long prompt


async def raw_request(
    gateway: RunningGateway, method: str, path: str, headers: list[bytes], body: bytes = b""
) -> tuple[int, dict[str, str], bytes]:
    """One request written byte for byte (aiohttp's client will not send 0xff in a header)."""
    where = urlsplit(gateway.url)
    reader, writer = await asyncio.open_connection(where.hostname, where.port)
    head = [
        f"{method} {path} HTTP/1.1".encode(),
        b"Host: gateway",
        b"Connection: close",
        f"Content-Length: {len(body)}".encode(),
        *headers,
    ]
    writer.write(b"\r\n".join(head) + b"\r\n\r\n" + body)
    answer = await reader.read()
    writer.close()
    await writer.wait_closed()
    top, _, content = answer.partition(b"\r\n\r\n")
    status_line, *header_lines = top.decode("latin-1").split("\r\n")
    fields = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        fields[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), fields, content


async def post(
    gateway: RunningGateway, path: str, body: bytes, headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    sent = {"Authorization": f"Bearer {USER_KEY}", "Content-Type": "application/json", **(headers or {})}
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{gateway.url}{path}", data=body, headers=sent) as response,
    ):
        return response.status, await response.json()


async def quota_used(gateway: RunningGateway) -> list[tuple[str, int, int]]:
    """(limit, used, reserved) of alice's limits, with every finished request settled."""
    await gateway.settle()
    limits = gateway.app[state.POLICIES].current.limits_of_subject("user", "alice")
    readings = await gateway.app[state.QUOTA].limiter.read(limits)
    return [(reading.limit.rule.label, reading.used, reading.reserved) for reading in readings]


async def assert_nothing_charged(
    gateway: RunningGateway,
    pg: asyncpg.Connection,
    before: list[tuple[str, int, int]],
    *upstreams: FakeUpstream | FakeAnthropic,
) -> None:
    assert await quota_used(gateway) == before
    assert await pg.fetchval("SELECT count(*) FROM usage_events") == 0
    for upstream in upstreams:
        assert upstream.requests == []


def openai_error(param: str | None, code: str, message: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": code}}


def surrogate_message(where: str) -> str:
    return (
        f"{where} holds a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff escape), "
        "which is not text; send valid Unicode."
    )


# Lone surrogates ----------------------------------------------------------------------

SURROGATE_CASES = [
    ('[{"role": "user", "content": "\\ud800"}]', "messages[0].content"),
    ('[{"role": "user", "content": "hi", "name": "\\ud800"}]', "messages[0].name"),
    ('[{"role": "\\ud800", "content": "hi"}]', "messages[0].role"),
    ('[{"role": "user", "content": "a\\udfffb"}]', "messages[0].content"),  # a low one alone
    ('[{"role": "user", "content": "\\ud83d x \\ude00"}]', "messages[0].content"),  # split pair
    # An escaped backslash, then "ud83d" as text, then a low surrogate on its own.
    ('[{"role": "user", "content": "\\\\ud83d\\ude00"}]', "messages[0].content"),
    ('[{"role": "user", "content": [{"type": "text", "text": "\\uDBFF"}]}]', "messages[0].content[0].text"),
    ('[{"role": "user", "content": "hi", "\\ud800": 1}]', "messages[0].\\ud800"),  # in a key
]


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/tokens/count"])
@pytest.mark.parametrize(("messages", "where"), SURROGATE_CASES)
async def test_a_lone_surrogate_is_a_400_naming_its_place(
    gateway: RunningGateway,
    fake_upstream: FakeUpstream,
    pg: asyncpg.Connection,
    path: str,
    messages: str,
    where: str,
) -> None:
    before = await quota_used(gateway)
    body = f'{{"model": "gpt-4o-mini", "max_tokens": 5, "messages": {messages}}}'.encode()
    assert await post(gateway, path, body) == (
        400,
        openai_error(where, "invalid_unicode", surrogate_message(where)),
    )
    # The same in a body with a long field, as a long prompt has.
    large = body[:-1] + f', "user": "{PADDING}"}}'.encode()
    assert await post(gateway, path, large) == (
        400,
        openai_error(where, "invalid_unicode", surrogate_message(where)),
    )
    await assert_nothing_charged(gateway, pg, before, fake_upstream)


async def test_a_surrogate_in_utf8_bytes_is_refused_like_its_escape(
    gateway: RunningGateway, fake_upstream: FakeUpstream, pg: asyncpg.Connection
) -> None:
    """0xED 0xA0 0x80 is U+D800 written in UTF-8 (CESU-8): json.loads would take it."""
    before = await quota_used(gateway)
    body = b'{"model": "gpt-4o-mini", "input": ["ok", "\xed\xa0\x80"]}'
    assert await post(gateway, "/v1/embeddings", body) == (
        400,
        openai_error("input[1]", "invalid_unicode", surrogate_message("input[1]")),
    )
    await assert_nothing_charged(gateway, pg, before, fake_upstream)


async def test_a_lone_surrogate_on_the_anthropic_routes_in_their_shape(
    gateway: RunningGateway, fake_anthropic: FakeAnthropic, pg: asyncpg.Connection
) -> None:
    before = await quota_used(gateway)
    body = (
        b'{"model": "claude-native", "max_tokens": 5, "messages": [{"role": "user", "content": "\\ud800"}]}'
    )
    for path in ("/v1/messages", "/v1/messages/count_tokens"):
        assert await post(gateway, path, body) == (
            400,
            {
                "type": "error",
                "error": {
                    "type": "invalid_request_error",
                    "message": surrogate_message("messages[0].content"),
                },
            },
        )
    await assert_nothing_charged(gateway, pg, before, fake_anthropic)


@pytest.mark.parametrize(
    "content",
    [
        "\\ud83d\\ude00",  # an escaped pair: one emoji
        "\\\\ud800",  # a backslash and the letters ud800: text, not an escape
        "\U0001f600 caf\u00e9 \\n",  # raw UTF-8
    ],
)
async def test_text_that_only_looks_like_a_surrogate_is_served(
    gateway: RunningGateway, fake_upstream: FakeUpstream, content: str
) -> None:
    body = f'{{"model": "gpt-4o-mini", "max_tokens": 5, "messages": [{{"role": "user", "content": "{content}"}}]}}'
    status, answer = await post(gateway, "/v1/chat/completions", body.encode())
    assert status == 200, answer
    assert fake_upstream.requests[-1]["messages"][0]["content"] == json.loads(f'"{content}"')


lone = st.integers(0xD800, 0xDFFF).map(chr)
texts = st.lists(
    st.one_of(st.characters(), lone, st.sampled_from(["\\", '"', "\\u", "\ud83d\ude00"])), max_size=12
)


@settings(max_examples=500, deadline=None)
@given(pieces=texts, ensure_ascii=st.booleans())
def test_the_fast_check_never_misses_a_lone_surrogate(pieces: list[str], ensure_ascii: bool) -> None:
    """Whatever a JSON writer makes of a string (escapes, or UTF-8 with surrogatepass),
    the raw-bytes check says "maybe" whenever the parsed string holds a lone surrogate."""
    text = "".join(pieces)
    raw = json.dumps({"content": text}, ensure_ascii=ensure_ascii).encode("utf-8", "surrogatepass")
    parsed = json.loads(raw)["content"]
    if any(0xD800 <= ord(character) <= 0xDFFF for character in parsed):
        assert _may_hold_surrogates(raw), raw


def test_the_fast_check_sees_a_lone_surrogate_behind_an_escaped_backslash() -> None:
    # A text backslash, then "ud83d" as letters, then a lone low surrogate.
    raw = b'{"c": "\\\\ud83d\\ude00"}'
    assert json.loads(raw)["c"] == "\\ud83d\ude00"
    assert _may_hold_surrogates(raw)
    assert not _may_hold_surrogates(b'{"c": "\\ud83d\\ude00 and \\n"}')
    assert not _may_hold_surrogates(b'{"c": "plain"}')


# Header bytes ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "value"),
    [
        (b"anthropic-version", b"\xff"),
        (b"anthropic-version", b"2023-06-01\xff"),
        (b"anthropic-beta", b"prompt-caching-2024-07-31,\xff\xfe"),
        (b"anthropic-beta", "caf\u00e9".encode()),  # valid UTF-8, but not ASCII
    ],
)
async def test_a_forwarded_header_with_other_bytes_is_a_400_before_admission(
    gateway: RunningGateway,
    fake_anthropic: FakeAnthropic,
    fake_upstream: FakeUpstream,
    pg: asyncpg.Connection,
    header: bytes,
    value: bytes,
) -> None:
    before = await quota_used(gateway)
    name = header.decode()
    body = json.dumps({"model": "claude-native", "max_tokens": 5, "messages": HI}).encode()
    status, fields, answer = await raw_request(
        gateway,
        "POST",
        "/v1/messages",
        [f"x-api-key: {USER_KEY}".encode(), b"Content-Type: application/json", header + b": " + value],
        body,
    )
    assert status == 400
    assert json.loads(answer) == {
        "type": "error",
        "error": {
            "type": "invalid_request_error",
            "message": f"The {name} header must be printable ASCII characters.",
        },
    }
    assert fields["x-request-id"].startswith("req_")
    # The same header on an OpenAI route (it would be forwarded there too).
    body = json.dumps({"model": "gpt-4o-mini", "max_tokens": 5, "messages": HI}).encode()
    status, _, answer = await raw_request(
        gateway,
        "POST",
        "/v1/chat/completions",
        [f"Authorization: Bearer {USER_KEY}".encode(), header + b": " + value],
        body,
    )
    assert (status, json.loads(answer)) == (
        400,
        openai_error(name, "invalid_header", f"The {name} header must be printable ASCII characters."),
    )
    await assert_nothing_charged(gateway, pg, before, fake_anthropic, fake_upstream)


async def test_printable_forwarded_headers_still_reach_the_provider(
    gateway: RunningGateway, fake_anthropic: FakeAnthropic
) -> None:
    body = json.dumps({"model": "claude-native", "max_tokens": 5, "messages": HI}).encode()
    status, _, _ = await raw_request(
        gateway,
        "POST",
        "/v1/messages",
        [
            f"x-api-key: {USER_KEY}".encode(),
            b"anthropic-version: 2023-06-01",
            b"anthropic-beta: prompt-caching-2024-07-31, tools-2024-04-04",
        ],
        body,
    )
    assert status == 200
    seen = fake_anthropic.headers_seen[-1]
    assert seen["anthropic-version"] == "2023-06-01"
    assert seen["anthropic-beta"] == "prompt-caching-2024-07-31, tools-2024-04-04"


# Duplicate keys ----------------------------------------------------------------------


def duplicate_message(key: str, where: str) -> str:
    return (
        f"The key '{key}' is given more than once in the same JSON object (at {where}); send each key once."
    )


@pytest.mark.parametrize(
    ("body", "key", "where"),
    [
        (
            '{"model": "gpt-4o-mini", "model": "gpt-4", "max_tokens": 5, "messages": MESSAGES}',
            "model",
            "model",
        ),
        (
            '{"model": "gpt-4o-mini", "stream": false, "messages": MESSAGES, "stream": true}',
            "stream",
            "stream",
        ),
        (
            '{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi", "content": "x"}]}',
            "content",
            "messages[0].content",
        ),
        (
            '{"model": "gpt-4o-mini", "messages": MESSAGES, "stream_options": '
            '{"include_usage": false, "include_usage": true}, "stream": true}',
            "include_usage",
            "stream_options.include_usage",
        ),
    ],
)
async def test_a_key_given_twice_is_a_400_before_admission(
    gateway: RunningGateway,
    fake_upstream: FakeUpstream,
    pg: asyncpg.Connection,
    body: str,
    key: str,
    where: str,
) -> None:
    before = await quota_used(gateway)
    raw = body.replace("MESSAGES", json.dumps(HI)).encode()
    expected = (400, openai_error(where, "duplicate_key", duplicate_message(key, where)))
    assert await post(gateway, "/v1/chat/completions", raw) == expected
    assert await post(gateway, "/v1/tokens/count", raw) == expected
    await assert_nothing_charged(gateway, pg, before, fake_upstream)


async def test_a_top_level_key_given_twice_in_a_large_body_is_a_400(
    gateway: RunningGateway, fake_upstream: FakeUpstream, pg: asyncpg.Connection
) -> None:
    before = await quota_used(gateway)
    raw = (
        f'{{"model": "gpt-4o-mini", "messages": {json.dumps(HI)}, "user": "{PADDING}", "model": "gpt-4"}}'
    ).encode()
    assert await post(gateway, "/v1/chat/completions", raw) == (
        400,
        openai_error("model", "duplicate_key", duplicate_message("model", "model")),
    )
    await assert_nothing_charged(gateway, pg, before, fake_upstream)


async def test_a_nested_key_given_twice_in_a_large_body_is_a_400(
    gateway: RunningGateway, fake_upstream: FakeUpstream
) -> None:
    raw = (
        '{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi", "content": "x"}], '
        f'"user": "{PADDING}"}}'
    ).encode()
    status, _ = await post(gateway, "/v1/chat/completions", raw)
    assert status == 400


async def test_a_utf16_body_is_refused(gateway: RunningGateway, fake_upstream: FakeUpstream) -> None:
    """It would be forwarded as sent, in UTF-16, after being counted."""
    raw = json.dumps({"model": "gpt-4o-mini", "max_tokens": 5, "messages": HI}).encode("utf-16")
    assert await post(gateway, "/v1/chat/completions", raw) == (
        400,
        openai_error(
            None,
            "invalid_request_error",
            "We could not parse the JSON body of your request. Send valid JSON (UTF-8).",
        ),
    )
    assert fake_upstream.requests == []


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/tokens/count"])
async def test_a_compressed_body_is_a_415_before_it_is_inflated(
    gateway: RunningGateway, fake_upstream: FakeUpstream, pg: asyncpg.Connection, path: str
) -> None:
    """8 KB of gzip would inflate to a full body to parse and count; no SDK sends one."""
    before = await quota_used(gateway)
    prompt = "a" * 1_000_000
    raw = gzip.compress(
        json.dumps(
            {"model": "gpt-4o-mini", "max_tokens": 5, "messages": [{"role": "user", "content": prompt}]}
        ).encode()
    )
    assert len(raw) < 8_000
    assert await post(gateway, path, raw, {"Content-Encoding": "gzip"}) == (
        415,
        {
            "error": {
                "message": "Compressed request bodies are not accepted; send the JSON uncompressed.",
                "type": "invalid_request_error",
                "param": "Content-Encoding",
                "code": "unsupported_content_encoding",
            }
        },
    )
    assert await quota_used(gateway) == before
    assert await pg.fetchval("SELECT count(*) FROM usage_events") == 0
    assert fake_upstream.requests == []
    # Identity is no compression: served as usual.
    small = json.dumps({"model": "gpt-4o-mini", "max_tokens": 5, "messages": HI}).encode()
    status, _ = await post(gateway, "/v1/tokens/count", small, {"Content-Encoding": "identity"})
    assert status == 200


# Readiness ---------------------------------------------------------------------------


async def test_public_readiness_names_no_provider(gateway: RunningGateway) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{gateway.url}/health/ready") as response:
            assert response.status == 200
            assert await response.read() == b'{"status": "healthy"}'
        async with session.get(
            f"{gateway.url}/health/ready", headers={"Authorization": f"Bearer {ADMIN_KEY}"}
        ) as response:
            assert response.status == 200
            body = await response.json()
    upstreams = body["components"]["upstreams"]
    assert upstreams["status"] == "healthy"
    assert upstreams["circuits"] == {
        "fake": "closed",
        "azure": "closed",
        "anthropic": "closed",
        "mock": "closed",
    }
