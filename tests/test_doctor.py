"""`gateway doctor` against a healthy setup and against each broken part."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import asyncpg

from gateway.ledger.schema import latest_version
from tests.conftest import DATABASE_URL, ConfigWriter, refused_port


async def doctor(config: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """Run as a process while this event loop keeps serving the fake providers."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway",
        "doctor",
        "--config",
        str(config),
        *extra,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "FAKE_PROVIDER_KEY": "set"},
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 90)
    assert process.returncode is not None
    return subprocess.CompletedProcess([], process.returncode, stdout.decode(), stderr.decode())


def by_name(result: subprocess.CompletedProcess[str]) -> dict[str, dict[str, object]]:
    return {check["name"]: check for check in json.loads(result.stdout)}


async def test_a_healthy_setup(config_writer: ConfigWriter, pg: asyncpg.Connection) -> None:
    config = config_writer.write()
    # The gateway migrates at start; doctor only looks, so migrate first.
    assert (
        subprocess.run(
            [sys.executable, "-m", "gateway", "migrate", "--config", str(config)], timeout=60
        ).returncode
        == 0
    )
    result = await doctor(config, "--json")
    assert result.returncode == 0, result.stdout
    checks = by_name(result)
    assert {name: check["status"] for name, check in checks.items()} == {
        "policies": "ok",
        "database": "ok",
        "redis": "ok",
        "tokenizers": "ok",
        "upstream fake": "ok",
        "upstream azure": "ok",
        "upstream anthropic": "ok",
        "upstream mock": "ok",
    }
    database = checks["database"]["facts"]
    assert isinstance(database, dict)
    assert database["schema_version"] == database["expected_schema_version"] == latest_version("postgres")
    assert database["missing_tables"] == [] and database["missing_indexes"] == []
    redis = checks["redis"]["facts"]
    assert isinstance(redis, dict) and str(redis["version"]).startswith(("6", "7", "8"))
    table = await doctor(config)
    assert table.returncode == 0 and "8 checks, 0 failed" in table.stdout


async def test_each_broken_part_fails_and_names_the_fix(
    config_writer: ConfigWriter, pg: asyncpg.Connection
) -> None:
    config_writer.redis_url = f"redis://127.0.0.1:{refused_port()}/0"
    config_writer.upstream_url = f"http://127.0.0.1:{refused_port()}/v1"
    # A database that exists but was never migrated.
    name = f"gateway_doctor_{uuid.uuid4().hex[:8]}"
    subprocess.run(
        ["psql", DATABASE_URL, "-qc", f'CREATE DATABASE "{name}"'], check=True, capture_output=True
    )
    try:
        config_writer.database_url = DATABASE_URL.rsplit("/", 1)[0] + f"/{name}"
        result = await doctor(config_writer.write(), "--json")
    finally:
        subprocess.run(["psql", DATABASE_URL, "-qc", f'DROP DATABASE "{name}"'], capture_output=True)
    assert result.returncode == 1
    checks = by_name(result)
    assert checks["database"]["status"] == "fail"
    assert checks["database"]["fix"] == "run `gateway migrate --config <gateway.yaml>`"
    assert checks["redis"]["status"] == "fail"
    assert checks["redis"]["fix"] == "start Redis, or correct backends.redis.url in gateway.yaml"
    assert checks["upstream fake"]["status"] == "fail"
    assert checks["upstream fake"]["fix"] == "check providers.fake.base_url and the network to it"

    config_writer.database_url = f"postgresql://postgres@127.0.0.1:{refused_port()}/nowhere"
    unreachable = by_name(await doctor(config_writer.write(), "--json"))
    assert (
        unreachable["database"]["fix"] == "start PostgreSQL, or correct backends.postgres.dsn in gateway.yaml"
    )


async def test_an_invalid_config_is_named_with_its_line(tmp_path: Path) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text("providers:\n  p: {type: openai}\nmodels:\n  m: {provider: p}\n")
    result = await doctor(config)
    assert result.returncode == 2
    assert f"{config}:2: providers.p.base_url: is required" in result.stderr
