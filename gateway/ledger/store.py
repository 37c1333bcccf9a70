"""What the gateway needs from its database, whichever database it is."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date, datetime
from typing import Protocol

from gateway.auth import KeyRecord
from gateway.ledger.records import ModelUsage, ReportRow, UsageRecord


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

    async def usage_report(self, by: str, since: date, until: date) -> list[ReportRow]:
        """Totals per key, user, team, model or day from the daily rollups, days in [since, until)."""
        ...

    async def usage_by_model(self, scope: str, subject: str, since: datetime) -> list[ModelUsage]:
        """Recorded usage of a key, user or team since a moment, per model (read-only)."""
        ...
