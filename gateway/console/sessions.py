"""Console sessions: made at login, kept in the ledger database, ended by logout or time.

Why the database and not signed cookies: with `server.workers` > 1 every worker must
know every session, and logout must end one at once everywhere. A table all workers
share does both with no secret to distribute; signed cookies would need a shared secret
and a shared revocation list anyway. The table holds only the SHA-256 of each session
id, so reading the database signs nobody in.

A session ends after `console.idle_timeout_seconds` without a page view and
`console.session_lifetime_seconds` after its login, whichever comes first.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from aiohttp import web

from gateway.config import ConsoleConfig
from gateway.ledger import LedgerStore
from gateway.ledger.records import ConsoleSession

SESSION_COOKIE = "gw_console"
# Before login there is no session: the login form's CSRF token is checked against a
# cookie of its own (double submit), which another site can neither read nor set.
LOGIN_COOKIE = "gw_console_login"
COOKIE_PATH = "/ui/"
CSRF_FIELD = "csrf_token"


def _digest(session_id: str) -> str:
    return hashlib.sha256(session_id.encode("utf-8")).hexdigest()


def new_token() -> str:
    """A random token for a cookie: 256 bits, URL-safe."""
    return secrets.token_urlsafe(32)


@dataclass(frozen=True)
class ActiveSession:
    """A session that passed its checks for this request."""

    # From the cookie; never stored.
    session_id: str
    record: ConsoleSession

    @property
    def csrf_token(self) -> str:
        """Derived from the session id, which only the browser holding the cookie knows;
        one-way, so a page's token reveals nothing of the id (nor its stored hash)."""
        return hmac.new(self.session_id.encode("utf-8"), b"console-csrf", hashlib.sha256).hexdigest()

    def csrf_matches(self, presented: str | None) -> bool:
        return presented is not None and hmac.compare_digest(presented.encode(), self.csrf_token.encode())


class Sessions:
    """Starts, resumes and ends console sessions in the ledger store."""

    def __init__(
        self,
        store: LedgerStore,
        config: ConsoleConfig,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._store = store
        self._idle = timedelta(seconds=config.idle_timeout_seconds)
        self._lifetime = timedelta(seconds=config.session_lifetime_seconds)
        self._clock = clock

    async def start(self) -> ActiveSession:
        """A new session (and stale ones removed, so the table stays small)."""
        now = self._clock()
        await self._store.delete_stale_console_sessions(now - self._idle, now)
        session_id = new_token()
        record = ConsoleSession(_digest(session_id), now, now, now + self._lifetime)
        await self._store.insert_console_session(record)
        return ActiveSession(session_id, record)

    async def resume(self, session_id: str | None) -> ActiveSession | None:
        """The session of this cookie value if it is still alive (its idle time starts
        again); None for no cookie, an unknown id, or a session that ran out (deleted)."""
        if not session_id:
            return None
        digest = _digest(session_id)
        record = await self._store.find_console_session(digest)
        if record is None:
            return None
        now = self._clock()
        if now - record.last_seen_at > self._idle or now >= record.expires_at:
            await self._store.delete_console_session(digest)
            return None
        await self._store.touch_console_session(digest, now)
        return ActiveSession(session_id, record)

    async def end(self, session: ActiveSession) -> None:
        await self._store.delete_console_session(session.record.sha256)


def set_cookie(response: web.StreamResponse, name: str, value: str, secure: bool) -> None:
    """HttpOnly (no script reads it), SameSite=Strict (no other site's request carries
    it), Path=/ui/ (no other route sees it), Secure over TLS. No Max-Age: the server
    decides when a session ends, and the browser forgets the cookie when it closes."""
    response.set_cookie(name, value, path=COOKIE_PATH, httponly=True, samesite="Strict", secure=secure)


def clear_cookie(response: web.StreamResponse, name: str, secure: bool) -> None:
    response.del_cookie(name, path=COOKIE_PATH, httponly=True, samesite="Strict", secure=secure)


def cookies_secure(request: web.Request, config: ConsoleConfig) -> bool:
    """Secure when this connection is TLS, or always when the operator says a proxy in
    front terminates TLS (the gateway then sees plain HTTP)."""
    return config.secure_cookies == "always" or request.secure
