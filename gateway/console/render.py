"""Pages rendered from templates, with what every page needs (session, CSRF token, nav)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

import aiohttp_jinja2
from aiohttp import web

from gateway.console.state import SESSION

# (path, label, page name): the navigation, in order.
NAVIGATION = (
    ("/ui/", "Overview", "overview"),
    ("/ui/usage", "Usage", "usage"),
    ("/ui/keys", "Keys", "keys"),
    ("/ui/quotas", "Quotas", "quotas"),
    ("/ui/policies", "Policies", "policies"),
    ("/ui/health", "Health", "health"),
)


def page(
    request: web.Request,
    template: str,
    context: Mapping[str, Any],
    *,
    status: int = 200,
) -> web.Response:
    """The template rendered with `context` plus `session`, `csrf_token` and `nav`."""
    session = request.get(SESSION)
    full = {
        "session": session,
        "csrf_token": session.csrf_token if session is not None else "",
        "nav": NAVIGATION,
        **context,
    }
    return aiohttp_jinja2.render_template(template, request, full, status=status)


def redirect(location: str) -> web.Response:
    """303 See Other: after a POST the browser GETs the next page (no resubmission)."""
    return web.Response(status=303, headers={"Location": location})


def _number(value: float) -> str:
    return f"{value:,}"


def _usd(value: float) -> str:
    return f"{value:,.6f}"


def _share(value: float) -> str:
    return f"{value * 100:.1f}%"


def _signed_share(value: float) -> str:
    return f"{value * 100:+.2f}%"


def _moment(value: datetime | None) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC") if value is not None else "-"


FILTERS: dict[str, Callable[..., str]] = {
    "number": _number,
    "usd": _usd,
    "share": _share,
    "signed_share": _signed_share,
    "moment": _moment,
}
