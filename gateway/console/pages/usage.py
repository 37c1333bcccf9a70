"""Usage: the report `gateway usage` prints, grouped and filtered, as a table, chart and CSV.

The rows come from the same store call (LedgerStore.usage_report over the daily
rollups) and the CSV from the same renderer (gateway.ledger.report.render), so the
download equals `gateway usage --format csv` for the same grouping and days, byte for
byte, when no filter is set.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, timedelta

from aiohttp import web

from gateway import state
from gateway.console import figures
from gateway.console.charts import bar_chart, daily_chart
from gateway.console.render import page
from gateway.console.state import GATEWAY
from gateway.ledger.records import REPORT_GROUPS, ReportRow, UsageFilter
from gateway.ledger.report import ReportError, check_group, period, render

FILTER_FIELDS = ("key", "user", "team", "model")
# Groups drawn as bars: the ones with most tokens.
CHART_GROUPS = 30


@dataclass(frozen=True)
class UsageQuery:
    by: str
    since: date
    until: date
    where: UsageFilter

    def query_string(self) -> dict[str, str]:
        filters = {"key": self.where.key_id, "user": self.where.user_id, "team": self.where.team_id}
        filters["model"] = self.where.model
        return {
            "by": self.by,
            "since": self.since.isoformat(),
            "until": self.until.isoformat(),
            **{name: value for name, value in filters.items() if value is not None},
        }


def parse_query(request: web.Request) -> UsageQuery:
    """The page's query string; raises ReportError naming what is wrong."""
    query = request.query
    by = check_group(query.get("by", "user"))
    since, until = period(query.get("since") or None, query.get("until") or None)
    values = {name: (query.get(name) or "").strip() or None for name in FILTER_FIELDS}
    where = UsageFilter(
        key_id=values["key"], user_id=values["user"], team_id=values["team"], model=values["model"]
    )
    return UsageQuery(by, since, until, where)


async def usage(request: web.Request) -> web.StreamResponse:
    try:
        query = parse_query(request)
    except ReportError as exc:
        return page(
            request,
            "usage.html",
            {
                "title": "Usage",
                "page": "usage",
                "problem": str(exc),
                "groups": REPORT_GROUPS,
                "form": request.query,
            },
            status=400,
        )
    rows = await request.app[GATEWAY][state.STORE].usage_report(
        query.by, query.since, query.until, query.where
    )
    return page(
        request,
        "usage.html",
        {
            "title": "Usage",
            "page": "usage",
            "problem": None,
            "groups": REPORT_GROUPS,
            "form": query.query_string(),
            "query": query,
            "rows": rows,
            "total": figures.totals(rows),
            "chart": _chart(query, rows),
        },
    )


def _chart(query: UsageQuery, rows: list[ReportRow]) -> dict[str, object]:
    span = f"{query.since.isoformat()} to {(query.until - timedelta(days=1)).isoformat()}"
    if query.by == "day":
        days = [query.since + timedelta(days=offset) for offset in range((query.until - query.since).days)]
        return daily_chart(f"Tokens and requests per day, {span}", rows, days)
    shown = figures.top(rows, CHART_GROUPS)
    more = f" (the {CHART_GROUPS} with most tokens)" if len(rows) > CHART_GROUPS else ""
    return bar_chart(f"Tokens per {query.by}, {span}{more}", shown)


async def usage_csv(request: web.Request) -> web.StreamResponse:
    try:
        query = parse_query(request)
    except ReportError as exc:
        raise web.HTTPBadRequest(reason=str(exc)) from exc
    rows = await request.app[GATEWAY][state.STORE].usage_report(
        query.by, query.since, query.until, query.where
    )
    name = f"usage-by-{query.by}-{query.since.isoformat()}-{query.until.isoformat()}.csv"
    # `gateway usage` prints the report and a newline: the same bytes.
    return web.Response(
        text=render(rows, query.by, "csv") + "\n",
        content_type="text/csv",
        headers={"Content-Disposition": f'attachment; filename="{name}"'},
    )
