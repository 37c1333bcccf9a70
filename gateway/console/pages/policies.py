"""Policies: the files in force, each file's validation, the last reload; reload now."""

from __future__ import annotations

from aiohttp import web

from gateway import state
from gateway.console.render import page, redirect
from gateway.console.state import GATEWAY
from gateway.policies import check_policy_files


async def policies(request: web.Request) -> web.StreamResponse:
    gateway = request.app[GATEWAY]
    config = gateway[state.CONFIG]
    holder = gateway[state.POLICIES]
    # The files as they are on disk now, each checked as `gateway policy check` checks it.
    on_disk = sorted(config.base_dir.glob(config.quota.policy_glob))
    return page(
        request,
        "policies.html",
        {
            "title": "Policies",
            "page": "policies",
            "glob": config.quota.policy_glob,
            "holder": holder,
            "active": holder.current,
            "checks": check_policy_files(on_disk),
            "reloaded": request.query.get("reloaded"),
        },
    )


async def reload(request: web.Request) -> web.StreamResponse:
    """What SIGHUP does: read the files again now; a broken set leaves the old one in force.

    In this process; other worker processes reload when they see a file change (every
    2 seconds), and a forced reload of unchanged files changes nothing there.
    """
    holder = request.app[GATEWAY][state.POLICIES]
    holder.reload_if_changed(force=True)
    return redirect(f"/ui/policies?reloaded={'ok' if holder.last_reload_ok else 'failed'}")
