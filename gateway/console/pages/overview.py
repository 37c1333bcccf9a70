"""Overview: today and this month, outcomes and rejections, estimate accuracy, top spenders."""

from __future__ import annotations

import asyncio
from datetime import UTC, date, datetime, time, timedelta

from aiohttp import web

from gateway import state
from gateway.console import figures
from gateway.console.charts import daily_chart
from gateway.console.render import page
from gateway.console.state import GATEWAY

CHART_DAYS = 30
TOP_COUNT = 5
PERIODS = {"today": "Today", "month": "This month"}


async def overview(request: web.Request) -> web.StreamResponse:
    gateway = request.app[GATEWAY]
    store = gateway[state.STORE]
    today = datetime.now(UTC).date()
    tomorrow = today + timedelta(days=1)
    month_start = today.replace(day=1)
    chart_days = [today - timedelta(days=offset) for offset in range(CHART_DAYS - 1, -1, -1)]
    period = request.query.get("period", "today")
    if period not in PERIODS:
        period = "today"
    events_since = month_start if period == "month" else today
    days, users, teams, models, groups = await asyncio.gather(
        store.usage_report("day", min(month_start, chart_days[0]), tomorrow),
        store.usage_report("user", month_start, tomorrow),
        store.usage_report("team", month_start, tomorrow),
        store.usage_report("model", month_start, tomorrow),
        store.event_groups(_midnight(events_since), _midnight(tomorrow)),
    )
    refused_by_status, refused_by_limit = figures.rejections(gateway[state.METRICS])
    return page(
        request,
        "overview.html",
        {
            "title": "Overview",
            "page": "overview",
            "today": today,
            "month_start": month_start,
            "today_totals": figures.totals(row for row in days if row.name == today.isoformat()),
            "month_totals": figures.totals(row for row in days if row.name >= month_start.isoformat()),
            "period": period,
            "periods": PERIODS,
            "events": figures.event_figures(groups),
            "refused_by_status": refused_by_status,
            "refused_by_limit": refused_by_limit,
            "top_users": figures.top(users, TOP_COUNT),
            "top_teams": figures.top(teams, TOP_COUNT),
            "top_models": figures.top(models, TOP_COUNT),
            "chart": daily_chart(
                f"Tokens and requests per day, last {CHART_DAYS} days (UTC)", days, chart_days
            ),
        },
    )


def _midnight(day: date) -> datetime:
    return datetime.combine(day, time(), UTC)
