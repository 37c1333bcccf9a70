"""Failed-authentication throttling: per client address, never refusing a valid key,
admin keys included, proxy headers believed only from trusted proxies, bad bytes a 401."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
from collections.abc import Mapping
from unittest import mock

import aiohttp
import asyncpg
import pytest
from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict

from gateway.auth import FailedAuthentications, hash_key
from gateway.client_address import client_address
from gateway.logs import REQUEST_LOGGER, JsonFormatter
from tests.conftest import ADMIN_KEY, USER_KEY, ConfigWriter, RunningGateway, StartGateway, _sha256, free_port

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}


async def call(
    session: aiohttp.ClientSession,
    url: str,
    key: str,
    headers: Mapping[str, str] | None = None,
) -> tuple[int, str, dict[str, str]]:
    """One chat request (or a GET on an /admin/ URL): status, error code, lowercased headers."""
    all_headers = {"Authorization": f"Bearer {key}", **(headers or {})}
    if "/admin/" in url:
        request = session.get(url, headers=all_headers)
    else:
        request = session.post(f"{url}/v1/chat/completions", headers=all_headers, json=CHAT)
    async with request as response:
        body = await response.json()
        code = body["error"]["code"] if response.status != 200 else ""
        return response.status, code, {name.lower(): value for name, value in response.headers.items()}


async def statuses(
    gateway: RunningGateway, keys: list[str], headers: Mapping[str, str] | None = None
) -> list[tuple[int, str]]:
    async with aiohttp.ClientSession() as session:
        return [
            (status, code) for status, code, _ in [await call(session, gateway.url, k, headers) for k in keys]
        ]


def guesses(count: int, start: int = 0) -> list[str]:
    return [f"gw-guess-{n:04d}" for n in range(start, start + count)]


WRONG = (401, "invalid_api_key")
THROTTLED = (429, "too_many_failed_authentications")
OK = (200, "")


# The limiter alone, on a clock of our own: exact figures.


def test_the_limit_th_failure_is_a_401_and_the_next_a_429_with_an_exact_retry_after() -> None:
    now = [1000.0]
    failures = FailedAuthentications(3, clock=lambda: now[0])
    answers = []
    for at in (0.0, 10.0, 20.0, 30.0, 35.0):
        now[0] = 1000.0 + at
        answers.append(failures.failed("203.0.113.7"))
    # Failures at 0, 10, 20 fill the limit; at 30 the last three are 10, 20, 30, so the
    # address is back under its limit 60 s after 10; at 35, 60 s after 20.
    assert answers == [None, None, None, 40.0, 45.0]
    now[0] = 1000.0 + 35.0 + 45.0  # failures at 30 and 35 remain within the minute
    assert failures.failed("203.0.113.7") is None
    assert failures.failed("198.51.100.1") is None  # addresses are counted apart


def test_a_zero_limit_counts_nothing_and_memory_is_bounded() -> None:
    assert all(FailedAuthentications(0).failed("203.0.113.7") is None for _ in range(100))
    failures = FailedAuthentications(2, max_addresses=3, clock=lambda: 5.0)
    for address in ("a", "b", "a", "c", "d"):  # "a" failed most recently but one: "b" goes first
        failures.failed(address)
    assert list(failures._failures) == ["a", "c", "d"]
    assert failures.failed("a") == 60.0 and len(failures._failures["a"]) == 2


# The client address, from requests made in memory.


def request_from(peer: str | None, headers: list[tuple[str, str]]) -> aiohttp.web.Request:
    transport = mock.Mock()
    transport.get_extra_info.side_effect = lambda name, default=None: (
        (peer, 40000) if name == "peername" and peer is not None else default
    )
    return make_mocked_request("GET", "/", headers=CIMultiDict(headers), transport=transport)


PROXIES = tuple(ipaddress.ip_network(cidr) for cidr in ("127.0.0.1/32", "10.0.0.0/8", "2001:db8:ffff::/48"))


@pytest.mark.parametrize(
    ("peer", "headers", "expected"),
    [
        # Not from a trusted proxy: headers are ignored.
        ("198.51.100.1", [("X-Forwarded-For", "203.0.113.7")], "198.51.100.1"),
        ("198.51.100.1", [("Forwarded", "for=203.0.113.7")], "198.51.100.1"),
        ("::ffff:198.51.100.1", [], "198.51.100.1"),
        (None, [("X-Forwarded-For", "203.0.113.7")], "unknown"),
        # From a trusted proxy: the right-most address that is not a trusted proxy.
        ("127.0.0.1", [], "127.0.0.1"),
        ("127.0.0.1", [("X-Forwarded-For", "203.0.113.7")], "203.0.113.7"),
        ("127.0.0.1", [("X-Forwarded-For", "1.2.3.4, 203.0.113.7")], "203.0.113.7"),
        ("127.0.0.1", [("X-Forwarded-For", "1.2.3.4, 203.0.113.7, 10.1.2.3")], "203.0.113.7"),
        ("127.0.0.1", [("X-Forwarded-For", "1.2.3.4"), ("X-Forwarded-For", "203.0.113.7")], "203.0.113.7"),
        ("::ffff:127.0.0.1", [("X-Forwarded-For", "203.0.113.7:51000")], "203.0.113.7"),
        ("127.0.0.1", [("X-Forwarded-For", "10.9.9.9, 10.1.2.3")], "10.9.9.9"),  # an inside client
        ("127.0.0.1", [("Forwarded", 'for="[2001:db8::1]"')], "2001:db8::1"),
        ("127.0.0.1", [("Forwarded", 'for="[2001:db8::1]:4711";proto=https')], "2001:db8::1"),
        ("127.0.0.1", [("Forwarded", "for=1.2.3.4, for=203.0.113.7;proto=https")], "203.0.113.7"),
        ("127.0.0.1", [("Forwarded", 'for="[2001:db8::1]", for="[2001:db8:ffff::5]"')], "2001:db8::1"),
        ("127.0.0.1", [("Forwarded", "proto=https"), ("X-Forwarded-For", "203.0.113.7")], "203.0.113.7"),
        # Both headers naming the same client: believed.
        ("127.0.0.1", [("Forwarded", "for=203.0.113.7"), ("X-Forwarded-For", "203.0.113.7")], "203.0.113.7"),
        # Malformed or unknown entries end the walk at the hop that wrote them.
        ("127.0.0.1", [("X-Forwarded-For", "203.0.113.7, not-an-address")], "127.0.0.1"),
        ("127.0.0.1", [("X-Forwarded-For", "203.0.113.7, 10.1.2.3, garbage")], "127.0.0.1"),
        ("127.0.0.1", [("X-Forwarded-For", "garbage, 10.1.2.3")], "10.1.2.3"),
        ("127.0.0.1", [("X-Forwarded-For", "")], "127.0.0.1"),
        ("127.0.0.1", [("Forwarded", "for=unknown")], "127.0.0.1"),
        ("127.0.0.1", [("Forwarded", "for=_hidden, for=203.0.113.7")], "203.0.113.7"),
        ("127.0.0.1", [("Forwarded", "for=203.0.113.7, for=_hidden")], "127.0.0.1"),
        ("127.0.0.1", [("Forwarded", 'for="[2001:db8::1"')], "127.0.0.1"),
        # The two headers naming different clients: one was made up; the peer answers.
        ("127.0.0.1", [("Forwarded", "for=198.51.100.1"), ("X-Forwarded-For", "203.0.113.7")], "127.0.0.1"),
    ],
)
def test_client_address(peer: str | None, headers: list[tuple[str, str]], expected: str) -> None:
    assert client_address(request_from(peer, headers), PROXIES) == expected


def test_without_trusted_proxies_every_header_is_ignored() -> None:
    headers = [("X-Forwarded-For", "203.0.113.7"), ("Forwarded", "for=203.0.113.7")]
    assert client_address(request_from("127.0.0.1", headers), ()) == "127.0.0.1"


# Through a running gateway.


async def test_a_valid_key_is_never_refused_after_failures_from_its_address(
    start_gateway: StartGateway, config_writer: ConfigWriter, pg: asyncpg.Connection
) -> None:
    config_writer.extra = "server: {auth_failures_per_minute: 20}\n"
    gateway = await start_gateway()
    # A key that lives only in the database and is not cached: the throttled path still looks it up.
    database_key = "gw-database-key-000001"
    await pg.execute(
        "INSERT INTO api_keys (key_id, key_sha256, user_id, team_id, created_at) "
        "VALUES ('key_db', $1, 'dora', NULL, now())",
        hash_key(database_key),
    )
    answers = await statuses(gateway, [*guesses(25), USER_KEY, database_key, *guesses(1, 25)])
    assert answers == [WRONG] * 20 + [THROTTLED] * 5 + [OK, OK, THROTTLED]


async def test_throttled_answers_carry_retry_after_and_the_reason(
    start_gateway: StartGateway,
    config_writer: ConfigWriter,
    pg: asyncpg.Connection,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    config_writer.extra = "server: {auth_failures_per_minute: 3}\n"
    gateway = await start_gateway()
    async with aiohttp.ClientSession() as session:
        answers = [await call(session, gateway.url, key) for key in guesses(4)]
    assert [(status, code) for status, code, _ in answers] == [WRONG] * 3 + [THROTTLED]
    headers = answers[3][2]
    # 60 s after the second failure, made a moment ago.
    assert 55 <= int(headers["retry-after"]) <= 60 and headers["x-should-retry"] == "false", headers
    lines = [json.loads(JsonFormatter().format(r)) for r in caplog.records if r.name == REQUEST_LOGGER]
    assert [(line["status"], line.get("client_address")) for line in lines] == [
        (401, "127.0.0.1"),
        (401, "127.0.0.1"),
        (401, "127.0.0.1"),
        (429, "127.0.0.1"),
    ]


async def test_the_throttled_answer_says_why_the_key_failed(
    start_gateway: StartGateway, config_writer: ConfigWriter, pg: asyncpg.Connection
) -> None:
    config_writer.extra = "server: {auth_failures_per_minute: 1}\n"
    gateway = await start_gateway()
    async with aiohttp.ClientSession() as session:
        await call(session, gateway.url, "gw-guess-0")
        async with session.post(
            f"{gateway.url}/v1/chat/completions", headers={"Authorization": "Bearer gw-guess-1"}, json=CHAT
        ) as response:
            message = (await response.json())["error"]["message"]
    assert message == (
        "Too many failed authentications from this address; this one: "
        f"Incorrect API key provided (sha256 prefix {hash_key('gw-guess-1')[:8]})."
    )


async def test_admin_key_guesses_are_counted_and_throttled(
    start_gateway: StartGateway, config_writer: ConfigWriter, pg: asyncpg.Connection
) -> None:
    config_writer.extra = "server: {auth_failures_per_minute: 4}\n"
    gateway = await start_gateway()
    admin_url = f"{gateway.url}/admin/usage"
    async with aiohttp.ClientSession() as session:
        answers = [(await call(session, admin_url, key))[:2] for key in guesses(9)]
        right = (await call(session, admin_url, ADMIN_KEY))[:2]
        # One limiter per address for both kinds of key.
        user_guess = (await call(session, gateway.url, "gw-guess-user"))[:2]
        user = (await call(session, gateway.url, USER_KEY))[:2]
    assert answers == [WRONG] * 4 + [THROTTLED] * 5
    assert (right, user_guess, user) == (OK, THROTTLED, OK)


async def test_admin_key_guesses_on_the_admin_site_are_throttled(
    start_gateway: StartGateway, config_writer: ConfigWriter, pg: asyncpg.Connection
) -> None:
    admin_port = free_port()
    config_writer.extra = (
        "server: {auth_failures_per_minute: 2}\n"
        f"admin: {{key_sha256: {_sha256(ADMIN_KEY)}, host: 127.0.0.1, port: {admin_port}}}\n"
    )
    await start_gateway()
    admin_url = f"http://127.0.0.1:{admin_port}/admin/usage"
    async with aiohttp.ClientSession() as session:
        answers = [(await call(session, admin_url, key))[:2] for key in [*guesses(3), ADMIN_KEY]]
    assert answers == [WRONG, WRONG, THROTTLED, OK]


async def test_behind_a_trusted_proxy_each_forwarded_client_is_counted_apart(
    start_gateway: StartGateway, config_writer: ConfigWriter, pg: asyncpg.Connection
) -> None:
    config_writer.extra = 'server: {auth_failures_per_minute: 3, trusted_proxies: ["127.0.0.1/32"]}\n'
    gateway = await start_gateway()
    guesser = {"X-Forwarded-For": "203.0.113.7"}
    assert await statuses(gateway, guesses(4), guesser) == [WRONG] * 3 + [THROTTLED]
    # Another client behind the same proxy, and the proxy's own address, are unaffected.
    assert await statuses(gateway, guesses(3, 10), {"X-Forwarded-For": "198.51.100.9"}) == [WRONG] * 3
    assert await statuses(gateway, guesses(1, 20)) == [WRONG]
    # What the guesser writes to the left of the proxy's entry changes nothing.
    spoofed = {"X-Forwarded-For": "1.2.3.4, 203.0.113.7"}
    assert await statuses(gateway, [*guesses(1, 30), USER_KEY], spoofed) == [THROTTLED, OK]
    # A client claiming to be the guesser is judged by the address the proxy saw.
    framing = {"X-Forwarded-For": "203.0.113.7, 192.0.2.55"}
    assert await statuses(gateway, guesses(1, 40), framing) == [WRONG]
    # RFC 7239: the same address with a port, and an IPv6 client.
    assert await statuses(gateway, guesses(1, 50), {"Forwarded": 'for="203.0.113.7:4711"'}) == [THROTTLED]
    ipv6 = {"Forwarded": 'for="[2001:db8::1]"'}
    assert await statuses(gateway, guesses(4, 60), ipv6) == [WRONG] * 3 + [THROTTLED]
    assert await statuses(gateway, guesses(1, 70), {"X-Forwarded-For": "2001:db8:0::1"}) == [THROTTLED]


async def test_without_trusted_proxies_forwarded_headers_are_ignored(
    start_gateway: StartGateway, config_writer: ConfigWriter, pg: asyncpg.Connection
) -> None:
    config_writer.extra = "server: {auth_failures_per_minute: 3}\n"
    gateway = await start_gateway()
    answers = []
    for n, claimed in enumerate(["203.0.113.7", "198.51.100.9", "192.0.2.1", "192.0.2.2"]):
        headers = {"X-Forwarded-For": claimed, "Forwarded": f"for={claimed}"}
        answers += await statuses(gateway, guesses(1, n), headers)
    assert answers == [WRONG] * 3 + [THROTTLED]  # all four counted to 127.0.0.1


async def test_disagreeing_proxy_headers_are_counted_to_the_peer(
    start_gateway: StartGateway, config_writer: ConfigWriter, pg: asyncpg.Connection
) -> None:
    config_writer.extra = 'server: {auth_failures_per_minute: 3, trusted_proxies: ["127.0.0.1"]}\n'
    gateway = await start_gateway()
    answers = []
    for n in range(3):  # a different made-up Forwarded client each time
        headers = {"X-Forwarded-For": "203.0.113.7", "Forwarded": f"for=192.0.2.{n}"}
        answers += await statuses(gateway, guesses(1, n), headers)
    answers += await statuses(gateway, guesses(1, 10))  # the proxy's own address, no headers
    answers += await statuses(gateway, guesses(1, 20), {"X-Forwarded-For": "203.0.113.7"})
    assert answers == [WRONG] * 3 + [THROTTLED, WRONG]


# Bytes no SDK sends.


async def raw_request(gateway: RunningGateway, head: bytes) -> tuple[int, bytes]:
    host, port = gateway.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    body = json.dumps(CHAT).encode()
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + head
        + b"\r\nContent-Length: "
        + str(len(body)).encode()
        + b"\r\nConnection: close\r\n\r\n"
        + body
    )
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    status_line, _, rest = answer.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]


BAD_BYTES = [
    b"Authorization: Bearer gw-\xff\xfe-key",
    b"Authorization: Bearer \xff",
    b"x-api-key: gw-\xff-key",
    b"Authorization: Bearer gw-\xc3\xbf-key",  # UTF-8 for a non-ASCII character
    b"x-api-key: gw-\x80",
]


async def test_bad_bytes_in_a_key_are_a_counted_401(
    start_gateway: StartGateway, config_writer: ConfigWriter, pg: asyncpg.Connection
) -> None:
    config_writer.extra = f"server: {{auth_failures_per_minute: {len(BAD_BYTES)}}}\n"
    gateway = await start_gateway()
    answers = [await raw_request(gateway, head) for head in BAD_BYTES]
    assert [status for status, _ in answers] == [401] * len(BAD_BYTES), answers
    assert all(json.loads(body)["error"]["code"] == "invalid_api_key" for _, body in answers)
    status, body = await raw_request(gateway, b"Authorization: Bearer gw-\xff-once-more")
    assert (status, json.loads(body)["error"]["code"]) == THROTTLED
    assert (await raw_request(gateway, b"Authorization: Bearer " + USER_KEY.encode()))[0] == 200


@pytest.mark.parametrize("byte", [b"\x00", b"\x01", b"\x7f"])
async def test_control_bytes_never_reach_authentication(
    start_gateway: StartGateway, config_writer: ConfigWriter, pg: asyncpg.Connection, byte: bytes
) -> None:
    gateway = await start_gateway()
    status, _ = await raw_request(gateway, b"Authorization: Bearer gw-" + byte + b"-key")
    assert status == 400  # aiohttp's HTTP parser refuses them in a header value


async def test_non_latin_1_keys_from_a_client_are_a_401(
    start_gateway: StartGateway, config_writer: ConfigWriter, pg: asyncpg.Connection
) -> None:
    gateway = await start_gateway()
    async with aiohttp.ClientSession() as session:
        answers = [
            (await call(session, gateway.url, key))[:2]
            for key in ["gw-\xff-key", "gw-\u20ac-key", "gw-\U0001f511"]
        ]
        x_api_key = await session.post(
            f"{gateway.url}/v1/messages",
            headers={"x-api-key": "gw-\xff-key", "anthropic-version": "2023-06-01"},
            json={"model": "claude-sonnet", "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]},
        )
        anthropic = (x_api_key.status, (await x_api_key.json())["error"]["type"])
    assert answers == [WRONG] * 3
    assert anthropic == (401, "authentication_error")
