"""The usage ledger: records, stores (PostgreSQL, SQLite) and the batching writer."""

from gateway.config import BackendsConfig
from gateway.ledger.postgres import PostgresStore
from gateway.ledger.records import UsageRecord
from gateway.ledger.sqlite import SqliteStore
from gateway.ledger.store import LedgerStore
from gateway.ledger.writer import LedgerWriter


def open_store(backends: BackendsConfig) -> LedgerStore:
    """PostgreSQL when configured, else the embedded SQLite file (not yet connected)."""
    if backends.postgres is not None:
        return PostgresStore(backends.postgres)
    return SqliteStore(backends.sqlite.path)


__all__ = ["LedgerStore", "LedgerWriter", "UsageRecord", "open_store"]
