"""The `gateway` command as operators run it: real processes, real services."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import asyncpg
import openai
import pytest

from gateway.config import load_config
from gateway.ledger.schema import latest_version
from tests.conftest import ConfigWriter, StartGateway, free_port
from tests.quickstart import ADMIN_KEY, DEMO_KEY, project_copy, shipped_gateway

REPO = Path(__file__).resolve().parents[1]
HI = [{"role": "user", "content": "hi"}]


def gateway_command(
    *args: str, cwd: Path | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env=os.environ.copy(),
    )


def test_invalid_config_stops_start_up_naming_file_and_key(tmp_path: Path) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text("providers:\n  up:\n    type: openai\nmodels:\n  m: {provider: up}\n")
    result = gateway_command("serve", "--config", str(config))
    assert result.returncode == 2
    assert f"{config}:2: providers.up.base_url: is required for providers of type openai" in result.stderr


def test_missing_config_file_is_reported(tmp_path: Path) -> None:
    result = gateway_command("serve", "--config", str(tmp_path / "absent.yaml"))
    assert result.returncode == 2
    assert "absent.yaml: cannot read file" in result.stderr


def test_invalid_policy_stops_start_up(tmp_path: Path) -> None:
    shutil.copy(REPO / "gateway.yaml", tmp_path / "gateway.yaml")
    (tmp_path / "policies").mkdir()
    bad = tmp_path / "policies" / "bad.yaml"
    bad.write_text(
        "policies:\n  - name: x\n    scope: user\n    limits:\n      - {tokens: 10, per: fortnight}\n"
    )
    result = gateway_command("serve", "--config", str(tmp_path / "gateway.yaml"))
    assert result.returncode == 2
    assert (
        f"{bad}:5: policies[0].limits[0].per: must be one of day, hour, minute, month, second"
        in result.stderr
    )


def test_keys_create_list_revoke_against_postgres(
    config_writer: ConfigWriter, pg: asyncpg.Connection
) -> None:
    config = str(config_writer.write())
    created = gateway_command(
        "keys",
        "create",
        "--user",
        "carol",
        "--team",
        "ml",
        "--tag",
        "batch",
        "--tag",
        "eu",
        "--config",
        config,
    )
    assert created.returncode == 0, created.stderr
    key = re.search(r"^key:\s+(gw-\S+)$", created.stdout, re.MULTILINE)
    key_id = re.search(r"^key id:\s+(key_[0-9a-f]{12})$", created.stdout, re.MULTILINE)
    assert key is not None and key_id is not None

    stored_tags = await_tags(config_writer.database_url, key_id[1])
    assert stored_tags == ["batch", "eu"]
    listed = gateway_command("keys", "list", "--config", config)
    assert listed.returncode == 0
    assert key_id[1] in listed.stdout and "carol" in listed.stdout and "active" in listed.stdout
    assert key[1] not in listed.stdout

    revoked = gateway_command("keys", "revoke", key_id[1], "--config", config)
    assert revoked.returncode == 0 and f"revoked {key_id[1]}" in revoked.stdout
    again = gateway_command("keys", "revoke", key_id[1], "--config", config)
    assert again.returncode == 1


def await_tags(database_url: str, key_id: str) -> list[str]:
    import asyncio

    async def read() -> list[str]:
        connection = await asyncpg.connect(database_url)
        try:
            return list(await connection.fetchval("SELECT tags FROM api_keys WHERE key_id = $1", key_id))
        finally:
            await connection.close()

    return asyncio.run(read())


async def test_created_key_authenticates_until_revoked(
    config_writer: ConfigWriter, start_gateway: StartGateway, pg: asyncpg.Connection
) -> None:
    config = str(config_writer.write())
    created = gateway_command("keys", "create", "--user", "dave", "--config", config)
    key_match = re.search(r"^key:\s+(gw-\S+)$", created.stdout, re.MULTILINE)
    assert key_match is not None
    key = key_match[1]
    # Only the hash is stored.
    stored = await pg.fetchrow("SELECT * FROM api_keys WHERE user_id = 'dave'")
    assert stored is not None and key not in str(dict(stored))

    gateway = await start_gateway()
    completion = await gateway.client(key=key).chat.completions.create(
        model="gpt-4o-mini", messages=HI, max_tokens=2
    )
    assert completion.choices[0].message.content
    await gateway.settle()
    assert await pg.fetchval("SELECT user_id FROM usage_events") == "dave"

    gateway_command("keys", "revoke", stored["key_id"], "--config", config)
    fresh = await start_gateway()
    with pytest.raises(openai.AuthenticationError):
        await fresh.client(key=key).chat.completions.create(model="gpt-4o-mini", messages=HI)


def test_migrate_reports_the_schema_version(config_writer: ConfigWriter, pg: asyncpg.Connection) -> None:
    result = gateway_command("migrate", "--config", str(config_writer.write()))
    assert result.returncode == 0, result.stderr
    assert f"schema version {latest_version('postgres')} (nothing to apply)" in result.stdout


def test_keys_hash_is_the_sha256_the_config_expects() -> None:
    result = gateway_command("keys", "hash", "gw-demo-key-change-me")
    assert result.stdout.strip() == hashlib.sha256(b"gw-demo-key-change-me").hexdigest()
    # The shipped demo key is that hash.
    assert f"sha256: {result.stdout.strip()}" in (REPO / "gateway.yaml").read_text()


def test_shipped_config_serves_on_the_embedded_default(tmp_path: Path) -> None:
    """The README's run command: the shipped gateway.yaml, no Redis, no Postgres, no account."""
    shutil.copy(REPO / "gateway.yaml", tmp_path / "gateway.yaml")
    shutil.copytree(REPO / "policies", tmp_path / "policies")
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--config", "gateway.yaml", "--port", str(port)],
        cwd=tmp_path,
        # Request log lines would fill an unread pipe and block the gateway: a file it is.
        stderr=(tmp_path / "gateway.log").open("w"),
        env=os.environ.copy(),
    )
    try:
        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key="gw-demo-key-change-me", max_retries=0
        )
        completion = None
        deadline = time.monotonic() + 30
        while completion is None:
            try:
                completion = client.chat.completions.create(model="gpt-4o-mini", messages=HI, max_tokens=4)
            except openai.APIConnectionError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise
                time.sleep(0.1)
        assert completion.choices[0].message.content == "This is a mock"
        assert completion.usage is not None
        assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (8, 4)
        client.close()
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
    stderr = (tmp_path / "gateway.log").read_text()
    assert process.returncode == 0, stderr
    assert "quota store: embedded" in stderr
    assert "ledger and keys: sqlite" in stderr
    # SIGTERM flushed the ledger: the request is in the SQLite file.
    with sqlite3.connect(tmp_path / "var" / "gateway.db") as connection:
        rows = connection.execute(
            "SELECT user_id, model, prompt_tokens, completion_tokens, usage_source FROM usage_events"
        ).fetchall()
    assert rows == [("demo", "gpt-4o-mini", 8, 4, "provider")]


