"""Shared fixtures: real Redis, real PostgreSQL, a fake provider, and gateways built on them.

Redis and PostgreSQL come from REDIS_URL / DATABASE_URL (scripts/test sets them), or
from the standard local ports when GATEWAY_TEST_LOCAL_SERVICES=1 says they may be
used. When they do not answer, tests fail loudly; nothing is mocked. Tests write only
into a database of their own (created and dropped) and under this session's Redis key
prefix (deleted at the end).

Tiers: each test is marked here, so nobody has to remember to. `services` marks a test
that needs Redis or PostgreSQL or a server or tool that scripts/test installs; `bench`
marks the benchmark smoke tests; `slow`, the few that take seconds each without any
server. `./scripts/test --fast` runs the rest.
"""

from __future__ import annotations

import asyncio
import os
import socket
import textwrap
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import asyncpg
import openai
import pytest
import redis.asyncio as redis_asyncio
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway import state
from gateway.app import create_app
from gateway.config import GatewayConfig, load_config
from tests.fakes.anthropic_upstream import FakeAnthropic
from tests.fakes.openai_upstream import FakeUpstream

_SHARED_TIKTOKEN_CACHE = Path(__file__).resolve().parents[2] / "shared" / "tiktoken-cache"
if "TIKTOKEN_CACHE_DIR" not in os.environ and _SHARED_TIKTOKEN_CACHE.is_dir():
    # tiktoken reads this when an encoding is first loaded: no test may download one.
    os.environ["TIKTOKEN_CACHE_DIR"] = str(_SHARED_TIKTOKEN_CACHE)

# Without REDIS_URL / DATABASE_URL, the local servers are used only when the developer
# says so: they may hold data of their own.
LOCAL_SERVICES = os.environ.get("GATEWAY_TEST_LOCAL_SERVICES") == "1"
REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
DATABASE_URL = os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
# Every key a test gateway writes starts with this, so that the keys of one run can be
# told apart from anyone else's and deleted when it ends.
REDIS_KEY_PREFIX = f"gwtest:{uuid.uuid4().hex[:8]}:"
PROVIDER_KEY = "sk-fake-provider-key-for-tests"
ANTHROPIC_PROVIDER_KEY = "sk-ant-fake-provider-key"
USER_KEY = "gw-test-key-alice"
OTHER_KEY = "gw-test-key-bob"
ADMIN_KEY = "gw-test-admin-key"
# A fixed quota clock on a whole minute: reset and retry figures become exact.
T0_MS = 1_800_000_000_000


