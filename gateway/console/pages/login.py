"""Login with the admin key, and logout."""

from __future__ import annotations

import hashlib
import hmac
import math

from aiohttp import web

from gateway import state
from gateway.auth import hash_key
from gateway.client_address import client_address
from gateway.console.access import next_page
from gateway.console.render import page, redirect
from gateway.console.security import error_page
from gateway.console.sessions import (
    CSRF_FIELD,
    LOGIN_COOKIE,
    SESSION_COOKIE,
    clear_cookie,
    cookies_secure,
    new_token,
    set_cookie,
)
from gateway.console.state import GATEWAY, SESSION, SESSIONS


async def login_form(request: web.Request) -> web.StreamResponse:
    session = await request.app[SESSIONS].resume(request.cookies.get(SESSION_COOKIE))
    if session is not None:
        return redirect(next_page(request.query.get("next")))
    return _login_page(request, request.query.get("next"), None, 200)


def _login_page(
    request: web.Request, next_value: str | None, problem: str | None, status: int
) -> web.Response:
    token = request.cookies.get(LOGIN_COOKIE) or new_token()
    response = page(
        request,
        "login.html",
        {
            "title": "Log in",
            "login_token": token,
            "next": next_page(next_value),
            "problem": problem,
        },
        status=status,
    )
    set_cookie(
        response, LOGIN_COOKIE, token, cookies_secure(request, request.app[GATEWAY][state.CONFIG].console)
    )
    return response


async def login(request: web.Request) -> web.StreamResponse:
    """Checks the form's token, then the address's failures, then the key (constant time)."""
    gateway = request.app[GATEWAY]
    config = gateway[state.CONFIG]
    form = await request.post()
    presented_token, cookie_token = form.get(CSRF_FIELD), request.cookies.get(LOGIN_COOKIE)
    if not (
        isinstance(presented_token, str)
        and cookie_token
        and hmac.compare_digest(presented_token.encode(), cookie_token.encode())
    ):
        return error_page(request, 403, "The login form's CSRF token is missing or wrong; reload the page.")
    next_value = form.get("next")
    next_value = next_value if isinstance(next_value, str) else None
    failures = gateway[state.AUTH_FAILURES]
    address = client_address(request, config.server.trusted_proxies)
    # Asked before the key is checked: past the limit, a guess is not even tried.
    wait = failures.blocked_for(address)
    if wait is None:
        key = form.get("admin_key")
        if isinstance(key, str) and _is_admin_key(key, config.admin_key_sha256):
            return await _signed_in(request, next_page(next_value))
        wait = failures.failed(address)
        if wait is None:
            return _login_page(request, next_value, "Incorrect admin key.", 401)
    seconds = max(1, math.ceil(wait))
    response = _login_page(
        request, next_value, f"Too many failed logins from this address: try again in {seconds} s.", 429
    )
    response.headers["Retry-After"] = str(seconds)
    return response


def _is_admin_key(key: str, expected_sha256: str | None) -> bool:
    if expected_sha256 is None:
        return False
    try:
        digest = hash_key(key)
    except UnicodeEncodeError:  # a lone surrogate: not a key
        digest = hashlib.sha256(b"").hexdigest()
    return hmac.compare_digest(digest, expected_sha256)


async def _signed_in(request: web.Request, location: str) -> web.Response:
    session = await request.app[SESSIONS].start()
    secure = cookies_secure(request, request.app[GATEWAY][state.CONFIG].console)
    response = redirect(location)
    set_cookie(response, SESSION_COOKIE, session.session_id, secure)
    clear_cookie(response, LOGIN_COOKIE, secure)
    return response


async def logout(request: web.Request) -> web.StreamResponse:
    """The session row is deleted: the cookie is worthless from now on, wherever it is."""
    await request.app[SESSIONS].end(request[SESSION])
    response = redirect("/ui/login")
    clear_cookie(
        response, SESSION_COOKIE, cookies_secure(request, request.app[GATEWAY][state.CONFIG].console)
    )
    return response
