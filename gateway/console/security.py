"""Headers on every console answer, and errors as HTML pages rather than API JSON."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from gateway.console.render import page
from gateway.errors import GatewayError

log = logging.getLogger("gateway.console")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# No inline script, style or event handler runs; nothing loads from elsewhere; no other
# site may frame the console or receive its forms.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}
STATIC_PREFIX = "/ui/static/"


@web.middleware
async def protect(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Outermost in the console: every answer, error or not, leaves with the headers."""
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        response = _from_http_exception(request, exc)
    except GatewayError as exc:
        response = error_page(request, exc.status, exc.message)
    except Exception:
        log.exception("console error serving %s %s", request.method, request.path)
        response = error_page(
            request,
            500,
            "The console could not answer (is the database or the quota store unreachable?); "
            "the gateway's log says why.",
        )
    response.headers.update(SECURITY_HEADERS)
    static = request.path.startswith(STATIC_PREFIX) and response.status == 200
    # Pages can hold a key shown once, usage figures and CSRF tokens: never stored.
    # Static files are the same for everyone: kept, but checked again before reuse.
    response.headers["Cache-Control"] = "no-cache" if static else "no-store"
    return response


def error_page(request: web.Request, status: int, message: str) -> web.Response:
    return page(request, "error.html", {"title": f"Error {status}", "message": message}, status=status)


def _from_http_exception(request: web.Request, exc: web.HTTPException) -> web.Response:
    if exc.status < 400:
        headers = {"Location": exc.headers["Location"]} if "Location" in exc.headers else {}
        return web.Response(status=exc.status, headers=headers)
    # aiohttp's own (a path or method it has no route for) say little; ours say what.
    generic = {
        "Not Found": "There is no console page at this address.",
        "Method Not Allowed": f"{request.method} is not allowed here.",
    }
    return error_page(request, exc.status, generic.get(exc.reason, exc.reason))
