"""Both ledger stores: idempotent writes by request id, migrations, schema guard."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import pytest

from gateway.config import PostgresConfig
from gateway.ledger import LedgerStore, UsageRecord
from gateway.ledger.postgres import PostgresStore, _safe_dsn
from gateway.ledger.schema import SchemaTooNew, latest_version
from gateway.ledger.sqlite import SqliteStore

RECORD = UsageRecord(
    request_id="req_1",
    created_at=datetime(2026, 11, 28, 12, 0, tzinfo=UTC),
    key_id="k",
    user_id="alice",
    team_id=None,
    route="chat/completions",
    model="gpt-4o-mini",
    provider="fake",
    upstream_model="gpt-4o-mini",
    stream=False,
    status=200,
    error_code=None,
    prompt_tokens_estimated=8,
    prompt_estimate_exact=True,
    reserved_tokens=48,
    prompt_tokens=8,
    completion_tokens=5,
    usage_source="provider",
    latency_ms=12.5,
    upstream_latency_ms=10.0,
    client_request_id=None,
)


def test_a_row_holds_every_field_in_column_order() -> None:
    from gateway.ledger.records import USAGE_COLUMNS

    # Every field a different value, so a swapped or missing one shows.
    record = RECORD._replace(
        team_id="t",
        error_code="e",
        client_request_id="c",
        cost_usd=0.25,
        attempts=3,
        upstream_model="u",
        prompt_tokens=9,
    )
    assert record.row() == tuple(getattr(record, column) for column in USAGE_COLUMNS)
    assert USAGE_COLUMNS[:3] == ("request_id", "created_at", "key_id")


@pytest.fixture(params=["postgres", "sqlite"])
async def store(
    request: pytest.FixtureRequest, tmp_path: Path, database_url: str
) -> AsyncIterator[LedgerStore]:
    opened: LedgerStore
    if request.param == "postgres":
        pg: asyncpg.Connection = await asyncpg.connect(database_url)
        if await pg.fetchval("SELECT to_regclass('usage_events')") is not None:
            await pg.execute("TRUNCATE usage_events, usage_request_ids, usage_daily, api_keys")
        await pg.close()
        opened = PostgresStore(PostgresConfig(dsn=database_url))
    else:
        opened = SqliteStore(tmp_path / "ledger.db")
    await opened.open()
    await opened.migrate()
    yield opened
    await opened.close()


async def test_a_replayed_batch_never_counts_twice(store: LedgerStore) -> None:
    second = RECORD._replace(request_id="req_2", completion_tokens=None, usage_source="none")
    assert await store.write_usage([RECORD, second]) == 2
    assert await store.write_usage([RECORD, second]) == 0
    third = RECORD._replace(request_id="req_3")
    assert await store.write_usage([second, third]) == 1


async def test_migrate_is_idempotent_and_versioned(store: LedgerStore) -> None:
    assert await store.migrate() == []
    dialect = "postgres" if isinstance(store, PostgresStore) else "sqlite"
    assert await store.schema_version() == latest_version(dialect) == 8


async def test_a_newer_schema_is_refused(store: LedgerStore, database_url: str, tmp_path: Path) -> None:
    if isinstance(store, PostgresStore):
        pg = await asyncpg.connect(database_url)
        await pg.execute("INSERT INTO gateway_schema_migrations (version, name) VALUES (999, 'future')")
        try:
            with pytest.raises(SchemaTooNew):
                await store.migrate()
        finally:
            await pg.execute("DELETE FROM gateway_schema_migrations WHERE version = 999")
            await pg.close()
    else:
        import sqlite3

        with sqlite3.connect(tmp_path / "ledger.db") as connection:
            connection.execute("INSERT INTO gateway_schema_migrations VALUES (999, 'future', 'now')")
        with pytest.raises(SchemaTooNew):
            await store.migrate()


def test_logged_dsn_has_no_password() -> None:
    assert _safe_dsn("postgresql://gw:s3cret@db:5432/gw") == "postgresql://gw@db:5432/gw"
    assert "s3cret" not in _safe_dsn("postgresql://gw:s3cret@db/gw")


async def test_cache_figures_and_api_families_are_kept(
    store: LedgerStore, database_url: str, tmp_path: Path
) -> None:
    translated = RECORD._replace(
        request_id="req_translated",
        cached_prompt_tokens=3,
        cache_write_tokens=2,
        caller_api="openai",
        provider_api="anthropic",
    )
    assert await store.write_usage([translated, RECORD]) == 2
    query = (
        "SELECT request_id, cached_prompt_tokens, cache_write_tokens, caller_api, provider_api"
        " FROM usage_events ORDER BY request_id"
    )
    if isinstance(store, PostgresStore):
        pg = await asyncpg.connect(database_url)
        try:
            rows = [tuple(row) for row in await pg.fetch(query)]
        finally:
            await pg.close()
    else:
        with sqlite3.connect(tmp_path / "ledger.db") as db:
            rows = db.execute(query).fetchall()
    assert rows == [
        ("req_1", None, None, None, None),
        ("req_translated", 3, 2, "openai", "anthropic"),
    ]
