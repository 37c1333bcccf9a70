"""The quota limiter on a real three-master Redis Cluster on loopback.

Each subject's counters carry a hash tag, so they share one slot; a request whose limits
live in several slots reserves slot by slot and rolls the earlier slots back when a
later one rejects. The cluster is started here (redis-server, redis-cli --cluster
create) and torn down at the end of the module; missing binaries fail the module.
"""

from __future__ import annotations

import asyncio
import random
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import asyncpg
import openai
import pytest
import redis.asyncio as redis_asyncio
from aiohttp.test_utils import TestServer
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

from gateway import state
from gateway.app import create_app
from gateway.config import RedisConfig, load_config
from gateway.quota.limiter import Admission, Charge, CountersNotSynced, QuotaLimiter
from gateway.quota.policy import AppliedLimit, LimitRule
from gateway.quota.store import open_redis
from tests.conftest import ADMIN_KEY, T0_MS, USER_KEY, ConfigWriter

CLUSTER_BUS_OFFSET = 10_000
STARTUP_SECONDS = 20.0


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(
            f"{name} is not installed: the Redis Cluster tests need redis-server and redis-cli "
            "(Debian package redis-server / redis-tools)",
            pytrace=False,
        )
    return path


def _port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _cluster_ports(count: int) -> list[int]:
    """Free loopback ports below 55000 whose cluster bus port (+10000) is free too."""
    chosen: list[int] = []
    candidates = random.sample(range(20_000, 55_000), 2_000)
    for port in candidates:
        if any(abs(port - other) in (0, CLUSTER_BUS_OFFSET) for other in chosen):
            continue
        if _port_is_free(port) and _port_is_free(port + CLUSTER_BUS_OFFSET):
            chosen.append(port)
            if len(chosen) == count:
                return chosen
    pytest.fail("could not find free loopback ports for a Redis Cluster", pytrace=False)


def _cli(cli: str, *args: str, timeout: float = 10.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([cli, *args], capture_output=True, text=True, timeout=timeout, check=False)


@dataclass(frozen=True)
class Cluster:
    ports: tuple[int, ...]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.ports[0]}/0"


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    server, cli = _tool("redis-server"), _tool("redis-cli")
    directory = Path(tempfile.mkdtemp(prefix="gw-redis-cluster-"))
    ports = _cluster_ports(3)
    processes: list[subprocess.Popen[bytes]] = []
    try:
        for port in ports:
            log = (directory / f"redis-{port}.log").open("wb")
            options = {
                "--port": str(port),
                "--cluster-enabled": "yes",
                "--cluster-config-file": f"nodes-{port}.conf",
                "--dir": str(directory),
                "--save": "",
                "--appendonly": "no",
                "--bind": "127.0.0.1",
                "--daemonize": "no",
            }
            command = [server, *(part for option in options.items() for part in option)]
            processes.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT))
            log.close()
        deadline = time.monotonic() + STARTUP_SECONDS
        for port, process in zip(ports, processes, strict=True):
            while _cli(cli, "-p", str(port), "ping").stdout.strip() != "PONG":
                if process.poll() is not None or time.monotonic() > deadline:
                    log_text = (directory / f"redis-{port}.log").read_text(errors="replace")
                    pytest.fail(f"redis-server on port {port} did not start:\n{log_text}", pytrace=False)
                time.sleep(0.05)
        nodes = [f"127.0.0.1:{port}" for port in ports]
        created = _cli(
            cli, "--cluster", "create", *nodes, "--cluster-replicas", "0", "--cluster-yes", timeout=30
        )
        if created.returncode != 0:
            pytest.fail(
                f"redis-cli --cluster create failed:\n{created.stdout}\n{created.stderr}", pytrace=False
            )
        # Every node must see the whole cluster as ok, not just the first one.
        for port in ports:
            while "cluster_state:ok" not in _cli(cli, "-p", str(port), "cluster", "info").stdout:
                if time.monotonic() > deadline:
                    pytest.fail(
                        f"the Redis Cluster never reached cluster_state:ok (node {port})", pytrace=False
                    )
                time.sleep(0.1)
        yield Cluster(tuple(ports))
    finally:
        for process in processes:
            process.kill()
        for process in processes:
            process.wait(timeout=10)
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
async def cluster_client(cluster: Cluster) -> AsyncIterator[RedisCluster]:
    """A client built exactly as the gateway builds it for `cluster: true`."""
    client, description = open_redis(RedisConfig(url=cluster.url, cluster=True))
    assert isinstance(client, RedisCluster)
    assert description == f"redis cluster via 127.0.0.1:{cluster.ports[0]}"
    # Learn the slot map now, so tests can ask which node serves a key before any command.
    await client.initialize()
    yield client
    await client.aclose()


