"""`gateway doctor`: check every part the gateway depends on, and name the fix.

Each check answers ok, warn or fail with what it saw; a failure says what to do. The
report is for people (a table) or machines (--json); the exit status is 1 when
anything failed.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from importlib import resources
from typing import Any

import asyncpg

from gateway.config import GatewayConfig
from gateway.errors import UpstreamError
from gateway.ledger.schema import latest_version
from gateway.policies import PolicyHolder
from gateway.providers import build_http_provider
from gateway.quota.store import open_redis
from gateway.tokens import TokenizerFilesMissing, TokenizerRegistry, TokenizerUnavailable
from gateway.tokens.files import require_cached
from gateway.tokens.in_use import encodings_in_use

EXPECTED_TABLES = (
    "api_keys",
    "console_sessions",
    "gateway_schema_migrations",
    "usage_daily",
    "usage_events",
    "usage_request_ids",
)
EXPECTED_INDEXES = (
    "usage_events_created_at_idx",
    "usage_events_user_created_at_idx",
    "usage_events_team_created_at_idx",
    "usage_events_key_created_at_idx",
    "usage_daily_user_day_idx",
    "usage_daily_team_day_idx",
    "usage_daily_model_day_idx",
)
LUA_SCRIPTS = ("reserve_quota.lua", "settle_quota.lua", "read_quota.lua", "sync_calendar.lua")
LONG_QUERY_SECONDS = 60
# Known counts: a tokenizer that loads but counts these differently is the wrong file.
TOKENIZER_SAMPLES = {
    "o200k_base": ("hello world", 2),
    "cl100k_base": ("hello world", 2),
    "llama3": ("hello world", 2),
    "llama4": ("hello world", 2),
}


@dataclass
class Check:
    name: str
    status: str = "ok"  # ok | warn | fail
    detail: str = ""
    fix: str | None = None
    facts: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


async def _run(name: str, probe: Callable[[Check], Awaitable[None]]) -> Check:
    check = Check(name)
    started = time.monotonic()
    try:
        async with asyncio.timeout(15):
            await probe(check)
    except Exception as exc:  # a doctor reports; it does not crash
        check.status = "fail"
        check.detail = check.detail or f"{type(exc).__name__}: {exc}"
    check.seconds = round(time.monotonic() - started, 3)
    return check


async def diagnose(config: GatewayConfig) -> list[Check]:
    checks = [await _run("policies", lambda c: _policies(c, config))]
    checks.append(await _run("database", lambda c: _database(c, config)))
    checks.append(await _run("redis", lambda c: _redis(c, config)))
    checks.append(await _run("tokenizers", lambda c: _tokenizers(c, config)))
    for name in config.providers:
        checks.append(await _run(f"upstream {name}", _upstream_probe(config, name)))
    return checks


def _upstream_probe(config: GatewayConfig, name: str) -> Callable[[Check], Awaitable[None]]:
    async def probe(check: Check) -> None:
        await _upstream(check, config, name)

    return probe


async def _policies(check: Check, config: GatewayConfig) -> None:
    holder = PolicyHolder(config.base_dir, config.quota.policy_glob)
    check.detail = f"{len(holder.current.policies)} policies in {len(holder.current.files)} files"
    if not holder.current.policies:
        check.status, check.fix = "warn", f"no policy matches {config.quota.policy_glob}: nothing is limited"


async def _database(check: Check, config: GatewayConfig) -> None:
    expected = latest_version("postgres")
    if config.backends.postgres is None:
        check.detail = f"embedded SQLite ledger at {config.backends.sqlite.path}"
        return
    dsn = config.backends.postgres.dsn
    try:
        connection = await asyncpg.connect(dsn, timeout=5)
    except Exception as exc:
        check.status = "fail"
        check.detail = f"cannot connect: {type(exc).__name__}: {exc}"
        check.fix = "start PostgreSQL, or correct backends.postgres.dsn in gateway.yaml"
        return
    try:
        version = await connection.fetchval("SHOW server_version")
        tables = {
            r["relname"]
            for r in await connection.fetch("SELECT relname FROM pg_class WHERE relkind IN ('r', 'p')")
        }
        indexes = {
            r["relname"]
            for r in await connection.fetch("SELECT relname FROM pg_class WHERE relkind IN ('i', 'I')")
        }
        schema = 0
        if "gateway_schema_migrations" in tables:
            schema = int(
                await connection.fetchval("SELECT coalesce(max(version), 0) FROM gateway_schema_migrations")
            )
        sizes = {
            r["name"]: int(r["bytes"])
            for r in await connection.fetch(
                "SELECT relname AS name, pg_total_relation_size(oid) AS bytes FROM pg_class "
                "WHERE relname = ANY($1::text[])",
                list(EXPECTED_TABLES),
            )
        }
        active = await connection.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
        )
        long_running = await connection.fetch(
            "SELECT pid, now() - query_start AS running, left(query, 80) AS query FROM pg_stat_activity "
            f"WHERE state = 'active' AND now() - query_start > interval '{LONG_QUERY_SECONDS} seconds'"
        )
    finally:
        await connection.close()
    missing_tables = sorted(set(EXPECTED_TABLES) - tables)
    missing_indexes = sorted(set(EXPECTED_INDEXES) - indexes)
    check.facts = {
        "server_version": version,
        "schema_version": schema,
        "expected_schema_version": expected,
        "table_bytes": sizes,
        "active_connections": active,
        "long_running_queries": [dict(r) for r in long_running],
        "missing_tables": missing_tables,
        "missing_indexes": missing_indexes,
    }
    check.detail = f"PostgreSQL {version}, schema {schema} of {expected}, {active} connections"
    if schema > expected:
        check.status, check.fix = "fail", "the database was migrated by a newer gateway: upgrade this one"
    elif schema < expected or missing_tables or missing_indexes:
        check.status = "fail"
        missing = ", ".join(missing_tables + missing_indexes) or "none"
        check.detail += f"; missing: {missing}"
        check.fix = "run `gateway migrate --config <gateway.yaml>`"
    elif long_running:
        check.status = "warn"
        check.detail += f"; {len(long_running)} queries running for over {LONG_QUERY_SECONDS}s"
        check.fix = "look at pg_stat_activity; cancel with pg_cancel_backend(pid) if they are stuck"


async def _redis(check: Check, config: GatewayConfig) -> None:
    if config.backends.redis is None:
        check.detail = "embedded quota store (in the serving process: per process, lost on restart)"
        return
    client, description = open_redis(config.backends.redis)
    try:
        try:
            await client.ping()
        except Exception as exc:
            check.status, check.detail = "fail", f"cannot reach {description}: {type(exc).__name__}: {exc}"
            check.fix = "start Redis, or correct backends.redis.url in gateway.yaml"
            return
        info = await client.info()
        if isinstance(info, dict) and "redis_version" not in info:  # a cluster answers per node
            info = next(iter(info.values()), {})
        shas = [
            hashlib.sha1(resources.files("gateway.quota").joinpath("lua", name).read_bytes()).hexdigest()
            for name in LUA_SCRIPTS
        ]
        loaded = await client.script_exists(*shas)
        flags = loaded if isinstance(loaded, list) else list(loaded)
        check.facts = {
            "version": info.get("redis_version"),
            "used_memory": info.get("used_memory_human"),
            "maxmemory_policy": info.get("maxmemory_policy"),
            "scripts_loaded": dict(zip(LUA_SCRIPTS, [bool(flag) for flag in flags], strict=False)),
        }
        check.detail = (
            f"{description}: Redis {info.get('redis_version')}, {info.get('used_memory_human')} used"
        )
        if config.backends.redis.cluster:
            cluster = await client.execute_command("CLUSTER INFO")
            state_value = cluster.get("cluster_state") if isinstance(cluster, dict) else None
            check.facts["cluster_state"] = state_value
            if state_value != "ok":
                check.status, check.fix = "fail", "the cluster is not ok: see `redis-cli cluster info`"
        if info.get("maxmemory_policy") not in (None, "noeviction"):
            check.status = "warn"
            check.fix = "set maxmemory-policy noeviction: evicting quota counters loses usage"
    finally:
        await client.aclose()


async def _tokenizers(check: Check, config: GatewayConfig) -> None:
    registry = TokenizerRegistry(config.tokens)
    check.facts["cache_dir"] = str(registry.cache_dir)
    try:
        require_cached(registry.cache_dir, encodings_in_use(config))
    except TokenizerFilesMissing as missing:
        check.status, check.detail, check.fix = "fail", "; ".join(missing.problems), missing.fix
        return
    results: dict[str, str] = {}
    reasons: dict[str, str] = {}
    for name, model in config.models.items():
        try:
            profile = registry.profile(model.upstream_model, model.tokenizer)
        except TokenizerUnavailable as exc:
            check.status, check.fix = "fail", f"models.{name}: {exc}"
            results[name] = "unavailable"
            continue
        tokenizer = profile.tokenizer
        sample = TOKENIZER_SAMPLES.get(tokenizer.name)
        ok = registry.self_test(tokenizer.name) and (
            sample is None or tokenizer.count(sample[0]) == sample[1]
        )
        results[name] = (
            f"{tokenizer.name} ({'exact' if profile.exact else 'estimate'})" if ok else "failed self-test"
        )
        reasons[name] = f"{'exact' if profile.exact else 'estimate'}: {profile.reason}"
        if not ok:
            check.status, check.fix = "fail", f"the tokenizer file of {tokenizer.name} is wrong or damaged"
    check.facts |= {"models": results, "reasons": reasons}
    check.detail = f"{len(results)} models; " + ", ".join(sorted(set(results.values())))


async def _upstream(check: Check, config: GatewayConfig, name: str) -> None:
    """The provider asked for its model list by the client calls use (proxy, TLS, key)."""
    provider = config.providers[name]
    if provider.type == "mock":
        check.detail = "built-in mock provider"
        return
    assert provider.base_url is not None
    client = build_http_provider(provider)
    try:
        status = await client.probe(seconds=min(10.0, provider.timeouts.connect_seconds + 5))
    except UpstreamError as exc:
        check.status, check.detail = "fail", f"cannot reach {provider.base_url}: {exc.detail or exc.code}"
        check.fix = _reach_fix(name, exc.detail)
        return
    finally:
        await client.close()
    check.detail = f"{provider.base_url} answers (HTTP {status} to a model list request)"
    check.facts = {"status": status}
    if provider.api_key_env and not _env_set(provider.api_key_env):
        check.status = "warn"
        check.fix = f"set the environment variable {provider.api_key_env} (providers.{name}.api_key_env)"
    elif status in (401, 403):
        check.status = "fail"
        check.fix = f"the provider refused the key in {provider.api_key_env} (providers.{name}.api_key_env)"


def _reach_fix(name: str, cause: str | None) -> str:
    if cause == "dns":
        return f"providers.{name}.base_url names a host this machine cannot resolve"
    if cause == "tls":
        return f"the provider's certificate is untrusted: set providers.{name}.tls.ca_file or check the host"
    if cause == "proxy":
        return f"the proxy failed: check HTTPS_PROXY / HTTP_PROXY / NO_PROXY or providers.{name}.proxy"
    return f"check providers.{name}.base_url and the network to it"


def _env_set(name: str) -> bool:
    import os

    return bool(os.environ.get(name))


def render(checks: list[Check]) -> str:
    marks = {"ok": "ok  ", "warn": "WARN", "fail": "FAIL"}
    lines = []
    for check in checks:
        lines.append(f"[{marks[check.status]}] {check.name}: {check.detail}")
        if check.fix:
            lines.append(f"       fix: {check.fix}")
    failed = sum(1 for check in checks if check.status == "fail")
    lines.append(f"{len(checks)} checks, {failed} failed")
    return "\n".join(lines)


def as_json(checks: list[Check]) -> list[dict[str, Any]]:
    return [asdict(check) for check in checks]
