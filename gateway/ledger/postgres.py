"""The PostgreSQL ledger: asyncpg pool, migrations, COPY-based idempotent batch writes."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, date, datetime
from typing import Any

import asyncpg

from gateway.auth import KeyRecord
from gateway.config import PostgresConfig
from gateway.ledger.records import (
    EVENT_GROUPS_SELECT,
    REPORT_GROUPS,
    SCOPE_COLUMNS,
    USAGE_COLUMNS,
    ConsoleSession,
    EventGroup,
    ModelUsage,
    ReportRow,
    UsageFilter,
    UsageRecord,
)
from gateway.ledger.schema import check_not_newer, migrations

_KEY_COLUMNS = "key_id, key_sha256, user_id, team_id, created_at, revoked_at, tags, expires_at, models"

_COLUMN_LIST = ", ".join(USAGE_COLUMNS)
# Batches land in a per-connection staging table, then move over in one statement that
# skips request ids already recorded, so a retried batch never counts twice.
_CREATE_STAGING = (
    "CREATE TEMP TABLE IF NOT EXISTS usage_staging "
    "(LIKE usage_events INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
)
_CREATE_FRESH = (
    "CREATE TEMP TABLE IF NOT EXISTS usage_fresh (request_id text PRIMARY KEY) ON COMMIT DELETE ROWS"
)
# Request ids are unique across monthly partitions through their own table: only the
# ids it did not have yet ("fresh") become events and count in the rollup.
_CLAIM_IDS = (
    "WITH claimed AS (INSERT INTO usage_request_ids (request_id, created_at) "
    "SELECT DISTINCT ON (request_id) request_id, created_at FROM usage_staging "
    "ON CONFLICT (request_id) DO NOTHING RETURNING request_id) "
    "INSERT INTO usage_fresh SELECT request_id FROM claimed"
)
_MOVE_STAGED = (
    f"INSERT INTO usage_events ({_COLUMN_LIST}) "
    f"SELECT DISTINCT ON (s.request_id) {', '.join('s.' + c for c in USAGE_COLUMNS)} "
    "FROM usage_staging s JOIN usage_fresh USING (request_id)"
)
_ROLL_UP = """
INSERT INTO usage_daily AS d
    (day, key_id, user_id, team_id, model, requests, prompt_tokens, completion_tokens, cost_usd)
SELECT (e.created_at AT TIME ZONE 'UTC')::date, e.key_id, e.user_id, coalesce(e.team_id, ''), e.model,
       count(*), coalesce(sum(e.prompt_tokens), 0), coalesce(sum(e.completion_tokens), 0),
       coalesce(sum(e.cost_usd), 0)
FROM (SELECT DISTINCT ON (s.request_id) s.* FROM usage_staging s JOIN usage_fresh USING (request_id)) e
GROUP BY 1, 2, 3, 4, 5
ON CONFLICT (day, key_id, user_id, team_id, model) DO UPDATE SET
    requests = d.requests + excluded.requests,
    prompt_tokens = d.prompt_tokens + excluded.prompt_tokens,
    completion_tokens = d.completion_tokens + excluded.completion_tokens,
    cost_usd = d.cost_usd + excluded.cost_usd