@pytest.fixture
def limiter(cluster_client: RedisCluster) -> QuotaLimiter:
    return QuotaLimiter(cluster_client, f"clustertest:{uuid.uuid4().hex[:8]}:", clock_ms=lambda: T0_MS)


def user_limit(
    capacity: int, kind: str = "tokens", window: str | None = "minute", user: str = "alice"
) -> AppliedLimit:
    return AppliedLimit("p", "user", user, LimitRule(kind, window, capacity))


def team_limit(
    capacity: int, kind: str = "tokens", window: str | None = "minute", team: str = "research"
) -> AppliedLimit:
    return AppliedLimit("p", "team", team, LimitRule(kind, window, capacity))


def node_port(client: RedisCluster, key: str) -> int:
    node = client.get_node_from_key(key)
    assert node is not None
    return int(node.port)


def assert_different_slots_and_nodes(client: RedisCluster, first: AppliedLimit, second: AppliedLimit) -> None:
    first_key, second_key = first.redis_keys("x:")[0], second.redis_keys("x:")[0]
    assert client.keyslot(first_key) != client.keyslot(second_key)
    assert node_port(client, first_key) != node_port(client, second_key)


async def usage(limiter: QuotaLimiter, *limits: AppliedLimit) -> list[tuple[int, int]]:
    """(used, reserved) of each limit."""
    return [(reading.used, reading.reserved) for reading in await limiter.read(limits)]


# --- 1. hash tags --------------------------------------------------------------------------


async def test_every_key_of_a_subject_lives_in_its_hash_tag_slot(
    cluster: Cluster, cluster_client: RedisCluster, limiter: QuotaLimiter
) -> None:
    prefix = limiter.key_prefix
    alice = [
        user_limit(100),
        user_limit(5, kind="requests", window="second"),
        user_limit(2, kind="concurrent", window=None),
        user_limit(1000, kind="cost_usd", window="day"),
        user_limit(9, kind="output_tokens", window="month"),
    ]
    alice_slot = key_slot(b"user:alice")
    research_slot = key_slot(b"team:research")
    assert (alice_slot, research_slot) == (4489, 6537)
    for applied in alice:
        assert applied.hash_tag == "{user:alice}"
        keys = [*applied.redis_keys(prefix), applied.sync_marker(prefix)]
        assert len(set(keys)) == 3
        assert {cluster_client.keyslot(key) for key in keys} == {alice_slot}
    research = team_limit(50)
    assert research.hash_tag == "{team:research}"
    assert {cluster_client.keyslot(key) for key in research.redis_keys(prefix)} == {research_slot}
    # The two subjects are served by different masters of the three.
    alice_port = node_port(cluster_client, alice[0].redis_keys(prefix)[0])
    research_port = node_port(cluster_client, research.redis_keys(prefix)[0])
    assert alice_port != research_port
    assert {alice_port, research_port} <= set(cluster.ports)

    admission = await limiter.reserve([Charge(alice[0], 7), Charge(alice[2], 1), Charge(research, 3)])
    assert admission.admitted
    # Ask each master directly (no cluster routing): the counters are where the slot says.
    for port, slot, expected in ((alice_port, alice_slot, 3), (research_port, research_slot, 2)):
        direct = redis_asyncio.Redis(host="127.0.0.1", port=port)
        try:
            # alice: tokens buckets + pending, concurrent pending; research: buckets + pending.
            keys = [
                key.decode() if isinstance(key, bytes) else key
                for key in await direct.cluster("getkeysinslot", slot, 100)
            ]
            assert sorted(key for key in keys if key.startswith(prefix)) == sorted(
                [*alice[0].redis_keys(prefix), alice[2].redis_keys(prefix)[1]]
                if port == alice_port
                else list(research.redis_keys(prefix))
            )
            assert len([key for key in keys if key.startswith(prefix)]) == expected
        finally:
            await direct.aclose()
    assert await usage(limiter, alice[0], alice[2], research) == [(7, 7), (1, 1), (3, 3)]


# --- 2. rollback across slots ----------------------------------------------------------------


