"""Hostile input: random and malformed bodies and header bytes on every public route.
Never a 500, never a crash; every refusal is a documented 4xx in the route's error shape,
and leaves no charge: no quota used or reserved, no ledger row."""

from __future__ import annotations

import asyncio
import json
import re
import sqlite3
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from gateway import state
from gateway.app import create_app
from gateway.config import load_config
from tests.conftest import USER_KEY, _sha256
from tests.strategies import json_values

ROUTES = [
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/responses",
    "/v1/messages",
    "/v1/messages/count_tokens",
    "/v1/tokens/count",
]
GET_ROUTES = ["/v1/models", "/v1/quota", "/health", "/health/ready", "/metrics"]
# A body each POST route would serve, so that only the hostile part can be refused.
VALID_BODIES = {
    "/v1/chat/completions": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
    "/v1/completions": {"model": "gpt-4o-mini", "prompt": "hi"},
    "/v1/embeddings": {"model": "gpt-4o-mini", "input": "hi"},
    "/v1/responses": {"model": "gpt-4o-mini", "input": "hi"},
    "/v1/messages": {"model": "mock-claude", "messages": [{"role": "user", "content": "hi"}]},
    "/v1/messages/count_tokens": {"model": "mock-claude", "messages": [{"role": "user", "content": "hi"}]},
    "/v1/tokens/count": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
}
DOCUMENTED = set(
    re.findall(
        r"^\| `([a-z_]+)` \|", (Path(__file__).resolve().parents[1] / "docs" / "errors.md").read_text(), re.M
    )
)
ALLOWED_STATUSES = {200, 400, 401, 403, 404, 405, 413, 429}

message = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "assistant", "system", "tool", "nobody", ""]), "content": json_values}
)
bodies = st.one_of(
    json_values,
    st.fixed_dictionaries(
        {
            "model": st.one_of(st.sampled_from(["gpt-4o-mini", "mock-claude", "nope"]), json_values),
            "messages": st.one_of(st.lists(message, max_size=4), json_values),
        },
        optional={
            "max_tokens": st.one_of(st.integers(-(2**70), 2**70), json_values),
            "stream": json_values,
            "prompt": json_values,
            "input": json_values,
            "tools": json_values,
            "n": json_values,
            "stream_options": json_values,
            "system": json_values,
        },
    ),
)


@dataclass
class Answer:
    status: int
    body: bytes
    # x-gateway-request-id: on every answer of the gateway's to an API route and on
    # every error it makes; never on aiohttp's own refusals.
    request_id: str | None
    # Whether it carries rate-limit headers: the request was admitted (and then, if this
    # is an error, refused by the provider), or refused by the admission itself.
    admitted: bool = False


RATELIMIT_HEADERS = ("x-ratelimit-limit-requests", "anthropic-ratelimit-requests-limit")


