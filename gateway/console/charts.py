"""Chart data for static/console.js: plain JSON in a <script type="application/json">.

The page never runs inline script (the Content-Security-Policy forbids it); our own
static script reads this JSON and draws it with the vendored uPlot.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, date, datetime, time
from typing import Any

from gateway.ledger.records import ReportRow


def _day_seconds(day: str) -> int:
    return int(datetime.combine(date.fromisoformat(day), time(), UTC).timestamp())


def daily_chart(title: str, rows: Sequence[ReportRow], days: Sequence[date]) -> dict[str, Any]:
    """Tokens (left axis) and requests (right axis) per day; days without usage are 0."""
    by_day = {row.name: row for row in rows}
    picked = [by_day.get(day.isoformat()) for day in days]
    return {
        "kind": "time",
        "title": title,
        "x": [_day_seconds(day.isoformat()) for day in days],
        "series": [
            {
                "label": "Prompt tokens",
                "scale": "tokens",
                "values": [r.prompt_tokens if r else 0 for r in picked],
            },
            {
                "label": "Completion tokens",
                "scale": "tokens",
                "values": [r.completion_tokens if r else 0 for r in picked],
            },
            {"label": "Requests", "scale": "requests", "values": [r.requests if r else 0 for r in picked]},
        ],
    }


def bar_chart(title: str, rows: Sequence[ReportRow]) -> dict[str, Any]:
    """Tokens (prompt and completion together) per group, one bar per row."""
    return {
        "kind": "bars",
        "title": title,
        "x": list(range(len(rows))),
        "labels": [row.name or "-" for row in rows],
        "series": [
            {
                "label": "Tokens",
                "scale": "tokens",
                "values": [row.prompt_tokens + row.completion_tokens for row in rows],
            }
        ],
    }
