"""Gateway API keys → principals (key, user, team). Only SHA-256 hashes are stored."""

from __future__ import annotations

import hashlib
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
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
    # Models this key may use (None: any the policies allow).
    models: frozenset[str] | None = None
    expires_at: datetime | None = None


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
    expires_at: datetime | None = None
    models: tuple[str, ...] = ()

    @property
    def principal(self) -> Principal:
        return Principal(
            key_id=self.key_id,
            user=self.user,
            team=self.team,
            tags=frozenset(self.tags),
            models=frozenset(self.models) or None,
            expires_at=self.expires_at,
        )


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
        return _printable_ascii(x_api_key.strip())
    if not authorization:
        raise InvalidApiKey(
            "You didn't provide an API key. Send it as 'Authorization: Bearer <key>' or 'x-api-key: <key>'."
        )
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise InvalidApiKey("Malformed Authorization header; expected 'Bearer <key>'.")
    return _printable_ascii(token)


def _printable_ascii(key: str) -> str:
    # Our keys are printable ASCII. aiohttp hands other header bytes over as lone
    # surrogates (0xff → "\udcff") that cannot even be hashed: such a key is simply wrong.
    if not (key.isascii() and key.isprintable()):
        raise InvalidApiKey("Malformed API key: keys are printable ASCII characters.")
    return key


class FailedAuthentications:
    """Failed key checks per client address over the last minute.

    It never refuses a request by itself: the key is checked first, and only a key
    that failed is counted here. Past `limit` failures within a minute, a failure is
    answered 429 instead of 401, so a client stuck on a wrong key is told to stop
    (and every client behind the same address with a valid key is unaffected).
    """

    WINDOW_SECONDS = 60.0

    def __init__(
        self, limit: int, max_addresses: int = 10_000, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._limit = limit
        self._max_addresses = max_addresses
        self._clock = clock
        # Per address, the times of its last `limit` failures; addresses that failed least
        # recently come first (evicted first past `max_addresses`).
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def failed(self, address: str) -> float | None:
        """Count one failure. If the address had already failed `limit` times within
        the window, the seconds until it is back under its limit (if it fails no more);
        else None."""
        if not self._limit:
            return None
        now = self._clock()
        times = self._failures.pop(address, None) or deque(maxlen=self._limit)
        over = len(times) == self._limit and now - times[0] < self.WINDOW_SECONDS
        times.append(now)
        self._failures[address] = times
        while len(self._failures) > self._max_addresses:
            self._failures.popitem(last=False)
        return self.WINDOW_SECONDS - (now - times[0]) if over else None

    def blocked_for(self, address: str) -> float | None:
        """Counts nothing: if the address failed `limit` times within the window, the
        seconds until it is back under its limit; else None. The console's login asks
        before checking a key, so guesses past the limit are not even tried."""
        times = self._failures.get(address)
        if not self._limit or times is None or len(times) < self._limit:
            return None
        waited = self._clock() - times[0]
        return self.WINDOW_SECONDS - waited if waited < self.WINDOW_SECONDS else None


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
            key.sha256: Principal(
                key_id=key.id,
                user=key.user,
                team=key.team,
                tags=frozenset(key.tags),
                models=frozenset(key.models) or None,
                expires_at=key.expires_at,
            )
            for key in static_keys
        }
        self._database = database
        self._cache_seconds = cache_seconds
        self._cache_size = cache_size
        self._cache: OrderedDict[str, tuple[float, Principal | None]] = OrderedDict()

    async def authenticate(self, presented_key: str) -> Principal:
        # Only SHA-256 digests are ever compared, never key material: a lookup's timing
        # can tell at most how the digest of an attacker's own guess relates to a stored
        # digest, which does not help find a key (that needs a SHA-256 preimage).
        digest = hash_key(presented_key)
        principal = self._static.get(digest)
        if principal is None:
            principal = await self._from_database(digest)
        if principal is None:
            # Never echo the key; a short, non-reversible hint is enough to debug.
            raise InvalidApiKey(f"Incorrect API key provided (sha256 prefix {digest[:8]}).")
        if principal.expires_at is not None and principal.expires_at <= datetime.now(UTC):
            expired = principal.expires_at.isoformat(timespec="seconds")
            raise InvalidApiKey(f"API key {principal.key_id} expired at {expired}.", code="api_key_expired")
        return principal

    def forget(self, digest: str) -> None:
        """Drop the cached answer for a key (revoked or rotated): the next use reads the database."""
        self._cache.pop(digest, None)

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
