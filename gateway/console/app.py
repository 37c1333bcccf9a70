"""The console as a sub-application, mounted at /ui/ on the admin listener or the main one."""

from __future__ import annotations

from pathlib import Path

import aiohttp_jinja2
import jinja2
from aiohttp import web

from gateway import state
from gateway.console.access import require_session
from gateway.console.pages import health, keys, login, overview, policies, quotas, usage
from gateway.console.render import FILTERS
from gateway.console.security import protect
from gateway.console.sessions import Sessions
from gateway.console.state import GATEWAY, SESSIONS

CONSOLE_PREFIX = "/ui/"
STATIC_DIR = Path(__file__).parent / "static"


def console_app(gateway: web.Application) -> web.Application:
    """The console over `gateway`'s resources (read at request time: they open at start-up)."""
    console = web.Application(middlewares=[protect, require_session])
    console[GATEWAY] = gateway
    console.on_startup.append(_open_sessions)
    aiohttp_jinja2.setup(
        console,
        loader=jinja2.PackageLoader("gateway.console", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        default_helpers=False,
        filters=FILTERS,
    )
    router = console.router
    router.add_get("", to_console)
    router.add_get("/", overview.overview)
    router.add_get("/login", login.login_form)
    router.add_post("/login", login.login)
    router.add_post("/logout", login.logout)
    router.add_get("/usage", usage.usage)
    router.add_get("/usage.csv", usage.usage_csv)
    router.add_get("/keys", keys.keys)
    router.add_post("/keys", keys.create)
    router.add_post("/keys/{key_id}/revoke", keys.revoke)
    router.add_post("/keys/{key_id}/rotate", keys.rotate)
    router.add_get("/quotas", quotas.quotas)
    router.add_get("/quotas/{scope}/{subject}/reset", quotas.confirm_reset)
    router.add_post("/quotas/{scope}/{subject}/reset", quotas.reset)
    router.add_get("/policies", policies.policies)
    router.add_post("/policies/reload", policies.reload)
    router.add_get("/health", health.health)
    router.add_static("/static/", STATIC_DIR)
    return console


async def _open_sessions(console: web.Application) -> None:
    """The store exists once the gateway's own start-up opened it (sub-apps start after)."""
    gateway = console[GATEWAY]
    console[SESSIONS] = Sessions(gateway[state.STORE], gateway[state.CONFIG].console)


async def to_console(request: web.Request) -> web.StreamResponse:
    """/ui (as typed) → /ui/ (the protect middleware adds the console's headers)."""
    return web.Response(status=308, headers={"Location": CONSOLE_PREFIX})
