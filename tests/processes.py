"""Real `gateway serve` processes for tests: their config, their start, their readiness."""

from __future__ import annotations

import asyncio
import os
import resource
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import aiohttp

from tests.conftest import PROVIDER_KEY, REDIS_KEY_PREFIX, USER_KEY, _sha256


def write_config(
    directory: Path, redis_url: str, database_url: str, upstream_url: str, policy: str, *, extra: str = ""
) -> None:
    """gateway.yaml (Redis, PostgreSQL, the fake provider, alice's key) and one policy file."""
    (directory / "policies").mkdir(exist_ok=True)
    (directory / "policies" / "test.yaml").write_text(policy)
    (directory / "gateway.yaml").write_text(
        textwrap.dedent(
            f"""\
            backends:
              redis: {{url: "{redis_url}", key_prefix: "{REDIS_KEY_PREFIX}proc:{uuid.uuid4().hex[:8]}:"}}
              postgres: {{dsn: "{database_url}"}}
            providers:
              fake: {{type: openai, base_url: "{upstream_url}", api_key_env: FAKE_PROVIDER_KEY}}
            models:
              gpt-4o-mini: {{provider: fake}}
            keys:
              - {{id: alice-key, sha256: {_sha256(USER_KEY)}, user: alice, team: research}}
            """
        )
        + extra
    )


def serve(directory: Path, port: int, *, open_files: int | None = None) -> subprocess.Popen[bytes]:
    """open_files: the soft limit of open files the process starts with (as systemd sets one)."""

    def limit_open_files() -> None:
        if open_files is not None:
            _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            resource.setrlimit(resource.RLIMIT_NOFILE, (open_files, hard))

    # Request log lines would fill an unread pipe and block the gateway: a file it is.
    return subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--config", "gateway.yaml", "--port", str(port)],
        cwd=directory,
        env={**os.environ, "FAKE_PROVIDER_KEY": PROVIDER_KEY},
        stderr=(directory / f"gateway-{port}.log").open("a"),
        preexec_fn=limit_open_files,
    )


async def wait_healthy(port: int, process: subprocess.Popen[bytes], path: str = "/health") -> None:
    """Until `path` answers 200; fails if the process exits first or 30 s pass (its log is gateway-{port}.log)."""
    async with aiohttp.ClientSession() as session:
        for _ in range(300):
            try:
                async with session.get(f"http://127.0.0.1:{port}{path}") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            if process.poll() is not None:
                break
            await asyncio.sleep(0.1)
    raise AssertionError(f"gateway on port {port} did not become healthy (exit {process.poll()})")