async def test_a_rejection_in_a_later_slot_rolls_back_the_earlier_slots(
    cluster_client: RedisCluster, limiter: QuotaLimiter
) -> None:
    a, b = user_limit(100), team_limit(50)
    assert_different_slots_and_nodes(cluster_client, a, b)

    first = await limiter.reserve([Charge(a, 40), Charge(b, 40)])
    assert first.admitted
    assert [(state.used, state.charged) for state in first.states] == [(40, True), (40, True)]
    assert await usage(limiter, a, b) == [(40, 40), (40, 40)]

    # A's slot goes first (first-seen order): it admits 20, then B's slot rejects.
    second = await limiter.reserve([Charge(a, 20), Charge(b, 20)])
    assert not second.admitted
    assert second.rejected_by is not None and second.rejected_by.limit == b
    assert (second.rejected_by.used, second.requested) == (40, 20)
    # B's only bucket (at T0) leaves the window at T0 + 61 s.
    assert second.retry_after_ms == 61_000
    assert second.reservation.charges == ()
    # A was charged in its own slot, then rolled back: used and pending as before.
    assert await usage(limiter, a, b) == [(40, 40), (40, 40)]
    # The rejection reports A as it stands after the rollback (as a single node would).
    assert [(state.limit, state.used, state.charged) for state in second.states] == [
        (a, 40, False),
        (b, 40, False),
    ]

    # B first: its slot rejects before A's slot is touched at all.
    third = await limiter.reserve([Charge(b, 20), Charge(a, 20)])
    assert not third.admitted and third.rejected_by is not None and third.rejected_by.limit == b
    assert await usage(limiter, a, b) == [(40, 40), (40, 40)]

    # What fits is still admitted in both slots, and nothing leaked from the rollback.
    fourth = await limiter.reserve([Charge(a, 60), Charge(b, 10)])
    assert fourth.admitted
    assert await usage(limiter, a, b) == [(100, 100), (50, 50)]


async def test_unsynced_calendar_counters_in_a_later_slot_roll_back_the_earlier_slots(
    cluster_client: RedisCluster, limiter: QuotaLimiter
) -> None:
    a, daily = user_limit(100), team_limit(1000, window="day")
    assert_different_slots_and_nodes(cluster_client, a, daily)
    with pytest.raises(CountersNotSynced) as missing:
        await limiter.reserve([Charge(a, 30), Charge(daily, 30)])
    assert missing.value.limit == daily
    assert await usage(limiter, a, daily) == [(0, 0), (0, 0)]

    assert await limiter.sync_calendar([daily], [900])
    admitted = await limiter.reserve([Charge(a, 30), Charge(daily, 30)])
    assert admitted.admitted
    assert await usage(limiter, a, daily) == [(30, 30), (930, 30)]


# --- 3. settle across slots ------------------------------------------------------------------


async def test_settle_replaces_the_reservation_in_every_slot(
    cluster_client: RedisCluster, limiter: QuotaLimiter
) -> None:
    a, b = user_limit(100, user="carol"), team_limit(100, team="ops")
    assert_different_slots_and_nodes(cluster_client, a, b)
    admission = await limiter.reserve([Charge(a, 30), Charge(b, 30)])
    assert admission.admitted
    assert await usage(limiter, a, b) == [(30, 30), (30, 30)]
    await limiter.settle(admission.reservation, [10, 5])
    assert await usage(limiter, a, b) == [(10, 0), (5, 0)]

    # Actual usage above the reservation is charged in both slots too.
    more = await limiter.reserve([Charge(a, 20), Charge(b, 20)])
    assert more.admitted
    await limiter.settle(more.reservation, [25, 0])
    assert await usage(limiter, a, b) == [(35, 0), (5, 0)]


async def test_concurrent_limits_across_slots_free_their_lanes_on_settle_and_rollback(
    cluster_client: RedisCluster, limiter: QuotaLimiter
) -> None:
    lanes_a = user_limit(2, kind="concurrent", window=None, user="carol")
    lanes_b = team_limit(1, kind="concurrent", window=None, team="ops")
    assert_different_slots_and_nodes(cluster_client, lanes_a, lanes_b)

    first = await limiter.reserve([Charge(lanes_a, 1), Charge(lanes_b, 1)])
    assert first.admitted
    assert await usage(limiter, lanes_a, lanes_b) == [(1, 1), (1, 1)]

    # A has a second lane and takes it; B has none: A's lane is given back.
    second = await limiter.reserve([Charge(lanes_a, 1), Charge(lanes_b, 1)])
    assert not second.admitted
    assert second.rejected_by is not None and second.rejected_by.limit == lanes_b
    assert await usage(limiter, lanes_a, lanes_b) == [(1, 1), (1, 1)]

    await limiter.settle(first.reservation, [1, 1])
    assert await usage(limiter, lanes_a, lanes_b) == [(0, 0), (0, 0)]
    third = await limiter.reserve([Charge(lanes_a, 1), Charge(lanes_b, 1)])
    assert third.admitted
    assert await usage(limiter, lanes_a, lanes_b) == [(1, 1), (1, 1)]


