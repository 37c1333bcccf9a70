"""Versioned schema migrations, shipped as SQL files per database dialect."""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources

_MIGRATION_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


class SchemaTooNew(Exception):
    """The database was migrated by a newer gateway; this one must not write to it."""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def migrations(dialect: str) -> list[Migration]:
    """All migrations for `postgres` or `sqlite`, in version order."""
    folder = resources.files("gateway.ledger").joinpath("migrations", dialect)
    found: list[Migration] = []
    for entry in folder.iterdir():
        match = _MIGRATION_FILE.match(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text(encoding="utf-8")))
    return sorted(found, key=lambda migration: migration.version)


def latest_version(dialect: str) -> int:
    return max((m.version for m in migrations(dialect)), default=0)


def check_not_newer(dialect: str, database_version: int) -> None:
    known = latest_version(dialect)
    if database_version > known:
        raise SchemaTooNew(
            f"the database schema is at version {database_version}, newer than this "
            f"gateway knows ({known}); upgrade the gateway"
        )
