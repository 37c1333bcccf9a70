"""Health: readiness with every component, as /admin/health/ready answers it."""

from __future__ import annotations

from aiohttp import web

from gateway.console.render import page
from gateway.console.state import GATEWAY
from gateway.health import checked


async def health(request: web.Request) -> web.StreamResponse:
    body, status = await checked(request.app[GATEWAY])
    components = body["components"]
    return page(
        request,
        "health.html",
        {
            "title": "Health",
            "page": "health",
            "overall": body["status"],
            "ready": status == 200,
            "healthy_share": body["healthy_share"],
            "components": components,
            "circuits": components["upstreams"].get("circuits", {}),
            "spool": components["spool"],
        },
    )
