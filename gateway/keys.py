"""Issuing, rotating and revoking gateway keys: what `gateway keys` and the console share."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from gateway.auth import KeyRecord, generate_key, generate_key_id, hash_key
from gateway.config import IDENTIFIER
from gateway.ledger import LedgerStore

DURATION_UNITS = {"d": 86_400, "h": 3_600, "m": 60, "s": 1}


class KeyRequestError(ValueError):
    """A key's owner, team, tag or lifetime is malformed; `field` names which."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


@dataclass(frozen=True)
class IssuedKey:
    """A key just made: the key itself (shown once, never stored) and what is stored."""

    key: str
    record: KeyRecord


@dataclass(frozen=True)
class Rotation:
    successor: IssuedKey
    old_key_id: str
    # When the old key stops working (now + the grace period).
    old_key_ends: datetime


def parse_duration(text: str, field: str = "duration") -> timedelta:
    """'90d', '12h', '30m' or '45s' → a timedelta."""
    if len(text) < 2 or text[-1] not in DURATION_UNITS or not text[:-1].isdigit():
        raise KeyRequestError(field, f"a duration is a number and d, h, m or s (e.g. 90d), not {text!r}")
    return timedelta(seconds=int(text[:-1]) * DURATION_UNITS[text[-1]])


def new_key(
    user: str,
    team: str | None,
    tags: Sequence[str] = (),
    models: Sequence[str] = (),
    expires_in: timedelta | None = None,
) -> IssuedKey:
    """A new key for `user` (and `team`), not yet stored; raises KeyRequestError."""
    for field, value in (("user", user), ("team", team), *(("tag", tag) for tag in tags)):
        if value is not None and not IDENTIFIER.match(value):
            raise KeyRequestError(field, "may use letters, digits and . _ @ + -")
    key = generate_key()
    now = datetime.now(UTC)
    record = KeyRecord(
        key_id=generate_key_id(),
        sha256=hash_key(key),
        user=user,
        team=team,
        created_at=now,
        revoked_at=None,
        tags=tuple(tags),
        expires_at=now + expires_in if expires_in is not None else None,
        models=tuple(models),
    )
    return IssuedKey(key, record)


async def find_key_record(store: LedgerStore, key_id: str) -> KeyRecord | None:
    return next((key for key in await store.list_keys() if key.key_id == key_id), None)


async def rotate_key(store: LedgerStore, key_id: str, grace: timedelta) -> Rotation | None:
    """Store a successor of an active key (same owner, team, tags and models) and make
    the old key stop working after `grace`; None when no active key has that id."""
    old = await find_key_record(store, key_id)
    if old is None or old.revoked_at is not None:
        return None
    successor = new_key(old.user, old.team, old.tags, old.models)
    await store.insert_key(successor.record)
    ends = datetime.now(UTC) + grace
    await store.expire_key(old.key_id, ends)
    return Rotation(successor, old.key_id, ends)