def test_sighup_reloads_policies_at_once(tmp_path: Path) -> None:
    """The new file keeps the old size and mtime, so only SIGHUP (not the poll) sees it."""
    shutil.copy(REPO / "gateway.yaml", tmp_path / "gateway.yaml")
    (tmp_path / "policies").mkdir()
    policy = tmp_path / "policies" / "p.yaml"
    policy.write_text("policies:\n  - {name: p, scope: user, limits: [{requests: 11, per: minute}]}\n")
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--config", "gateway.yaml", "--port", str(port)],
        cwd=tmp_path,
        # Request log lines would fill an unread pipe and block the gateway: a file it is.
        stderr=(tmp_path / "gateway.log").open("w"),
        env=os.environ.copy(),
    )
    try:
        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key="gw-demo-key-change-me", max_retries=0
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                first = client.chat.completions.with_raw_response.create(
                    model="gpt-4o-mini", messages=HI, max_tokens=1
                )
                break
            except openai.APIConnectionError:
                assert time.monotonic() < deadline and process.poll() is None
                time.sleep(0.1)
        assert first.headers["x-ratelimit-limit-requests"] == "11"
        stat = policy.stat()
        policy.write_text("policies:\n  - {name: p, scope: user, limits: [{requests: 22, per: minute}]}\n")
        os.utime(policy, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        time.sleep(2.5)  # longer than the poll interval: the poll must not have noticed
        unchanged = client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=HI, max_tokens=1
        )
        assert unchanged.headers["x-ratelimit-limit-requests"] == "11"
        process.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        reloaded = client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=HI, max_tokens=1
        )
        assert reloaded.headers["x-ratelimit-limit-requests"] == "22"
        client.close()
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
    assert "policies reloaded: 1 policies from 1 files" in (tmp_path / "gateway.log").read_text()