class Gateway:
    """One embedded gateway on its own event loop, for many hypothesis examples."""

    def __init__(self, directory: Path) -> None:
        (directory / "policies").mkdir()
        (directory / "policies" / "p.yaml").write_text(
            "policies:\n  - {name: roomy, scope: user, limits: [{requests: 1000000, per: minute},"
            " {tokens: 1000000000, per: day}, {concurrent: 1000}]}\n"
        )
        (directory / "gateway.yaml").write_text(
            "server: {max_body_bytes: 524288, auth_failures_per_minute: 0}\n"
            "providers: {mock: {type: mock}}\n"
            "models:\n  gpt-4o-mini: {provider: mock}\n  mock-claude: {provider: mock, upstream_model: claude-sonnet-4-5}\n"
            f"keys: [{{id: k, sha256: {_sha256(USER_KEY)}, user: u}}]\n"
            "ledger: {flush_interval_seconds: 0.01}\n"
        )
        self.loop = asyncio.new_event_loop()
        self.app = create_app(load_config(directory / "gateway.yaml"))
        self.server = TestServer(self.app)
        self.loop.run_until_complete(self.server.start_server())
        self.session = self.loop.run_until_complete(self._session())
        self.ledger = sqlite3.connect(directory / "var" / "gateway.db")

    async def _session(self) -> aiohttp.ClientSession:
        return aiohttp.ClientSession()

    def post(self, path: str, data: bytes, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        async def call() -> Answer:
            sent = {
                "Authorization": f"Bearer {USER_KEY}",
                "Content-Type": "application/json",
                **(headers or {}),
            }
            async with self.session.post(self.server.make_url(path), data=data, headers=sent) as response:
                return Answer(
                    response.status,
                    await response.read(),
                    response.headers.get("x-gateway-request-id"),
                    any(name in response.headers for name in RATELIMIT_HEADERS),
                )

        answer = self.uncharged_if_refused(call)
        return answer.status, answer.body

    def raw(self, method: str, path: str, headers: list[bytes], body: bytes = b"") -> list[Answer]:
        """Sent byte for byte (aiohttp's client checks header values); every answer that
        comes back (a CR or LF in a header value can make one request two)."""

        async def call() -> list[Answer]:
            reader, writer = await asyncio.open_connection(self.server.host, self.server.port)
            head = [f"{method} {path} HTTP/1.1".encode(), b"Host: fuzz", b"Connection: close", *headers]
            head.append(f"Content-Length: {len(body)}".encode())
            writer.write(b"\r\n".join(head) + b"\r\n\r\n" + body)
            received = await reader.read()
            writer.close()
            await writer.wait_closed()
            return split_answers(received)

        answers: list[Answer] = []

        async def first() -> Answer:
            answers.extend(await call())
            return answers[0]

        self.uncharged_if_refused(first)
        return answers

    def uncharged_if_refused(self, send: Callable[[], Awaitable[Answer]]) -> Answer:
        """Send; a refusal (4xx) leaves nothing charged, reserved or recorded. One the
        provider made after admission (the mock serves no /v1/responses) may count as a
        request, as at OpenAI, and leaves a ledger row, with no tokens."""

        async def call() -> Answer:
            before = await self.quota()
            answer = await send()
            if answer.status < 400:
                return answer
            after = await self.quota()
            if answer.admitted and answer.status != 429:
                before = [limit for limit in before if not limit[0].startswith("requests")]
                after = [limit for limit in after if not limit[0].startswith("requests")]
            assert after == before, (answer.status, answer.body[:200])
            await self.app[state.LEDGER].flush()
            if answer.request_id is not None:
                recorded = self.ledger.execute(
                    "SELECT coalesce(prompt_tokens, 0) + coalesce(completion_tokens, 0) FROM usage_events"
                    " WHERE request_id = ?",
                    (answer.request_id,),
                ).fetchall()
                assert recorded == ([(0,)] if answer.admitted and answer.status != 429 else []), (
                    answer.status,
                    answer.body[:200],
                )
            return answer

        return self.loop.run_until_complete(call())

    async def quota(self) -> list[tuple[str, int, int]]:
        """(limit, used, reserved) of the fuzzing user, every request so far settled."""
        await self.app[state.SETTLEMENT].drain()
        limits = self.app[state.POLICIES].current.limits_of_subject("user", "u")
        readings = await self.app[state.QUOTA].limiter.read(limits)
        return [(reading.limit.rule.label, reading.used, reading.reserved) for reading in readings]

    def close(self) -> None:
        self.ledger.close()
        self.loop.run_until_complete(self.session.close())
        self.loop.run_until_complete(self.server.close())
        self.loop.close()


def split_answers(received: bytes) -> list[Answer]:
    """The HTTP/1.1 answers in what a connection received, in order."""
    answers: list[Answer] = []
    while received:
        top, _, rest = received.partition(b"\r\n\r\n")
        status_line, *lines = top.decode("latin-1").split("\r\n")
        fields = {
            name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)
        }
        length = int(fields.get("content-length", len(rest)))
        answers.append(
            Answer(
                int(status_line.split()[1]),
                rest[:length],
                fields.get("x-gateway-request-id"),
                any(name in fields for name in RATELIMIT_HEADERS),
            )
        )
        received = rest[length:]
    return answers


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    running = Gateway(tmp_path_factory.mktemp("fuzz"))
    yield running
    running.close()


