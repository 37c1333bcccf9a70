"""Quotas: every subject that has limits, read as GET /v1/quota and /admin/quota read them.

Subjects come from the keys (each key's limits, as /v1/quota finds them for its caller)
and from names a policy lists for its own scope (a user named in a user-scoped policy
has its counters even before any of its keys is used). Figures are reading_json's, the
same dictionary the JSON routes answer with. A reset takes the limits /admin/quota's
DELETE takes, after a confirmation page.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

from aiohttp import web

from gateway import state
from gateway.auth import Principal
from gateway.console.render import page, redirect
from gateway.console.state import GATEWAY
from gateway.quota.limiter import QuotaStoreUnavailable
from gateway.quota.policy import SCOPES, AppliedLimit, PolicySet
from gateway.quota.report import reading_json

SCOPE_ORDER = ("team", "user", "key")


@dataclass(frozen=True)
class SubjectReadings:
    scope: str
    subject: str
    # reading_json's dictionaries, one per limit.
    limits: list[dict[str, Any]]


def subject_limits(
    policies: PolicySet, principals: Iterable[Principal]
) -> dict[tuple[str, str], list[AppliedLimit]]:
    """Every (scope, subject) with limits, each limit once, in policy order."""
    found: dict[tuple[str, str], list[AppliedLimit]] = {}
    seen: set[tuple[str, str, str, str, str | None]] = set()

    def add(limit: AppliedLimit) -> None:
        identity = (limit.policy, limit.scope, limit.subject, limit.rule.kind, limit.rule.window)
        if identity not in seen:
            seen.add(identity)
            found.setdefault((limit.scope, limit.subject), []).append(limit)

    for principal in principals:
        for limit in policies.limits_of_principal(principal):
            add(limit)
    for policy in policies.policies:
        named = {"key": policy.keys, "user": policy.users, "team": policy.teams}[policy.scope]
        for subject in sorted(named or ()):
            for rule in policy.limits:
                add(AppliedLimit(policy.name, policy.scope, subject, rule, enforced=policy.mode == "enforce"))
    return dict(sorted(found.items(), key=lambda item: (SCOPE_ORDER.index(item[0][0]), item[0][1])))


async def _principals(request: web.Request) -> list[Principal]:
    """The callers that can use the gateway now: static keys and live database keys."""
    gateway = request.app[GATEWAY]
    now = datetime.now(UTC)
    static = [
        Principal(k.id, k.user, k.team, frozenset(k.tags), frozenset(k.models) or None, k.expires_at)
        for k in gateway[state.CONFIG].keys
    ]
    stored = [
        record.principal
        for record in await gateway[state.STORE].list_keys()
        if record.revoked_at is None and (record.expires_at is None or record.expires_at > now)
    ]
    return [p for p in static + stored if p.expires_at is None or p.expires_at > now]


async def quotas(request: web.Request) -> web.StreamResponse:
    gateway = request.app[GATEWAY]
    scope_filter = request.query.get("scope", "")
    subject_filter = request.query.get("subject", "").strip()
    subjects = subject_limits(gateway[state.POLICIES].current, await _principals(request))
    picked = {
        (scope, subject): limits
        for (scope, subject), limits in subjects.items()
        if (not scope_filter or scope == scope_filter) and subject_filter.lower() in subject.lower()
    }
    context: dict[str, Any] = {
        "title": "Quotas",
        "page": "quotas",
        "scopes": SCOPE_ORDER,
        "form": {"scope": scope_filter, "subject": subject_filter},
        "reset": request.query.get("reset"),
        "deleted": request.query.get("deleted"),
        "subjects": [],
        "problem": None,
    }
    try:
        readings = await gateway[state.QUOTA].limiter.read(
            [lim for limits in picked.values() for lim in limits]
        )
    except QuotaStoreUnavailable:
        context["problem"] = "The quota store is unreachable: no counter could be read."
        return page(request, "quotas.html", context, status=503)
    grouped: dict[tuple[str, str], list[dict[str, Any]]] = {key: [] for key in picked}
    for reading in readings:
        grouped[(reading.limit.scope, reading.limit.subject)].append(reading_json(reading))
    context["subjects"] = [
        SubjectReadings(scope, subject, limits) for (scope, subject), limits in grouped.items()
    ]
    return page(request, "quotas.html", context)


def _subject(request: web.Request) -> tuple[str, str]:
    scope, subject = request.match_info["scope"], request.match_info["subject"]
    if scope not in SCOPES:
        raise web.HTTPNotFound(reason=f"A scope is one of {', '.join(SCOPE_ORDER)}.")
    return scope, subject


async def confirm_reset(request: web.Request) -> web.StreamResponse:
    scope, subject = _subject(request)
    limits = request.app[GATEWAY][state.POLICIES].current.limits_of_subject(scope, subject)
    return page(
        request,
        "quota_reset.html",
        {
            "title": f"Reset the counters of {scope} {subject}?",
            "page": "quotas",
            "scope": scope,
            "subject": subject,
            "limits": limits,
        },
    )


async def reset(request: web.Request) -> web.StreamResponse:
    scope, subject = _subject(request)
    gateway = request.app[GATEWAY]
    posted = await request.post()
    if posted.get("confirm") != "yes":
        return await confirm_reset(request)
    limits = gateway[state.POLICIES].current.limits_of_subject(scope, subject)
    try:
        deleted = await gateway[state.QUOTA].limiter.reset(limits)
    except QuotaStoreUnavailable as exc:
        raise web.HTTPServiceUnavailable(reason="The quota store is unreachable: nothing was reset.") from exc
    return redirect("/ui/quotas?" + urlencode({"reset": f"{scope} {subject}", "deleted": deleted}))
