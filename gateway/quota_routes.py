"""The caller's own quota (GET /v1/quota) and the admin API over anyone's."""

from __future__ import annotations

import json

from aiohttp import web

from gateway import state
from gateway.errors import InvalidRequest, ServiceUnavailable
from gateway.ledger.report import ReportError, check_group, period, render
from gateway.quota.limiter import LimitReading, QuotaStoreUnavailable
from gateway.quota.policy import SCOPES, AppliedLimit
from gateway.quota.report import reading_json
from gateway.requests import PRINCIPAL


async def _read(request: web.Request, limits: list[AppliedLimit]) -> list[LimitReading]:
    try:
        return await request.app[state.QUOTA].limiter.read(limits)
    except QuotaStoreUnavailable as exc:
        raise _unavailable() from exc


def _unavailable() -> ServiceUnavailable:
    return ServiceUnavailable("The quota backend is unreachable.", code="quota_backend_unavailable")


async def own_quota(request: web.Request) -> web.Response:
    principal = request[PRINCIPAL]
    readings = await _read(request, request.app[state.POLICIES].current.limits_of_principal(principal))
    return web.json_response(
        {
            "object": "quota",
            "key_id": principal.key_id,
            "user": principal.user,
            "team": principal.team,
            "limits": [reading_json(reading) for reading in readings],
        }
    )


def _subject(request: web.Request) -> tuple[str, str]:
    scope, subject = request.match_info["scope"], request.match_info["subject"]
    if scope not in SCOPES:
        raise InvalidRequest(f"scope must be one of {', '.join(sorted(SCOPES))}", param="scope")
    return scope, subject


async def admin_show_quota(request: web.Request) -> web.Response:
    scope, subject = _subject(request)
    readings = await _read(request, request.app[state.POLICIES].current.limits_of_subject(scope, subject))
    return web.json_response(
        {"object": "quota", "scope": scope, "subject": subject, "limits": [reading_json(r) for r in readings]}
    )


async def admin_reset_quota(request: web.Request) -> web.Response:
    scope, subject = _subject(request)
    limits = request.app[state.POLICIES].current.limits_of_subject(scope, subject)
    try:
        deleted = await request.app[state.QUOTA].limiter.reset(limits)
    except QuotaStoreUnavailable as exc:
        raise _unavailable() from exc
    return web.json_response(
        {"object": "quota.reset", "scope": scope, "subject": subject, "keys_deleted": deleted}
    )


async def admin_usage(request: web.Request) -> web.Response:
    """GET /admin/usage?by=user&since=YYYY-MM-DD&until=YYYY-MM-DD&format=json|csv"""
    query = request.query
    output = query.get("format", "json")
    try:
        by = check_group(query.get("by", "user"))
        since, until = period(query.get("since"), query.get("until"))
        if output not in ("json", "csv"):
            raise ReportError("format must be json or csv")
    except ReportError as exc:
        raise InvalidRequest(str(exc)) from exc
    rows = await request.app[state.STORE].usage_report(by, since, until)
    if output == "csv":
        return web.Response(text=render(rows, by, "csv") + "\n", content_type="text/csv")
    return web.json_response(
        {
            "object": "usage.report",
            "by": by,
            "since": since.isoformat(),
            "until": until.isoformat(),
            "data": json.loads(render(rows, by, "json")),
        }
    )
