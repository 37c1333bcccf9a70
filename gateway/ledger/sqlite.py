"""The embedded ledger: one SQLite file, driven from a single worker thread."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, date, datetime
from pathlib import Path
from typing import TypeVar

from gateway.auth import KeyRecord
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

T = TypeVar("T")

_INSERT_USAGE = (
    f"INSERT OR IGNORE INTO usage_events ({', '.join(USAGE_COLUMNS)}) "
    f"VALUES ({', '.join('?' for _ in USAGE_COLUMNS)})"
)
_ROLL_UP = """
INSERT INTO usage_daily
    (day, key_id, user_id, team_id, model, requests, prompt_tokens, completion_tokens, cost_usd)
VALUES (substr(?, 1, 10), ?, ?, coalesce(?, ''), ?, 1, coalesce(?, 0), coalesce(?, 0), coalesce(?, 0))
ON CONFLICT (day, key_id, user_id, team_id, model) DO UPDATE SET
    requests = requests + 1,
    prompt_tokens = prompt_tokens + excluded.prompt_tokens,
    completion_tokens = completion_tokens + excluded.completion_tokens,
    cost_usd = cost_usd + excluded.cost_usd
"""


class SqliteStore:
    def __init__(self, path: Path) -> None:
        self._path = path
        self._connection: sqlite3.Connection | None = None
        # sqlite3 connections belong to one thread; every call runs on this one.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-ledger")
        self.description = f"sqlite {path}"

    async def _run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        def call() -> T:
            assert self._connection is not None, "store is not open"
            return work(self._connection)

        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    async def open(self) -> None:
        def connect() -> sqlite3.Connection:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            connection = sqlite3.connect(self._path, isolation_level=None)
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA busy_timeout=5000")
            return connection

        loop = asyncio.get_running_loop()
        self._connection = await loop.run_in_executor(self._executor, connect)

    async def close(self) -> None:
        if self._connection is not None:
            await self._run(lambda connection: connection.close())
            self._connection = None
        self._executor.shutdown(wait=True)

    async def migrate(self) -> list[int]:
        def apply(connection: sqlite3.Connection) -> list[int]:
            connection.execute("BEGIN IMMEDIATE")
            try:
                connection.execute(
                    "CREATE TABLE IF NOT EXISTS gateway_schema_migrations "
                    "(version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)"
                )
                current = _version(connection)
                check_not_newer("sqlite", current)
                applied: list[int] = []
                for migration in migrations("sqlite"):
                    if migration.version > current:
                        for statement in _statements(migration.sql):
                            connection.execute(statement)
                        connection.execute(
                            "INSERT INTO gateway_schema_migrations VALUES (?, ?, ?)",
                            (migration.version, migration.name, _text(datetime.now(UTC))),
                        )
                        applied.append(migration.version)
                connection.execute("COMMIT")
                return applied
            except BaseException:
                connection.execute("ROLLBACK")
                raise

        return await self._run(apply)

    async def schema_version(self) -> int:
        def read(connection: sqlite3.Connection) -> int:
            exists = connection.execute(
                "SELECT 1 FROM sqlite_master WHERE name = 'gateway_schema_migrations'"
            ).fetchone()
            return _version(connection) if exists else 0

        return await self._run(read)

    async def write_usage(self, records: Sequence[UsageRecord]) -> int:
        rows = [tuple(_value(value) for value in record.row()) for record in records]

        def insert(connection: sqlite3.Connection) -> int:
            inserted = 0
            connection.execute("BEGIN")
            try:
                for record, row in zip(records, rows, strict=True):
                    # Only a request id seen for the first time counts in the rollup.
                    if connection.execute(_INSERT_USAGE, row).rowcount == 1:
                        inserted += 1
                        connection.execute(
                            _ROLL_UP,
                            (
                                row[1],
                                record.key_id,
                                record.user_id,
                                record.team_id,
                                record.model,
                                record.prompt_tokens,
                                record.completion_tokens,
                                record.cost_usd,
                            ),
                        )
                connection.execute("COMMIT")
            except BaseException:
                connection.execute("ROLLBACK")
                raise
            return inserted

        return await self._run(insert)

    async def find_key(self, sha256: str) -> KeyRecord | None:
        def find(connection: sqlite3.Connection) -> KeyRecord | None:
            row = connection.execute(
                f"SELECT {_KEY_COLUMNS} FROM api_keys WHERE key_sha256 = ?",
                (sha256,),
            ).fetchone()
            return _key_record(row) if row else None

        return await self._run(find)

    async def insert_key(self, record: KeyRecord) -> None:
        values = (
            record.key_id,
            record.sha256,
            record.user,
            record.team,
            _text(record.created_at),
            json.dumps(list(record.tags)),
            _text(record.expires_at) if record.expires_at else None,
            json.dumps(list(record.models)),
        )
        await self._run(
            lambda connection: connection.execute(
                "INSERT INTO api_keys "
                "(key_id, key_sha256, user_id, team_id, created_at, tags, expires_at, models) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                values,
            )
        )

    async def list_keys(self) -> list[KeyRecord]:
        def read(connection: sqlite3.Connection) -> list[KeyRecord]:
            rows = connection.execute(
                f"SELECT {_KEY_COLUMNS} FROM api_keys ORDER BY created_at, key_id"
            ).fetchall()
            return [_key_record(row) for row in rows]

        return await self._run(read)

    async def revoke_key(self, key_id: str) -> bool:
        now = _text(datetime.now(UTC))

        def revoke(connection: sqlite3.Connection) -> bool:
            cursor = connection.execute(
                "UPDATE api_keys SET revoked_at = ? WHERE key_id = ? AND revoked_at IS NULL",
                (now, key_id),
            )
            return cursor.rowcount == 1

        return await self._run(revoke)

    async def usage_report(
        self, by: str, since: date, until: date, where: UsageFilter | None = None
    ) -> list[ReportRow]:
        column = REPORT_GROUPS[by]
        conditions = where.conditions() if where is not None else []
        # Column names come from UsageFilter's fixed set, values are parameters.
        filters = "".join(f" AND {name} = ?" for name, _ in conditions)
        parameters = (since.isoformat(), until.isoformat(), *(value for _, value in conditions))

        def read(connection: sqlite3.Connection) -> list[ReportRow]:
            rows = connection.execute(
                f"SELECT {column}, sum(requests), sum(prompt_tokens), sum(completion_tokens), sum(cost_usd) "
                f"FROM usage_daily WHERE day >= ? AND day < ?{filters} GROUP BY {column} ORDER BY {column}",
                parameters,
            ).fetchall()
            return [ReportRow(str(r[0]), int(r[1]), int(r[2]), int(r[3]), float(r[4])) for r in rows]

        return await self._run(read)

    async def event_groups(self, since: datetime, until: datetime) -> list[EventGroup]:
        select = EVENT_GROUPS_SELECT.format(exact="prompt_estimate_exact = 1", since="?", until="?")

        def read(connection: sqlite3.Connection) -> list[EventGroup]:
            rows = connection.execute(select, (_text(since), _text(until))).fetchall()
            return [EventGroup(str(r[0]), int(r[1]), r[2], *(int(value) for value in r[3:])) for r in rows]

        return await self._run(read)

    async def insert_console_session(self, session: ConsoleSession) -> None:
        values = (
            session.sha256,
            _text(session.created_at),
            _text(session.last_seen_at),
            _text(session.expires_at),
        )
        await self._run(
            lambda connection: connection.execute(
                "INSERT INTO console_sessions (session_sha256, created_at, last_seen_at, expires_at) "
                "VALUES (?, ?, ?, ?)",
                values,
            )
        )

    async def find_console_session(self, sha256: str) -> ConsoleSession | None:
        def find(connection: sqlite3.Connection) -> ConsoleSession | None:
            row = connection.execute(
                "SELECT session_sha256, created_at, last_seen_at, expires_at FROM console_sessions "
                "WHERE session_sha256 = ?",
                (sha256,),
            ).fetchone()
            if row is None:
                return None
            return ConsoleSession(row[0], *(datetime.fromisoformat(value) for value in row[1:]))

        return await self._run(find)

    async def touch_console_session(self, sha256: str, at: datetime) -> None:
        at_text = _text(at)
        await self._run(
            lambda connection: connection.execute(
                "UPDATE console_sessions SET last_seen_at = ? WHERE session_sha256 = ?", (at_text, sha256)
            )
        )

    async def delete_console_session(self, sha256: str) -> bool:
        def delete(connection: sqlite3.Connection) -> bool:
            cursor = connection.execute("DELETE FROM console_sessions WHERE session_sha256 = ?", (sha256,))
            return cursor.rowcount == 1

        return await self._run(delete)

    async def delete_stale_console_sessions(self, idle_before: datetime, now: datetime) -> int:
        bounds = (_text(idle_before), _text(now))

        def delete(connection: sqlite3.Connection) -> int:
            cursor = connection.execute(
                "DELETE FROM console_sessions WHERE last_seen_at < ? OR expires_at <= ?", bounds
            )
            return cursor.rowcount

        return await self._run(delete)

    async def usage_by_model(self, scope: str, subject: str, since: datetime) -> list[ModelUsage]:
        column = SCOPE_COLUMNS[scope]
        since_text = _text(since)

        def read(connection: sqlite3.Connection) -> list[ModelUsage]:
            rows = connection.execute(
                "SELECT model, count(*), coalesce(sum(prompt_tokens), 0), "
                "coalesce(sum(completion_tokens), 0), coalesce(sum(cost_usd), 0) FROM usage_events "
                f"WHERE {column} = ? AND created_at >= ? GROUP BY model",
                (subject, since_text),
            ).fetchall()
            return [ModelUsage(row[0], row[1], int(row[2]), int(row[3]), float(row[4])) for row in rows]

        return await self._run(read)

    async def expire_key(self, key_id: str, at: datetime) -> bool:
        at_text = _text(at)

        def expire(connection: sqlite3.Connection) -> bool:
            cursor = connection.execute(
                "UPDATE api_keys SET expires_at = ? WHERE key_id = ? AND revoked_at IS NULL",
                (at_text, key_id),
            )
            return cursor.rowcount == 1

        return await self._run(expire)

    async def ping(self) -> None:
        await self._run(lambda connection: connection.execute("SELECT 1").fetchone())


def _statements(sql: str) -> list[str]:
    """Split a migration into statements (our migrations keep ';' out of comments)."""
    lines = [line for line in sql.splitlines() if not line.lstrip().startswith("--")]
    return [statement for statement in "\n".join(lines).split(";") if statement.strip()]


def _version(connection: sqlite3.Connection) -> int:
    row = connection.execute("SELECT coalesce(max(version), 0) FROM gateway_schema_migrations")
    return int(row.fetchone()[0])


def _text(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat()


def _value(value: object) -> object:
    if isinstance(value, datetime):
        return _text(value)
    if isinstance(value, bool):
        return int(value)
    return value


def _key_record(row: tuple[str, str, str, str | None, str, str | None, str, str | None, str]) -> KeyRecord:
    return KeyRecord(
        key_id=row[0],
        sha256=row[1],
        user=row[2],
        team=row[3],
        created_at=datetime.fromisoformat(row[4]),
        revoked_at=datetime.fromisoformat(row[5]) if row[5] else None,
        tags=tuple(json.loads(row[6])),
        expires_at=datetime.fromisoformat(row[7]) if row[7] else None,
        models=tuple(json.loads(row[8])),
    )