# --- 4. contention ---------------------------------------------------------------------------


async def _burst(limiter: QuotaLimiter, a: AppliedLimit, b: AppliedLimit, count: int) -> list[Admission]:
    return await asyncio.gather(*(limiter.reserve([Charge(a, 1), Charge(b, 1)]) for _ in range(count)))


async def test_a_burst_across_two_slots_admits_exactly_the_capacity(
    cluster_client: RedisCluster, limiter: QuotaLimiter
) -> None:
    a = user_limit(37, kind="requests", user="dave")
    b = team_limit(37, kind="requests", team="infra")
    assert_different_slots_and_nodes(cluster_client, a, b)
    admissions = await _burst(limiter, a, b, 200)
    admitted = [admission for admission in admissions if admission.admitted]
    assert len(admitted) == 37
    assert await usage(limiter, a, b) == [(37, 37), (37, 37)]
    await asyncio.gather(*(limiter.settle(admission.reservation, [1, 1]) for admission in admitted))
    assert await usage(limiter, a, b) == [(37, 0), (37, 0)]


async def test_a_burst_that_is_rejected_in_the_later_slot_leaves_no_leak_in_the_earlier(
    cluster_client: RedisCluster, limiter: QuotaLimiter
) -> None:
    # A admits up to 100, B only 37: at least 63 requests pass A and are rolled back.
    a = user_limit(100, kind="requests", user="dave")
    b = team_limit(37, kind="requests", team="infra")
    admissions = await _burst(limiter, a, b, 200)
    assert sum(admission.admitted for admission in admissions) == 37
    rejected_by_b = [
        admission for admission in admissions if admission.rejected_by and admission.rejected_by.limit == b
    ]
    assert len(rejected_by_b) >= 63
    assert await usage(limiter, a, b) == [(37, 37), (37, 37)]


# --- 5. the gateway on a cluster -------------------------------------------------------------

CLUSTER_POLICIES = """
policies:
  - name: per-user
    scope: user
    limits:
      - {requests: 10, per: minute}
  - name: per-team
    scope: team
    limits:
      - {requests: 1, per: minute}
"""


async def test_the_gateway_serves_and_rejects_on_a_cluster(
    cluster: Cluster,
    config_writer: ConfigWriter,
    pg: asyncpg.Connection,
) -> None:
    config_writer.redis_url = cluster.url
    path = config_writer.write(CLUSTER_POLICIES)
    text = path.read_text()
    url_line = f"    url: {cluster.url}\n"
    assert text.count(url_line) == 1, text
    path.write_text(text.replace(url_line, url_line + "    cluster: true\n"))
    config = load_config(path)
    assert config.backends.redis is not None and config.backends.redis.cluster

    app = create_app(config, clock_ms=lambda: T0_MS)
    server = TestServer(app)
    await server.start_server()
    base = str(server.make_url("")).rstrip("/")
    client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key=USER_KEY, max_retries=0)
    try:
        limiter = app[state.QUOTA].limiter
        assert limiter.clustered
        user = AppliedLimit("per-user", "user", "alice", LimitRule("requests", "minute", 10))
        team = AppliedLimit("per-team", "team", "research", LimitRule("requests", "minute", 1))
        assert isinstance(limiter.redis, RedisCluster)
        await limiter.redis.initialize()
        assert_different_slots_and_nodes(limiter.redis, user, team)

        completion = await client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
        )
        assert completion.choices[0].message.content
        await app[state.SETTLEMENT].drain()
        assert await usage(limiter, user, team) == [(1, 0), (1, 0)]

        with pytest.raises(openai.RateLimitError) as rejected:
            await client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
            )
        assert rejected.value.response.headers["x-ratelimit-limit-name"] == "requests_per_minute"
        assert "team 'research'" in rejected.value.message
        # The user's slot admitted the request first and was rolled back.
        assert await usage(limiter, user, team) == [(1, 0), (1, 0)]

        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{base}/health/ready", headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as response,
        ):
            body = await response.json()
        assert response.status == 200, body
        assert body["components"]["redis"]["status"] == "healthy"
    finally:
        await client.close()
        await server.close()
