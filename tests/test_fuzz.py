"""Hostile input: random and malformed bodies on every public route. Never a 500, never a
crash; every refusal is a documented 4xx in the route's error shape."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.app import create_app
from gateway.config import load_config
from gateway.jsontext import SPANS_FROM_BYTES
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


class Gateway:
    """One embedded gateway on its own event loop, for many hypothesis examples."""

    def __init__(self, directory: Path) -> None:
        (directory / "policies").mkdir()
        (directory / "policies" / "p.yaml").write_text(
            "policies:\n  - {name: roomy, scope: user, limits: [{requests: 1000000, per: minute}]}\n"
        )
        (directory / "gateway.yaml").write_text(
            "server: {max_body_bytes: 524288, auth_failures_per_minute: 0}\n"
            "providers: {mock: {type: mock}}\n"
            "models:\n  gpt-4o-mini: {provider: mock}\n  mock-claude: {provider: mock, upstream_model: claude-sonnet-4-5}\n"
            f"keys: [{{id: k, sha256: {_sha256(USER_KEY)}, user: u}}]\n"
        )
        self.loop = asyncio.new_event_loop()
        self.server = TestServer(create_app(load_config(directory / "gateway.yaml")))
        self.loop.run_until_complete(self.server.start_server())
        self.session = self.loop.run_until_complete(self._session())

    async def _session(self) -> aiohttp.ClientSession:
        return aiohttp.ClientSession()

    def post(self, path: str, data: bytes, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        async def call() -> tuple[int, bytes]:
            sent = {
                "Authorization": f"Bearer {USER_KEY}",
                "Content-Type": "application/json",
                **(headers or {}),
            }
            async with self.session.post(self.server.make_url(path), data=data, headers=sent) as response:
                return response.status, await response.read()

        return self.loop.run_until_complete(call())

    def close(self) -> None:
        self.loop.run_until_complete(self.session.close())
        self.loop.run_until_complete(self.server.close())
        self.loop.close()


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
        # Past jsontext.SPANS_FROM_BYTES: parsed with spans, changed in the caller's text.
        body = {**body, "user": "u" * SPANS_FROM_BYTES}
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
