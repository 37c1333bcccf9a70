"""The quota scripts over TLS (rediss://), as an ACL user, on a redis-server of their own.

A private CA and certificates are made with the openssl command, and redis-server is
started with a TLS port, a plain port and a Unix socket, a password for the default
user and an ACL user allowed only what the scripts need. The gateway's own limiter
runs against it through the store's client (gateway/quota/store.py), as in production.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode

import pytest
import redis

from gateway.config import RedisConfig
from gateway.quota.limiter import Charge, QuotaLimiter, QuotaStoreUnavailable
from gateway.quota.policy import AppliedLimit, LimitRule
from gateway.quota.store import open_redis
from tests.conftest import T0_MS, free_port

ADMIN_PASSWORD = "admin-secret"
PREFIX = "tlstest:"
# What the quota scripts run, and nothing else: EVALSHA, SCRIPT LOAD after a NOSCRIPT,
# SELECT for a database other than 0, and the commands inside the Lua scripts.
SCRIPT_COMMANDS = (
    "+evalsha +script|load +select +time +del +exists +set +pexpire +pttl "
    "+hdel +hexists +hgetall +hincrby +hmget +hset +zadd +zcard +zrangebyscore +zrem +zremrangebyscore"
)
USERS = {
    "quota": f"~{PREFIX}* {SCRIPT_COMMANDS}",
    "no-evalsha": f"~{PREFIX}* {SCRIPT_COMMANDS} -evalsha",
    "other-keys": f"~elsewhere:* {SCRIPT_COMMANDS}",
}


@dataclass(frozen=True)
class Certificates:
    ca: Path
    other_ca: Path  # a CA the server's certificate does not come from
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


@dataclass(frozen=True)
class RedisServer:
    tls_port: int
    plain_port: int
    socket: Path
    certificates: Certificates

    def tls_url(self, user: str = "quota", password: str = "quota-secret", db: int = 3, **query: str) -> str:
        settings = urlencode({"ssl_ca_certs": str(self.certificates.ca), **query})
        return f"rediss://{user}:{password}@127.0.0.1:{self.tls_port}/{db}?{settings}"

    def admin(self, db: int = 0) -> redis.Redis:
        return redis.Redis(unix_socket_path=str(self.socket), password=ADMIN_PASSWORD, db=db)


def openssl(*arguments: str | Path) -> None:
    subprocess.run(["openssl", *map(str, arguments)], check=True, capture_output=True)


def make_ca(directory: Path, name: str) -> tuple[Path, Path]:
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    openssl(
        "req", "-x509", "-new", "-nodes", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
        "-keyout", key, "-out", cert, "-days", "2", "-subj", f"/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    return cert, key


def make_cert(directory: Path, name: str, ca: tuple[Path, Path], usage: str) -> tuple[Path, Path]:
    cert, key, request, extensions = (directory / f"{name}.{ext}" for ext in ("crt", "key", "csr", "ext"))
    extensions.write_text(
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
        f"extendedKeyUsage={usage}\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n"
        "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n"
    )
    openssl(
        "req", "-new", "-nodes", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
        "-keyout", key, "-out", request, "-subj", f"/CN={name}",
    )  # fmt: skip
    openssl(
        "x509", "-req", "-in", request, "-CA", ca[0], "-CAkey", ca[1], "-CAcreateserial",
        "-out", cert, "-days", "2", "-extfile", extensions,
    )  # fmt: skip
    return cert, key


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed: no certificates for a TLS Redis")
    directory = tmp_path_factory.mktemp("tls")
    ca = make_ca(directory, "ca")
    other_ca, _ = make_ca(directory, "other-ca")
    server = make_cert(directory, "server", ca, "serverAuth")
    client = make_cert(directory, "client", ca, "clientAuth")
    return Certificates(ca[0], other_ca, *server, *client)


@contextmanager
def redis_server(
    certificates: Certificates, directory: Path, *, client_certificates: bool
) -> Iterator[RedisServer]:
    """A redis-server with a TLS port, a plain port and a Unix socket, stopped on leaving."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed: no TLS Redis to test against")
    server = RedisServer(free_port(), free_port(), directory / "redis.sock", certificates)
    log = directory / "redis.log"
    process = subprocess.Popen(
        [
            binary,
            "--bind", "127.0.0.1",
            "--port", str(server.plain_port),
            "--tls-port", str(server.tls_port),
            "--tls-cert-file", str(certificates.server_cert),
            "--tls-key-file", str(certificates.server_key),
            "--tls-ca-cert-file", str(certificates.ca),
            "--tls-auth-clients", "yes" if client_certificates else "no",
            "--unixsocket", str(server.socket),
            "--unixsocketperm", "700",
            "--requirepass", ADMIN_PASSWORD,
            "--save", "",
            "--appendonly", "no",
            "--dir", str(directory),
            "--logfile", str(log),
        ]
    )  # fmt: skip
    try:
        admin = wait_until_up(server, process, log)
        for user, rules in USERS.items():
            admin.execute_command(  # type: ignore[no-untyped-call]
                "ACL", "SETUSER", user, "reset", "on", f">{user}-secret", *rules.split()
            )
        admin.close()
        yield server
    finally:
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_until_up(server: RedisServer, process: subprocess.Popen[bytes], log: Path) -> redis.Redis:
    deadline = time.monotonic() + 10
    while True:
        admin = server.admin()
        try:
            admin.ping()
            return admin
        except redis.ConnectionError:
            admin.close()
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"redis-server did not start:\n{log.read_text() if log.exists() else ''}")
            time.sleep(0.02)


