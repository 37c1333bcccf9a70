"""Usage reports as tables, CSV or JSON (for `gateway usage` and GET /admin/usage)."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from datetime import UTC, date, datetime, timedelta

from gateway.ledger.records import REPORT_GROUPS, ReportRow

FORMATS = ("table", "csv", "json")
COLUMNS = ("requests", "prompt_tokens", "completion_tokens", "cost_usd")


class ReportError(ValueError):
    """A report's parameters are wrong (the message says which)."""


def period(since: str | None, until: str | None) -> tuple[date, date]:
    """Days [since, until); by default the current month so far, in UTC."""
    today = datetime.now(UTC).date()
    try:
        start = date.fromisoformat(since) if since else today.replace(day=1)
        end = date.fromisoformat(until) if until else today + timedelta(days=1)
    except ValueError as exc:
        raise ReportError(f"dates are YYYY-MM-DD ({exc})") from exc
    if end <= start:
        raise ReportError("until must be after since")
    return start, end


def check_group(by: str) -> str:
    if by not in REPORT_GROUPS:
        raise ReportError(f"by must be one of {', '.join(REPORT_GROUPS)}")
    return by


def render(rows: Sequence[ReportRow], by: str, output: str) -> str:
    if output == "json":
        return json.dumps(
            [
                {
                    by: row.name,
                    "requests": row.requests,
                    "prompt_tokens": row.prompt_tokens,
                    "completion_tokens": row.completion_tokens,
                    "cost_usd": round(row.cost_usd, 6),
                }
                for row in rows
            ]
        )
    if output == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow((by, *COLUMNS))
        for row in rows:
            writer.writerow(
                (row.name, row.requests, row.prompt_tokens, row.completion_tokens, f"{row.cost_usd:.6f}")
            )
        return buffer.getvalue().rstrip("\n")
    lines = [f"{by.upper():<24} {'REQUESTS':>10} {'PROMPT':>14} {'COMPLETION':>14} {'COST USD':>12}"]
    for row in rows:
        figures = (
            f"{row.requests:>10} {row.prompt_tokens:>14} {row.completion_tokens:>14} {row.cost_usd:>12.6f}"
        )
        lines.append(f"{row.name or '-':<24} {figures}")
    total = (
        sum(r.requests for r in rows),
        sum(r.prompt_tokens for r in rows),
        sum(r.completion_tokens for r in rows),
    )
    lines.append(
        f"{'TOTAL':<24} {total[0]:>10} {total[1]:>14} {total[2]:>14} {sum(r.cost_usd for r in rows):>12.6f}"
    )
    return "\n".join(lines)
