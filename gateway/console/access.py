"""Who may see what: only the login page and static files without a session; every POST
with the session's CSRF token.

GET and HEAD never change anything, so a GET without a session is simply sent to the
login page; a POST without one, or without its token, is refused (403) before the
handler runs, so nothing changes.
"""

from __future__ import annotations

from urllib.parse import quote

from aiohttp import web

from gateway.console.render import redirect
from gateway.console.security import STATIC_PREFIX, Handler, error_page
from gateway.console.sessions import CSRF_FIELD, SESSION_COOKIE
from gateway.console.state import SESSION, SESSIONS

LOGIN_PATH = "/ui/login"
SAFE_METHODS = frozenset({"GET", "HEAD"})


@web.middleware
async def require_session(request: web.Request, handler: Handler) -> web.StreamResponse:
    # /ui (no slash) only sends the browser to /ui/: the session cookie's path is /ui/.
    if request.path in (LOGIN_PATH, "/ui") or request.path.startswith(STATIC_PREFIX):
        return await handler(request)
    session = await request.app[SESSIONS].resume(request.cookies.get(SESSION_COOKIE))
    if session is None:
        if request.method in SAFE_METHODS:
            return redirect(f"{LOGIN_PATH}?next={quote(request.path_qs, safe='/')}")
        return error_page(request, 403, "Your console session has ended: log in again.")
    request[SESSION] = session
    if request.method not in SAFE_METHODS:
        form = await request.post()
        presented = form.get(CSRF_FIELD)
        if not session.csrf_matches(presented if isinstance(presented, str) else None):
            return error_page(request, 403, "The form's CSRF token is missing or wrong; reload the page.")
    return await handler(request)


def next_page(value: str | None) -> str:
    """Where to go after login: a console path only (never another site), printable
    ASCII only (nothing a browser would strip or a header could not carry)."""
    if value and value.startswith("/ui/") and value.isascii() and value.isprintable() and "\\" not in value:
        return value
    return "/ui/"
