"""Gateway API keys → principals (key, user, team). Only SHA-256 hashes are stored."""

from __future__ import annotations

import hashlib
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from gateway.config import StaticKeyConfig
from gateway.errors import InvalidApiKey, ServiceUnavailable

KEY_PREFIX = "gw-"


@dataclass(frozen=True)
class Principal:
    """Who is calling: the key's id (never the key itself), its user and team."""

    key_id: str
    user: str
    team: str | None
    tags: frozenset[str] = frozenset()


@dataclass(frozen=True)
class KeyRecord:
    """A key as the database keeps it: its hash, owner and state."""

    key_id: str
    sha256: str
    user: str
    team: str | None
    created_at: datetime
    revoked_at: datetime | None
    tags: tuple[str, ...] = ()

    @property
    def principal(self) -> Principal:
        return Principal(key_id=self.key_id, user=self.user, team=self.team, tags=frozenset(self.tags))


class KeyDatabase(Protocol):
    async def find_key(self, sha256: str) -> KeyRecord | None: ...


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def generate_key() -> str:
    """A new random key; shown once to its owner and never stored in clear."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def generate_key_id() -> str:
    return "key_" + secrets.token_hex(6)


def presented_key(authorization: str | None, x_api_key: str | None) -> str:
    """The caller's key: `Authorization: Bearer` (OpenAI's SDKs) or `x-api-key` (Anthropic's)."""
    if not authorization and x_api_key and x_api_key.strip():
        return x_api_key.strip()
    if not authorization:
        raise InvalidApiKey(
            "You didn't provide an API key. Send it as 'Authorization: Bearer <key>' or 'x-api-key: <key>'."
        )
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise InvalidApiKey("Malformed Authorization header; expected 'Bearer <key>'.")
    return token


class Authenticator:
    """Resolves presented keys: static keys from config first, then the database.

    Database answers are cached for `cache_seconds`, so a revoked key stops working
    within that time and an unknown key cannot make every request hit the database.
    """

    def __init__(
        self,
        static_keys: tuple[StaticKeyConfig, ...],
        database: KeyDatabase,
        cache_seconds: float = 10.0,
        cache_size: int = 10_000,
    ) -> None:
        self._static = {
            key.sha256: Principal(key_id=key.id, user=key.user, team=key.team, tags=frozenset(key.tags))
            for key in static_keys
        }
        self._database = database
        self._cache_seconds = cache_seconds
        self._cache_size = cache_size
        self._cache: OrderedDict[str, tuple[float, Principal | None]] = OrderedDict()

    async def authenticate(self, presented_key: str) -> Principal:
        digest = hash_key(presented_key)
        principal = self._static.get(digest)
        if principal is None:
            principal = await self._from_database(digest)
        if principal is None:
            # Never echo the key; a short, non-reversible hint is enough to debug.
            raise InvalidApiKey(f"Incorrect API key provided (sha256 prefix {digest[:8]}).")
        return principal

    async def _from_database(self, digest: str) -> Principal | None:
        now = time.monotonic()
        cached = self._cache.get(digest)
        if cached is not None and cached[0] > now:
            return cached[1]
        try:
            record = await self._database.find_key(digest)
        except Exception as exc:
            raise ServiceUnavailable(
                "The key store is unreachable; the key could not be checked.",
                code="key_store_unavailable",
            ) from exc
        principal = record.principal if record is not None and record.revoked_at is None else None
        self._cache[digest] = (now + self._cache_seconds, principal)
        self._cache.move_to_end(digest)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return principal