def _sha256(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()


# ---------------------------------------------------------------- tiers

# A test that uses one of these fixtures (directly or through others) needs the servers.
SERVICE_FIXTURES = frozenset({"redis_url", "database_url"})
# A test module naming one of these starts a server of its own or runs a tool that only
# scripts/test installs (redis-server, promtool, psql, ...).
SYSTEM_TOOLS = ("redis-server", "redis-cli", "promtool", "psql", "nginx", "wrk", "valgrind")
BENCH_MODULES = frozenset({"test_bench_smoke.py"})
# Tests that need no server but take seconds each (fuzzing, thousands of requests, a
# property tried hundreds of times): the full tier runs them, the fast tier does not.
SLOW_TESTS = (
    "tests/test_fuzz.py::",
    "tests/test_jsontext.py::test_parse_gives_what_json_loads_gives_and_each_values_span",
)


@cache
def _names_a_system_tool(path: Path) -> bool:
    source = path.read_text()
    return any(f'"{tool}"' in source for tool in SYSTEM_TOOLS)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.name in BENCH_MODULES:
            item.add_marker(pytest.mark.bench)
        if item.nodeid.startswith(SLOW_TESTS):
            item.add_marker(pytest.mark.slow)
        fixtures = set(getattr(item, "fixturenames", ()))
        if fixtures & SERVICE_FIXTURES or _names_a_system_tool(item.path):
            item.add_marker(pytest.mark.services)


# ---------------------------------------------------------------- servers


def _require_service(variable: str, url: str) -> None:
    """Fails the test when no server was named and the local ones were not allowed."""
    if variable not in os.environ and not LOCAL_SERVICES:
        pytest.fail(
            f"{variable} is not set: run the tests with scripts/test (it starts throwaway servers), "
            f"or set GATEWAY_TEST_LOCAL_SERVICES=1 to use the local server at {url}"
        )


async def _delete_keys(url: str, pattern: str) -> None:
    client = redis_asyncio.Redis.from_url(url, socket_connect_timeout=3)
    try:
        batch: list[bytes] = []
        async for key in client.scan_iter(match=pattern, count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                await client.delete(*batch)
                batch.clear()
        if batch:
            await client.delete(*batch)
    finally:
        await client.aclose()


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """The Redis of this session; the keys under REDIS_KEY_PREFIX are deleted at the end."""
    _require_service("REDIS_URL", REDIS_URL)

    async def ping() -> None:
        client = redis_asyncio.Redis.from_url(REDIS_URL, socket_connect_timeout=3)
        try:
            await client.ping()
        finally:
            await client.aclose()

    try:
        asyncio.run(ping())
    except Exception as exc:
        pytest.fail(f"Redis at {REDIS_URL} does not answer ({exc}); run the tests with scripts/test")
    yield REDIS_URL
    asyncio.run(_delete_keys(REDIS_URL, f"{REDIS_KEY_PREFIX}*"))


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    """A fresh database for this test session, dropped at the end."""
    _require_service("DATABASE_URL", DATABASE_URL)
    name = f"gateway_test_{uuid.uuid4().hex[:10]}"

    async def admin(sql: str) -> None:
        connection = await asyncpg.connect(DATABASE_URL, timeout=5)
        try:
            await connection.execute(sql)
        finally:
            await connection.close()

    try:
        asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    except Exception as exc:
        pytest.fail(f"PostgreSQL at {DATABASE_URL} does not answer ({exc}); run the tests with scripts/test")
    base, _, _ = DATABASE_URL.rpartition("/")
    yield f"{base}/{name}"
    asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
async def pg(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection to the test database, with the gateway's tables emptied."""
    connection = await asyncpg.connect(database_url)
    exists = await connection.fetchval("SELECT to_regclass('usage_events')")
    if exists is not None:
        await connection.execute("TRUNCATE usage_events, usage_request_ids, usage_daily, api_keys")
    yield connection
    await connection.close()


@pytest.fixture
def fake_upstream() -> FakeUpstream:
    return FakeUpstream()


@pytest.fixture
async def upstream_url(fake_upstream: FakeUpstream) -> AsyncIterator[str]:
    server = TestServer(fake_upstream.app())
    await server.start_server()
    yield str(server.make_url("/v1"))
    await server.close()


@pytest.fixture
def fake_anthropic() -> FakeAnthropic:
    return FakeAnthropic()


@pytest.fixture
async def anthropic_url(fake_anthropic: FakeAnthropic) -> AsyncIterator[str]:
    server = TestServer(fake_anthropic.app())
    await server.start_server()
    yield str(server.make_url("")).rstrip("/")
    await server.close()


DEFAULT_POLICIES = """
policies:
  - name: per-user
    scope: user
    limits:
      - {requests: 1000, per: minute}
      - {tokens: 1000000, per: minute}
"""


@dataclass
class ConfigWriter:
    """Writes gateway.yaml and policy files into a test's own folder."""

    directory: Path
    redis_url: str
    database_url: str
    upstream_url: str
    anthropic_url: str = "http://127.0.0.1:9"
    timeouts: str = "{connect_seconds: 2, idle_seconds: 5, total_seconds: 10}"
    # More keys under quota:, e.g. "time_zone: Europe/Berlin".
    quota_extra: str = ""
    # More providers and models (YAML at the level of their entries), and top-level YAML.
    extra_providers: str = ""
    extra_models: str = ""
    extra: str = ""

    def write(
        self,
        policies: str = DEFAULT_POLICIES,
        *,
        embedded: bool = False,
        extra: str = "",
    ) -> Path:
        policy_dir = self.directory / "policies"
        policy_dir.mkdir(exist_ok=True)
        (policy_dir / "test.yaml").write_text(textwrap.dedent(policies))
        prefix = f"{REDIS_KEY_PREFIX}{uuid.uuid4().hex[:8]}:"
        backends = (
            "backends:\n  sqlite:\n    path: var/test.db\n"
            if embedded
            else textwrap.dedent(
                f"""\
                backends:
                  redis:
                    url: {self.redis_url}
                    key_prefix: "{prefix}"
                  postgres:
                    dsn: {self.database_url}
                """
            )
        )
        config = (
            textwrap.dedent(
                f"""\
                server:
                  host: 127.0.0.1
                  port: 0
                providers:
                  fake:
                    type: openai
                    base_url: {self.upstream_url}
                    api_key_env: FAKE_PROVIDER_KEY
                    timeouts: {self.timeouts}
                  azure:
                    type: azure
                    base_url: {self.upstream_url.removesuffix("/v1")}
                    api_version: "2024-10-21"
                    api_key_env: FAKE_PROVIDER_KEY
                  anthropic:
                    type: anthropic
                    base_url: {self.anthropic_url}
                    api_key_env: FAKE_ANTHROPIC_KEY
                  mock:
                    type: mock
                __EXTRA_PROVIDERS__
                models:
                  gpt-4o-mini:
                    provider: fake
                    price: {{input: 0.15, output: 0.6}}
                  team-model:
                    provider: fake
                    upstream_model: gpt-4o-mini
                  gpt-4:
                    provider: fake
                  mock-model:
                    provider: mock
                    upstream_model: gpt-4o
                  claude-sonnet:
                    provider: fake
                    upstream_model: claude-sonnet-4-5
                  claude-native:
                    provider: anthropic
                    upstream_model: claude-sonnet-4-5
                  azure-gpt:
                    provider: azure
                    upstream_model: my-gpt4o-deployment
                  text-embedding-3-small:
                    provider: fake
                __EXTRA_MODELS__
                keys:
                  - {{id: alice-key, sha256: {_sha256(USER_KEY)}, user: alice, team: research, tags: [interactive]}}
                  - {{id: bob-key, sha256: {_sha256(OTHER_KEY)}, user: bob, tags: [batch]}}
                admin:
                  key_sha256: {_sha256(ADMIN_KEY)}
                quota:
                  policies: policies/*.yaml
                  default_max_completion_tokens: 100
                  {self.quota_extra}
                ledger:
                  batch_size: 100
                  flush_interval_seconds: 0.02
                """
            )
            + backends
            + extra
            + self.extra
        )
        config = config.replace("__EXTRA_PROVIDERS__\n", textwrap.indent(self.extra_providers, "  "))
        config = config.replace("__EXTRA_MODELS__\n", textwrap.indent(self.extra_models, "  "))
        path = self.directory / "gateway.yaml"
        path.write_text(config)
        return path


@pytest.fixture
def config_writer(
    tmp_path: Path,
    redis_url: str,
    database_url: str,
    upstream_url: str,
    anthropic_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> ConfigWriter:
    monkeypatch.setenv("FAKE_PROVIDER_KEY", PROVIDER_KEY)
    monkeypatch.setenv("FAKE_ANTHROPIC_KEY", ANTHROPIC_PROVIDER_KEY)
    return ConfigWriter(tmp_path, redis_url, database_url, upstream_url, anthropic_url)


@dataclass
class RunningGateway:
    app: web.Application
    url: str

    @property
    def config(self) -> GatewayConfig:
        return self.app[state.CONFIG]

    clients: list[openai.AsyncOpenAI]

    def client(self, key: str = USER_KEY, **kwargs: Any) -> openai.AsyncOpenAI:
        """An SDK client that never retries (so every request is counted once)."""
        client = openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, **kwargs)
        self.clients.append(client)
        return client

    async def settle(self) -> None:
        """Wait until every finished request is settled and written to the ledger."""
        await self.app[state.SETTLEMENT].drain()
        await self.app[state.LEDGER].flush()


StartGateway = Callable[..., Awaitable[RunningGateway]]


@pytest.fixture
async def start_gateway(config_writer: ConfigWriter) -> AsyncIterator[StartGateway]:
    servers: list[TestServer] = []
    gateways: list[RunningGateway] = []

    async def start(
        policies: str = DEFAULT_POLICIES,
        *,
        embedded: bool = False,
        clock_ms: Callable[[], int] | None = None,
        extra: str = "",
    ) -> RunningGateway:
        path = config_writer.write(policies, embedded=embedded, extra=extra)
        app = create_app(load_config(path), clock_ms=clock_ms)
        server = TestServer(app)
        await server.start_server()
        servers.append(server)
        gateway = RunningGateway(app=app, url=str(server.make_url("")).rstrip("/"), clients=[])
        gateways.append(gateway)
        return gateway

    yield start
    for gateway in gateways:
        for client in gateway.clients:
            await client.close()
    for server in reversed(servers):
        await server.close()


@pytest.fixture
async def gateway(start_gateway: StartGateway, pg: asyncpg.Connection) -> RunningGateway:
    return await start_gateway()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def refused_port() -> int:
    """A port on 127.0.0.1 that refuses connections for as long as the tests run.

    free_port's port is free only until something binds it: a server a test starts
    later may be given it, and a provider meant to be unreachable then answers (seen
    once in CI: a "dead" provider's port answered 401). This one stays bound, never
    listening, so the kernel gives it to no one and connecting to it is refused.
    """
    return int(_refusing_socket().getsockname()[1])


@cache
def _refusing_socket() -> socket.socket:
    # Without SO_REUSEADDR: no other socket may bind the port while this one holds it.
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    return holder
