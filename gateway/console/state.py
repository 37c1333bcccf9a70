"""Typed keys for what the console's pages share."""

from __future__ import annotations

from aiohttp import web

from gateway.console.sessions import ActiveSession, Sessions

# The gateway application whose resources (store, quota, policies...) the pages read:
# the console is a sub-application, mounted on the admin listener or the main one.
GATEWAY = web.AppKey("gateway", web.Application)
SESSIONS = web.AppKey("console_sessions", Sessions)
SESSION = web.RequestKey("console_session", ActiveSession)
