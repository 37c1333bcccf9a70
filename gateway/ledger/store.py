"""What the gateway needs from its database, whichever database it is."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date, datetime
from typing import Protocol

from gateway.auth import KeyRecord
from gateway.ledger.records import (
    ConsoleSession,
    EventGroup,
    ModelUsage,
    ReportRow,
    UsageFilter,
    UsageRecord,
)


class LedgerStore(Protocol):
    """Usage records and gateway keys; implemented for PostgreSQL and SQLite."""

    description: str

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def migrate(self) -> list[int]:
        """Apply pending migrations; returns the versions applied."""
        ...

    async def schema_version(self) -> int: ...

    async def write_usage(self, records: Sequence[UsageRecord]) -> int:
        """Insert records; a request id already present is skipped. Returns rows inserted."""
        ...

    async def find_key(self, sha256: str) -> KeyRecord | None: ...

    async def insert_key(self, record: KeyRecord) -> None: ...

    async def list_keys(self) -> list[KeyRecord]: ...

    async def revoke_key(self, key_id: str) -> bool: ...

    async def expire_key(self, key_id: str, at: datetime) -> bool:
        """Make an active key stop working at `at` (key rotation's grace period)."""
        ...

    async def ping(self) -> None: ...

    async def usage_report(
        self, by: str, since: date, until: date, where: UsageFilter | None = None
    ) -> list[ReportRow]:
        """Totals per key, user, team, model or day from the daily rollups, days in
        [since, until), of the rows `where` admits (every row without one)."""
        ...

    async def event_groups(self, since: datetime, until: datetime) -> list[EventGroup]:
        """Recorded requests in [since, until) per model, status and error code."""
        ...

    async def usage_by_model(self, scope: str, subject: str, since: datetime) -> list[ModelUsage]:
        """Recorded usage of a key, user or team since a moment, per model (read-only)."""
        ...

    async def insert_console_session(self, session: ConsoleSession) -> None: ...

    async def find_console_session(self, sha256: str) -> ConsoleSession | None: ...

    async def touch_console_session(self, sha256: str, at: datetime) -> None:
        """Record a page view of the session at `at` (its idle time starts again)."""
        ...

    async def delete_console_session(self, sha256: str) -> bool: ...

    async def delete_stale_console_sessions(self, idle_before: datetime, now: datetime) -> int:
        """Remove sessions last seen before `idle_before` or whose lifetime ended by `now`."""
        ...
