"""Access control: key expiry and rotation, keys limited to models, failed-auth limits, TLS."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import ssl
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import asyncpg
import openai
import pytest

from gateway.auth import hash_key
from tests.conftest import USER_KEY, ConfigWriter, StartGateway, _sha256, free_port

HI = [{"role": "user", "content": "hi"}]


async def add_key(database_url: str, key: str, **fields: object) -> None:
    connection = await asyncpg.connect(database_url)
    try:
        await connection.execute(
            "INSERT INTO api_keys (key_id, key_sha256, user_id, team_id, created_at, expires_at, models) "
            "VALUES ($1, $2, $3, NULL, now(), $4, $5)",
            fields.get("key_id", "key_" + key[-6:]),
            hash_key(key),
            fields.get("user", "erin"),
            fields.get("expires_at"),
            list(fields.get("models", [])),  # type: ignore[call-overload]
        )
    finally:
        await connection.close()


async def test_expired_keys_are_refused(
    start_gateway: StartGateway, config_writer: ConfigWriter, pg: asyncpg.Connection, database_url: str
) -> None:
    gateway = await start_gateway()
    await add_key(database_url, "gw-old-key-000001", expires_at=datetime.now(UTC) - timedelta(seconds=1))
    await add_key(database_url, "gw-fresh-key-00002", expires_at=datetime.now(UTC) + timedelta(hours=1))
    with pytest.raises(openai.AuthenticationError) as caught:
        await gateway.client(key="gw-old-key-000001").chat.completions.create(
            model="gpt-4o-mini", messages=HI
        )
    assert caught.value.response.json()["error"]["code"] == "api_key_expired"
    ok = await gateway.client(key="gw-fresh-key-00002").chat.completions.create(
        model="gpt-4o-mini", messages=HI, max_tokens=1
    )
    assert ok.choices


async def test_rotation_keeps_the_old_key_for_its_grace_period(
    start_gateway: StartGateway, config_writer: ConfigWriter, pg: asyncpg.Connection
) -> None:
    config = str(config_writer.write())

    def cli(*args: str) -> str:
        result = subprocess.run(
            [sys.executable, "-m", "gateway", "keys", *args, "--config", config],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        return result.stdout

    created = cli("create", "--user", "frank", "--model", "gpt-4o-mini")
    old_key = re.search(r"^key:\s+(\S+)$", created, re.MULTILINE)[1]  # type: ignore[index]
    old_id = re.search(r"^key id:\s+(\S+)$", created, re.MULTILINE)[1]  # type: ignore[index]
    rotated = cli("rotate", old_id, "--grace", "2s")
    new_key = re.search(r"^key:\s+(\S+)$", rotated, re.MULTILINE)[1]  # type: ignore[index]
    assert f"the old key {old_id} works until" in rotated
    gateway = await start_gateway()
    for key in (old_key, new_key):
        answer = await gateway.client(key=key).chat.completions.create(
            model="gpt-4o-mini", messages=HI, max_tokens=1
        )
        assert answer.choices
    # The successor inherits the model limit.
    with pytest.raises(openai.PermissionDeniedError) as denied:
        await gateway.client(key=new_key).chat.completions.create(model="gpt-4", messages=HI, max_tokens=1)
    assert denied.value.response.json()["error"]["code"] == "model_not_allowed"
    await asyncio.sleep(2.2)
    with pytest.raises(openai.AuthenticationError) as expired:
        await gateway.client(key=old_key).chat.completions.create(
            model="gpt-4o-mini", messages=HI, max_tokens=1
        )
    assert expired.value.response.json()["error"]["code"] == "api_key_expired"
    assert (
        await gateway.client(key=new_key).chat.completions.create(
            model="gpt-4o-mini", messages=HI, max_tokens=1
        )
    ).choices


async def test_failed_authentications_are_limited_per_address(
    start_gateway: StartGateway, config_writer: ConfigWriter, pg: asyncpg.Connection
) -> None:
    config_writer.extra = "server: {auth_failures_per_minute: 3}\n"
    gateway = await start_gateway()
    async with aiohttp.ClientSession() as session:

        async def call(key: str) -> tuple[int, str, dict[str, str]]:
            async with session.post(
                f"{gateway.url}/v1/chat/completions",
                headers={"Authorization": f"Bearer {key}"},
                json={"model": "gpt-4o-mini", "messages": HI, "max_tokens": 1},
            ) as response:
                return (
                    response.status,
                    (await response.json())["error"]["code"] if response.status != 200 else "",
                    dict(response.headers),
                )

        results = [await call(f"gw-guess-{n}") for n in range(3)]
        assert [(status, code) for status, code, _ in results] == [(401, "invalid_api_key")] * 3
        assert (await call(USER_KEY))[:2] == (200, "")  # the right key is never refused
        status, code, headers = await call("gw-guess-3")
        assert (status, code) == (429, "too_many_failed_authentications")
        lowered = {name.lower(): value for name, value in headers.items()}
        assert 1 <= int(lowered["retry-after"]) <= 60 and lowered["x-should-retry"] == "false", headers


def test_tls_is_terminated_by_the_gateway(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    (tmp_path / "gateway.yaml").write_text(
        "server: {tls: {cert_file: cert.pem, key_file: key.pem}}\n"
        "providers: {mock: {type: mock}}\nmodels: {gpt-4o-mini: {provider: mock}}\n"
        f"keys: [{{id: k, sha256: {_sha256(USER_KEY)}, user: u}}]\n"
    )
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--config", "gateway.yaml", "--port", str(port)],
        cwd=tmp_path,
        stderr=(tmp_path / "gateway.log").open("w"),
        env=os.environ.copy(),
    )
    try:
        import httpx2 as httpx  # the SDKs' own HTTP client

        client = openai.OpenAI(
            base_url=f"https://127.0.0.1:{port}/v1",
            api_key=USER_KEY,
            max_retries=0,
            http_client=httpx.Client(verify=ssl.create_default_context(cafile=str(cert))),
        )
        for _ in range(300):
            try:
                answer = client.chat.completions.create(model="gpt-4o-mini", messages=HI, max_tokens=2)
                break
            except openai.APIConnectionError:
                assert process.poll() is None, (tmp_path / "gateway.log").read_text()
                import time

                time.sleep(0.1)
        assert answer.choices[0].message.content == "This is"
        # Plain HTTP on the TLS port gets nowhere.
        with pytest.raises(openai.APIConnectionError):
            openai.OpenAI(
                base_url=f"http://127.0.0.1:{port}/v1", api_key=USER_KEY, max_retries=0
            ).models.list()
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)


async def test_the_admin_api_can_live_on_its_own_address(
    start_gateway: StartGateway, config_writer: ConfigWriter, pg: asyncpg.Connection
) -> None:
    from tests.conftest import ADMIN_KEY

    admin_port = free_port()
    config_writer.extra = (
        f"admin: {{key_sha256: {_sha256(ADMIN_KEY)}, host: 127.0.0.1, port: {admin_port}}}\n"
    )
    gateway = await start_gateway()
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{gateway.url}/admin/usage", headers=headers) as public:
            assert public.status == 404
        async with session.get(
            f"http://127.0.0.1:{admin_port}/admin/usage?by=model", headers=headers
        ) as admin:
            assert admin.status == 200 and (await admin.json())["object"] == "usage.report"
        async with session.get(
            f"http://127.0.0.1:{admin_port}/admin/usage", headers={"Authorization": f"Bearer {USER_KEY}"}
        ) as wrong:
            assert wrong.status == 401
        # The public API is not served on the admin address.
        async with session.post(
            f"http://127.0.0.1:{admin_port}/v1/chat/completions",
            headers={"Authorization": f"Bearer {USER_KEY}"},
            json={},
        ) as api:
            assert api.status == 404


async def test_a_slow_body_is_cut_off(
    start_gateway: StartGateway, config_writer: ConfigWriter, pg: asyncpg.Connection
) -> None:
    """Slowloris: headers, then a byte now and then. The connection is not held forever."""
    config_writer.extra = "server: {body_timeout_seconds: 0.5}\n"
    gateway = await start_gateway()
    host, port = gateway.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        (
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {USER_KEY}\r\nContent-Length: 200\r\n\r\n"
        ).encode()
    )
    for _ in range(20):
        writer.write(b" ")
        await writer.drain()
        await asyncio.sleep(0.1)
        if reader.at_eof() or len(reader._buffer) > 0:  # type: ignore[attr-defined]
            break
    answer = await asyncio.wait_for(reader.read(4096), 5)
    writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408")
    # The 200-byte body never completed: only the body timeout can have answered.
    assert b'"code": "request_timeout"' in body