"""
_MIGRATIONS_TABLE = """
CREATE TABLE IF NOT EXISTS gateway_schema_migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)"""


class PostgresStore:
    def __init__(self, config: PostgresConfig) -> None:
        self._config = config
        self._pool: Any = None
        self.description = "postgres " + _safe_dsn(config.dsn)
        self._partitions: set[tuple[int, int]] = set()

    async def open(self) -> None:
        self._pool = await asyncpg.create_pool(
            self._config.dsn,
            min_size=self._config.min_connections,
            max_size=self._config.max_connections,
            command_timeout=30,
        )

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    async def migrate(self) -> list[int]:
        applied: list[int] = []
        async with self._pool.acquire() as conn, conn.transaction():
            # Several gateways may start at once; one migrates, the others wait.
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext('gateway-migrations'))")
            await conn.execute(_MIGRATIONS_TABLE)
            current = await conn.fetchval("SELECT coalesce(max(version), 0) FROM gateway_schema_migrations")
            check_not_newer("postgres", current)
            for migration in migrations("postgres"):
                if migration.version > current:
                    await conn.execute(migration.sql)
                    await conn.execute(
                        "INSERT INTO gateway_schema_migrations (version, name) VALUES ($1, $2)",
                        migration.version,
                        migration.name,
                    )
                    applied.append(migration.version)
        return applied

    async def schema_version(self) -> int:
        async with self._pool.acquire() as conn:
            exists = await conn.fetchval("SELECT to_regclass('gateway_schema_migrations')")
            if exists is None:
                return 0
            return int(await conn.fetchval("SELECT coalesce(max(version), 0) FROM gateway_schema_migrations"))

    async def write_usage(self, records: Sequence[UsageRecord]) -> int:
        """One transaction: events (skipping known request ids) and their daily rollups."""
        async with self._pool.acquire() as conn:
            await self._ensure_partitions(conn, records)
            async with conn.transaction():
                await conn.execute(_CREATE_STAGING)
                await conn.execute(_CREATE_FRESH)
                await conn.copy_records_to_table(
                    "usage_staging", records=[record.row() for record in records], columns=USAGE_COLUMNS
                )
                await conn.execute(_CLAIM_IDS)
                status = await conn.execute(_MOVE_STAGED)
                await conn.execute(_ROLL_UP)
        return int(status.rsplit(" ", 1)[-1])

    async def _ensure_partitions(self, conn: Any, records: Sequence[UsageRecord]) -> None:
        months = {
            (record.created_at.astimezone(UTC).year, record.created_at.astimezone(UTC).month)
            for record in records
        }
        for year, month in sorted(months - self._partitions):
            start = date(year, month, 1)
            end = date(year + month // 12, month % 12 + 1, 1)
            try:
                await conn.execute(
                    f"CREATE TABLE IF NOT EXISTS usage_events_{year:04d}_{month:02d} "
                    f"PARTITION OF usage_events FOR VALUES FROM ('{start}') TO ('{end}')"
                )
            except (asyncpg.exceptions.DuplicateTableError, asyncpg.exceptions.UniqueViolationError):
                pass  # another gateway made it at the same moment
            except asyncpg.exceptions.CheckViolationError:
                # Rows of that month already sit in the default partition: they stay there.
                pass
            self._partitions.add((year, month))

    async def find_key(self, sha256: str) -> KeyRecord | None:
        row = await self._pool.fetchrow(
            f"SELECT {_KEY_COLUMNS} FROM api_keys WHERE key_sha256 = $1",
            sha256,
        )
        return _key_record(row) if row is not None else None

    async def insert_key(self, record: KeyRecord) -> None:
        await self._pool.execute(
            "INSERT INTO api_keys "
            "(key_id, key_sha256, user_id, team_id, created_at, tags, expires_at, models) "
            "VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            record.key_id,
            record.sha256,
            record.user,
            record.team,
            record.created_at,
            list(record.tags),
            record.expires_at,
            list(record.models),
        )

    async def expire_key(self, key_id: str, at: datetime) -> bool:
        status = await self._pool.execute(
            "UPDATE api_keys SET expires_at = $2 WHERE key_id = $1 AND revoked_at IS NULL", key_id, at
        )
        return bool(status == "UPDATE 1")

    async def list_keys(self) -> list[KeyRecord]:
        rows = await self._pool.fetch(f"SELECT {_KEY_COLUMNS} FROM api_keys ORDER BY created_at, key_id")
        return [_key_record(row) for row in rows]

    async def revoke_key(self, key_id: str) -> bool:
        status = await self._pool.execute(
            "UPDATE api_keys SET revoked_at = now() WHERE key_id = $1 AND revoked_at IS NULL",
            key_id,
        )
        return bool(status == "UPDATE 1")

    async def ping(self) -> None:
        await self._pool.fetchval("SELECT 1")

    async def usage_report(
        self, by: str, since: date, until: date, where: UsageFilter | None = None
    ) -> list[ReportRow]:
        column = REPORT_GROUPS[by]
        conditions = where.conditions() if where is not None else []
        # Column names come from UsageFilter's fixed set, values are parameters.
        filters = "".join(f" AND {name} = ${index}" for index, (name, _) in enumerate(conditions, start=3))
        rows = await self._pool.fetch(
            f"SELECT {column}::text AS name, sum(requests) AS requests, sum(prompt_tokens) AS prompt, "
            "sum(completion_tokens) AS completion, sum(cost_usd) AS cost FROM usage_daily "
            f"WHERE day >= $1 AND day < $2{filters} GROUP BY {column} ORDER BY {column}",
            since,
            until,
            *(value for _, value in conditions),
        )
        return [
            ReportRow(
                row["name"],
                int(row["requests"]),
                int(row["prompt"]),
                int(row["completion"]),
                float(row["cost"]),
            )
            for row in rows
        ]

    async def event_groups(self, since: datetime, until: datetime) -> list[EventGroup]:
        select = EVENT_GROUPS_SELECT.format(exact="prompt_estimate_exact", since="$1", until="$2")
        rows = await self._pool.fetch(select, since, until)
        return [EventGroup(row[0], row[1], row[2], *(int(value) for value in tuple(row)[3:])) for row in rows]

    async def insert_console_session(self, session: ConsoleSession) -> None:
        await self._pool.execute(
            "INSERT INTO console_sessions (session_sha256, created_at, last_seen_at, expires_at) "
            "VALUES ($1, $2, $3, $4)",
            session.sha256,
            session.created_at,
            session.last_seen_at,
            session.expires_at,
        )

    async def find_console_session(self, sha256: str) -> ConsoleSession | None:
        row = await self._pool.fetchrow(
            "SELECT session_sha256, created_at, last_seen_at, expires_at FROM console_sessions "
            "WHERE session_sha256 = $1",
            sha256,
        )
        return ConsoleSession(*row) if row is not None else None

    async def touch_console_session(self, sha256: str, at: datetime) -> None:
        await self._pool.execute(
            "UPDATE console_sessions SET last_seen_at = $2 WHERE session_sha256 = $1", sha256, at
        )

    async def delete_console_session(self, sha256: str) -> bool:
        status = await self._pool.execute("DELETE FROM console_sessions WHERE session_sha256 = $1", sha256)
        return bool(status == "DELETE 1")

    async def delete_stale_console_sessions(self, idle_before: datetime, now: datetime) -> int:
        status = await self._pool.execute(
            "DELETE FROM console_sessions WHERE last_seen_at < $1 OR expires_at <= $2", idle_before, now
        )
        return int(status.rsplit(" ", 1)[-1])

    async def usage_by_model(self, scope: str, subject: str, since: datetime) -> list[ModelUsage]:
        column = SCOPE_COLUMNS[scope]
        rows = await self._pool.fetch(
            "SELECT model, count(*) AS requests, coalesce(sum(prompt_tokens), 0) AS prompt, "
            "coalesce(sum(completion_tokens), 0) AS completion, coalesce(sum(cost_usd), 0) AS cost "
            f"FROM usage_events WHERE {column} = $1 AND created_at >= $2 GROUP BY model",
            subject,
            since,
        )
        return [
            ModelUsage(
                row["model"], row["requests"], int(row["prompt"]), int(row["completion"]), float(row["cost"])
            )
            for row in rows
        ]


def _key_record(row: Any) -> KeyRecord:
    return KeyRecord(
        key_id=row["key_id"],
        sha256=row["key_sha256"],
        user=row["user_id"],
        team=row["team_id"],
        created_at=row["created_at"],
        revoked_at=row["revoked_at"],
        tags=tuple(row["tags"]),
        expires_at=row["expires_at"],
        models=tuple(row["models"]),
    )


def _safe_dsn(dsn: str) -> str:
    """The DSN without its password, for logs."""
    scheme, sep, rest = dsn.partition("://")
    if not sep or "@" not in rest:
        return dsn if sep else "(dsn)"
    credentials, _, location = rest.rpartition("@")
    user = credentials.split(":", 1)[0]
    return f"{scheme}://{user}@{location}"