@pytest.fixture(scope="module")
def tls_redis(certificates: Certificates, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with redis_server(certificates, tmp_path_factory.mktemp("redis"), client_certificates=False) as server:
        yield server


@asynccontextmanager
async def limiter_on(url: str) -> AsyncIterator[QuotaLimiter]:
    """The limiter as the gateway makes it (store.open_redis), its clock pinned."""
    client, _ = open_redis(RedisConfig(url=url, key_prefix=PREFIX))
    limiter = QuotaLimiter(client, PREFIX, clock_ms=lambda: T0_MS)
    try:
        yield limiter
    finally:
        await limiter.close()
        await client.aclose()


def requests_per_minute(capacity: int) -> AppliedLimit:
    return AppliedLimit("p", "user", f"u{uuid.uuid4().hex[:8]}", LimitRule("requests", "minute", capacity))


async def test_the_limiter_admits_exactly_its_limit_over_tls_as_an_acl_user(tls_redis: RedisServer) -> None:
    limit = requests_per_minute(12)
    admin = tls_redis.admin(db=3)
    admin.script_flush()
    async with limiter_on(tls_redis.tls_url()) as limiter:
        # 20 at once: the first find the script unloaded (NOSCRIPT), load it as this user
        # and run again; the rest share pipelined writes.
        admissions = await asyncio.gather(*(limiter.reserve([Charge(limit, 1)]) for _ in range(20)))
        assert sum(admission.admitted for admission in admissions) == 12
        rejected = [admission for admission in admissions if not admission.admitted]
        assert len(rejected) == 8
        assert {(state.used, state.remaining) for a in rejected for state in a.states} == {(12, 0)}
        (reading,) = await limiter.read([limit])
        assert (reading.used, reading.reserved) == (12, 12)
        # One request settles at 0 (it never reached a provider): its request is given back.
        await limiter.settle(next(a for a in admissions if a.admitted).reservation, [0])
        (reading,) = await limiter.read([limit])
        assert (reading.used, reading.reserved) == (11, 11)

        protocol = limiter._batcher._connection._protocol  # type: ignore[union-attr]
        assert protocol is not None and protocol.transport is not None
        tls = protocol.transport.get_extra_info("ssl_object")
        assert tls is not None and tls.version() in ("TLSv1.2", "TLSv1.3")
    assert admin.script_exists(limiter._reserve.sha, limiter._read.sha, limiter._settle.sha) == [True] * 3
    # In database 3, as the URL says, under the scripts' keys; seen by the default user.
    buckets, _ = limit.redis_keys(PREFIX)
    assert admin.hget(buckets, "0") == b"11"  # the window's running total
    admin.close()
    database_0 = tls_redis.admin(db=0)
    assert database_0.exists(buckets) == 0
    database_0.close()


async def test_plain_tcp_with_the_default_users_password_and_a_unix_socket_as_an_acl_user(
    tls_redis: RedisServer,
) -> None:
    urls = [
        f"redis://:{ADMIN_PASSWORD}@127.0.0.1:{tls_redis.plain_port}/2",
        f"unix://quota:quota-secret@{tls_redis.socket}?db=1",
    ]
    for url in urls:
        limit = requests_per_minute(2)
        async with limiter_on(url) as limiter:
            admissions = [await limiter.reserve([Charge(limit, 1)]) for _ in range(3)]
            assert [admission.admitted for admission in admissions] == [True, True, False]
            (reading,) = await limiter.read([limit])
            assert reading.used == 2


async def test_a_wrong_password_is_a_refused_login(tls_redis: RedisServer) -> None:
    async with limiter_on(tls_redis.tls_url(password="not-the-password")) as limiter:
        with pytest.raises(QuotaStoreUnavailable, match="Redis refused the login: WRONGPASS"):
            await limiter.reserve([Charge(requests_per_minute(5), 1)])
    async with limiter_on(f"redis://:wrong@127.0.0.1:{tls_redis.plain_port}/0") as limiter:
        with pytest.raises(QuotaStoreUnavailable, match="Redis refused the login: WRONGPASS"):
            await limiter.reserve([Charge(requests_per_minute(5), 1)])


async def test_a_server_certificate_from_another_ca_is_refused_unless_not_checked(
    tls_redis: RedisServer,
) -> None:
    other_ca = str(tls_redis.certificates.other_ca)
    async with limiter_on(tls_redis.tls_url(ssl_ca_certs=other_ca)) as limiter:
        with pytest.raises(QuotaStoreUnavailable, match="CERTIFICATE_VERIFY_FAILED"):
            await limiter.reserve([Charge(requests_per_minute(5), 1)])
    # The URL's ssl_cert_reqs is honoured too: not checked, the same CA is accepted.
    async with limiter_on(tls_redis.tls_url(ssl_ca_certs=other_ca, ssl_cert_reqs="none")) as limiter:
        assert (await limiter.reserve([Charge(requests_per_minute(5), 1)])).admitted
    # Nor does a plain connection get far with a TLS port: Redis hangs up.
    async with limiter_on(f"redis://:{ADMIN_PASSWORD}@127.0.0.1:{tls_redis.tls_port}/0") as limiter:
        with pytest.raises(QuotaStoreUnavailable, match="Connection to Redis lost"):
            await limiter.reserve([Charge(requests_per_minute(5), 1)])


@pytest.mark.parametrize(
    ("user", "refusal"),
    [
        ("no-evalsha", "NOPERM this user has no permissions to run the 'evalsha' command"),
        ("other-keys", "NOPERM this user has no permissions to access one of the keys"),
    ],
)
async def test_an_acl_user_without_what_the_scripts_need_gets_redis_refusal(
    tls_redis: RedisServer, user: str, refusal: str
) -> None:
    async with limiter_on(tls_redis.tls_url(user=user, password=f"{user}-secret")) as limiter:
        with pytest.raises(QuotaStoreUnavailable, match=refusal):
            await limiter.reserve([Charge(requests_per_minute(5), 1)])


async def test_a_server_that_requires_client_certificates_gets_ours(
    certificates: Certificates, tmp_path: Path
) -> None:
    with redis_server(certificates, tmp_path, client_certificates=True) as server:
        # Without one, Redis hangs up once the TLS handshake is over (TLS 1.3).
        async with limiter_on(server.tls_url()) as limiter:
            with pytest.raises(QuotaStoreUnavailable, match="Connection to Redis lost"):
                await limiter.reserve([Charge(requests_per_minute(5), 1)])
        url = server.tls_url(
            ssl_certfile=str(certificates.client_cert), ssl_keyfile=str(certificates.client_key)
        )
        async with limiter_on(url) as limiter:
            limit = requests_per_minute(1)
            admissions = [await limiter.reserve([Charge(limit, 1)]) for _ in range(2)]
            assert [admission.admitted for admission in admissions] == [True, False]