def quota_command(folder: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """`.venv/bin/gateway quota ...` as the README writes it, from a project copy."""
    return subprocess.run(
        [str(folder / ".venv" / "bin" / "gateway"), "quota", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=folder,
        env=env,
    )


def printed_curl_lines(stderr: str) -> list[str]:
    return [line.strip() for line in stderr.splitlines() if line.strip().startswith("curl ")]


def run_printed(line: str, env: dict[str, str]) -> Any:
    """A printed curl line, pasted into a shell with the keys it names set."""
    keys = {"GATEWAY_ADMIN_KEY": ADMIN_KEY, "GATEWAY_KEY": DEMO_KEY}
    result = subprocess.run(
        ["bash", "-c", line + " --fail-with-body"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**env, **keys},
    )
    assert result.returncode == 0, (line, result.stdout, result.stderr)
    return json.loads(result.stdout)


def test_quota_show_and_reset_on_the_embedded_store_print_curl_lines_for_the_running_gateway(
    tmp_path: Path,
) -> None:
    """Exit status 2 (this config has no store the command can reach) and, on stderr,
    curl lines for the gateway's own routes at its configured address that work when pasted."""
    folder = project_copy(tmp_path)
    with shipped_gateway(folder) as gateway:
        client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=DEMO_KEY, max_retries=0)
        client.chat.completions.create(model="gpt-4o-mini", messages=HI, max_tokens=4)
        client.close()

        shown = quota_command(folder, gateway.env, "show", "user", "demo")
        assert (shown.returncode, shown.stdout) == (2, "")
        assert "has no backends.redis: its quota store is embedded in the serving" in shown.stderr
        admin_line, own_line = printed_curl_lines(shown.stderr)
        assert admin_line == (
            f'curl -sS -H "Authorization: Bearer $GATEWAY_ADMIN_KEY" {gateway.url}/admin/quota/user/demo'
        )
        assert own_line == f'curl -sS -H "Authorization: Bearer $GATEWAY_KEY" {gateway.url}/v1/quota'
        by_admin, own = run_printed(admin_line, gateway.env), run_printed(own_line, gateway.env)
        assert (by_admin["object"], by_admin["subject"], own["object"], own["user"]) == (
            "quota",
            "demo",
            "quota",
            "demo",
        )
        requests_used = [r["used"] for r in by_admin["limits"] if r["kind"] == "requests"]
        assert requests_used == [1]

        reset = quota_command(folder, gateway.env, "reset", "user", "demo")
        assert (reset.returncode, reset.stdout) == (2, "")
        [reset_line] = printed_curl_lines(reset.stderr)
        assert reset_line == (
            f'curl -sS -X DELETE -H "Authorization: Bearer $GATEWAY_ADMIN_KEY" {gateway.url}/admin/quota/user/demo'
        )
        assert run_printed(reset_line, gateway.env)["object"] == "quota.reset"
        after = run_printed(admin_line, gateway.env)
        assert [r["used"] for r in after["limits"]] == [0, 0, 0]


def test_quota_guidance_without_an_admin_api_and_on_a_wildcard_address(tmp_path: Path) -> None:
    folder = project_copy(tmp_path)
    shipped = (folder / "gateway.yaml").read_text()
    admin_section = shipped[shipped.index("admin:\n") : shipped.index("quota:\n")]
    (folder / "gateway.yaml").write_text(shipped.replace(admin_section, ""))
    env = {**os.environ, "GATEWAY_HOST": "0.0.0.0", "GATEWAY_PORT": "9123"}
    shown = quota_command(folder, env, "show", "team", "ml research", "--json")
    assert (shown.returncode, shown.stdout) == (2, "")
    assert "the admin API is off: add `admin: {key_sha256: ...}` to the config" in shown.stderr
    # Listening on every address: this machine's loopback answers; the id is quoted for a URL.
    assert printed_curl_lines(shown.stderr) == [
        'curl -sS -H "Authorization: Bearer $GATEWAY_ADMIN_KEY" http://127.0.0.1:9123/admin/quota/team/ml%20research',
        'curl -sS -H "Authorization: Bearer $GATEWAY_KEY" http://127.0.0.1:9123/v1/quota',
    ]


def test_the_shipped_admin_key_is_the_hash_the_config_holds() -> None:
    config = load_config(REPO / "gateway.yaml")
    assert config.admin_key_sha256 == hashlib.sha256(ADMIN_KEY.encode()).hexdigest()
    assert config.admin_address is None  # the admin API shares the public port
