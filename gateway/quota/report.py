"""Limits as people read them: for GET /v1/quota, the admin API and `gateway quota show`."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from gateway.quota.headers import go_duration
from gateway.quota.limiter import LimitReading
from gateway.quota.policy import MICRO_USD


def _amount(kind: str, value: int) -> float | int:
    return value / MICRO_USD if kind == "cost_usd" else value


def reading_json(reading: LimitReading) -> dict[str, Any]:
    limit, rule = reading.limit, reading.limit.rule
    return {
        "policy": limit.policy,
        "scope": limit.scope,
        "subject": limit.subject,
        "kind": rule.kind,
        "window": rule.window,
        "mode": "enforce" if limit.enforced else "shadow",
        "limit": _amount(rule.kind, rule.capacity),
        "used": _amount(rule.kind, reading.used),
        "reserved": _amount(rule.kind, reading.reserved),
        "remaining": _amount(rule.kind, reading.remaining),
        "reset_seconds": round(reading.reset_ms / 1000, 3),
        "reset": go_duration(reading.reset_ms),
        "last_reset": _moment(reading.period_start_ms),
    }


def _moment(milliseconds: int | None) -> str | None:
    if milliseconds is None:
        return None
    return (
        datetime.fromtimestamp(milliseconds / 1000, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    )


def readings_table(readings: list[LimitReading]) -> str:
    header = f"{'POLICY':<20} {'LIMIT':<24} {'USED':>14} {'RESERVED':>12} {'REMAINING':>14} {'RESET':>10}"
    header += "  LAST RESET"
    lines = [header]
    for reading in readings:
        row = reading_json(reading)
        label = reading.limit.rule.label + (" (shadow)" if row["mode"] == "shadow" else "")
        lines.append(
            f"{row['policy']:<20} {label:<24} {row['used']:>14} {row['reserved']:>12} "
            f"{row['remaining']:>14} {row['reset']:>10}  {row['last_reset'] or 'rolling'}"
        )
    return "\n".join(lines)