def check_answer(path: str, status: int, body: bytes) -> None:
    assert status in ALLOWED_STATUSES, (status, body[:300])
    if status == 200:
        return
    parsed: Any = json.loads(body)
    if path.startswith("/v1/messages"):
        assert parsed["type"] == "error" and isinstance(parsed["error"]["message"], str)
    else:
        error = parsed["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["code"] in DOCUMENTED, error


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(route=st.sampled_from(ROUTES), body=bodies, large=st.booleans())
def test_random_json_bodies(gateway: Gateway, route: str, body: Any, large: bool) -> None:
    if large and isinstance(body, dict):
        # A long field, as a long prompt is: its text passed through, values changed around it.
        body = {**body, "user": "u" * 4096}
    status, answer = gateway.post(route, json.dumps(body).encode())
    check_answer(route, status, answer)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(route=st.sampled_from(ROUTES), data=st.binary(max_size=300))
def test_random_bytes(gateway: Gateway, route: str, data: bytes) -> None:
    status, answer = gateway.post(route, data)
    check_answer(route, status, answer)


@pytest.mark.parametrize(
    ("name", "payload", "expected"),
    [
        ("deep nesting", b"[" * 100_000 + b"]" * 100_000, {400, 413}),
        ("deep object", b'{"model": "gpt-4o-mini", "messages": ' + b"[" * 5000 + b"]" * 5000 + b"}", {400}),
        (
            "huge number",
            b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1'
            + b"0" * 4000
            + b"}",
            {400},
        ),
        ("1 MB model", json.dumps({"model": "m" * 1_000_000, "messages": []}).encode(), {413}),
        (
            "60k model",
            json.dumps({"model": "m" * 60_000, "messages": [{"role": "user", "content": "x"}]}).encode(),
            {404},
        ),
        (
            "absurd max_tokens",
            json.dumps(
                {
                    "model": "gpt-4o-mini",
                    "messages": [{"role": "user", "content": "hi"}],
                    "max_tokens": 10**15,
                }
            ).encode(),
            {400},
        ),
        (
            "thousands of messages",
            json.dumps(
                {
                    "model": "gpt-4o-mini",
                    "messages": [{"role": "user", "content": "a"}] * 3000,
                    "max_tokens": 1,
                }
            ).encode(),
            {200},
        ),
        ("invalid utf-8", b'{"model": "\xff\xfe"}', {400}),
        (
            "nan",
            b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": NaN}',
            {400},
        ),
        ("utf-16", json.dumps({"model": "gpt-4o-mini"}).encode("utf-16"), {400}),
    ],
)
def test_hostile_bodies(gateway: Gateway, name: str, payload: bytes, expected: set[int]) -> None:
    for route in ("/v1/chat/completions", "/v1/messages"):
        status, answer = gateway.post(route, payload)
        assert status in expected | ({400} if route == "/v1/messages" else set()), (
            name,
            route,
            status,
            answer[:200],
        )
        check_answer(route, status, answer)


def test_hostile_headers(gateway: Gateway) -> None:
    body = json.dumps(
        {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    ).encode()
    cases = [
        {"Authorization": "Bearer " + "x" * 8000},
        {"Authorization": "Basic dXNlcjpwYXNz"},
        {"Authorization": ""},
        {"X-Request-Id": "x" * 5000},
        {"x-api-key": " "},
    ]
    for headers in cases:
        status, answer = gateway.post("/v1/chat/completions", body, headers)
        check_answer("/v1/chat/completions", status, answer)


HEADER_NAMES = [
    "Authorization",
    "x-api-key",
    "anthropic-version",
    "anthropic-beta",
    "Content-Type",
    "X-Request-Id",
    "X-Client-Request-Id",
]
# Any byte; and, more often, bytes HTTP's parser lets through (visible ASCII, tab, space
# and 0x80-0xff, which aiohttp hands over as lone surrogates), so most examples reach
# the handlers.
PASSING_BYTES = bytes([0x09, *range(0x20, 0x7F), *range(0x80, 0x100)])
header_values = st.one_of(
    st.binary(max_size=40),
    st.lists(st.sampled_from(PASSING_BYTES), max_size=40).map(bytes),
    st.tuples(
        st.sampled_from([b"Bearer ", b"Bearer " + USER_KEY.encode(), b"2023-06-01", b"application/json"]),
        st.lists(st.sampled_from(PASSING_BYTES), max_size=8).map(bytes),
    ).map(b"".join),
)


def check_raw_answer(path: str, answer: Answer) -> None:
    if answer.status >= 400 and answer.request_id is None:
        # Every error of the gateway's carries its request id; this one is aiohttp's HTTP
        # parser refusing the request before any handler ran: a plain-text 400 (aiohttp
        # has no hook for its shape). Nothing was read, counted or charged.
        assert answer.status == 400, answer
        return
    check_answer(path, answer.status, answer.body)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    route=st.sampled_from(ROUTES + GET_ROUTES),
    name=st.sampled_from(HEADER_NAMES),
    value=header_values,
    authorized=st.booleans(),
)
def test_random_header_bytes(gateway: Gateway, route: str, name: str, value: bytes, authorized: bool) -> None:
    """Any bytes in a header the gateway reads or forwards, on every route, with a body
    that route would serve: never a 500, and a refusal charges nothing."""
    headers = [name.encode() + b": " + value]
    if authorized and name.lower() not in ("authorization", "x-api-key"):
        headers.append(f"Authorization: Bearer {USER_KEY}".encode())
    if route in GET_ROUTES:
        answers = gateway.raw("GET", route, headers)
    else:
        answers = gateway.raw("POST", route, headers, json.dumps(VALID_BODIES[route]).encode())
    assert answers
    for answer in answers:
        check_raw_answer(route, answer)
    event("refused by aiohttp's parser" if answers[0].request_id is None else "answered by the gateway")


lone_surrogates = st.integers(0xD800, 0xDFFF).map(chr)
# Text with lone surrogates among other characters (two in a row may happen to pair up).
hostile_text = st.lists(st.one_of(st.characters(), lone_surrogates), min_size=1, max_size=8).map("".join)
hostile_strings = st.one_of(st.text(max_size=10), hostile_text)
hostile_values = st.recursive(
    st.none() | st.booleans() | st.integers(0, 100) | hostile_strings,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(hostile_strings, children, max_size=4),
    max_leaves=12,
)
hostile_message = st.fixed_dictionaries(
    {"role": st.one_of(st.sampled_from(["user", "assistant"]), hostile_strings), "content": hostile_values},
    optional={"name": hostile_strings},
)
hostile_bodies = st.fixed_dictionaries(
    {
        "model": st.one_of(st.sampled_from(["gpt-4o-mini", "mock-claude"]), hostile_strings),
        "messages": st.lists(hostile_message, min_size=1, max_size=3),
    },
    optional={
        "input": hostile_values,
        "prompt": hostile_values,
        "system": hostile_values,
        "user": hostile_strings,
        "max_tokens": st.just(5),
        "stream": st.booleans(),
        "metadata": hostile_values,
    },
)


def holds_lone_surrogate(value: Any) -> bool:
    if isinstance(value, str):
        return any(0xD800 <= ord(character) <= 0xDFFF for character in value)
    if isinstance(value, dict):
        return any(holds_lone_surrogate(key) or holds_lone_surrogate(item) for key, item in value.items())
    if isinstance(value, list):
        return any(holds_lone_surrogate(item) for item in value)
    return False


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    route=st.sampled_from(ROUTES + GET_ROUTES),
    body=hostile_bodies,
    escaped=st.booleans(),
    large=st.booleans(),
)
def test_lone_surrogates_in_json_bodies(
    gateway: Gateway, route: str, body: Any, escaped: bool, large: bool
) -> None:
    """Lone surrogates anywhere in a JSON body, escaped (\\ud800) or as their UTF-8 bytes
    (0xED 0xA0 0x80), on every route: a POST route refuses them, exactly, before counting."""
    if large:
        body = {**body, "padding": "u" * 4096}
    raw = json.dumps(body, ensure_ascii=escaped).encode("utf-8", "surrogatepass")
    if route in GET_ROUTES:
        answers = gateway.raw("GET", route, [f"Authorization: Bearer {USER_KEY}".encode()], raw)
        assert len(answers) == 1
        check_raw_answer(route, answers[0])
        return
    status, answer = gateway.post(route, raw)
    check_answer(route, status, answer)
    lone = holds_lone_surrogate(json.loads(raw))
    event("with a lone surrogate" if lone else "without")
    if lone:
        assert status == 400, answer[:300]
        parsed = json.loads(answer)
        if route.startswith("/v1/messages"):
            assert parsed["error"]["type"] == "invalid_request_error"
            assert "lone UTF-16 surrogate" in parsed["error"]["message"]
        else:
            assert parsed["error"]["code"] == "invalid_unicode", parsed


def rss_mb() -> float:
    fields = dict(
        line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line
    )
    return int(fields["VmRSS"].split()[0]) / 1024


def test_memory_stays_bounded_under_hostile_load(gateway: Gateway) -> None:
    """2,000 large hostile bodies in a row: the process (client and gateway) does not keep them."""
    import random

    generator = random.Random(7)
    big_array = json.dumps(
        {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x" * 100}] * 2000}
    ).encode()
    deep = b"[" * 50_000 + b"]" * 50_000
    payloads = [big_array, deep, b"\xff" * 60_000, json.dumps({"model": "m" * 400_000}).encode()]
    for _ in range(200):  # warm up: caches and pools reach their working size
        gateway.post("/v1/chat/completions", generator.choice(payloads))
    before = rss_mb()
    for _ in range(2_000):
        status, _ = gateway.post(generator.choice(ROUTES), generator.choice(payloads))
        assert status in ALLOWED_STATUSES
    growth = rss_mb() - before
    print(f"\nRSS {before:.1f} MB before, growth {growth:.1f} MB over 2,000 hostile requests")
    assert growth < 32, f"RSS grew by {growth:.1f} MB over 2,000 hostile requests"
