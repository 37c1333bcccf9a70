"""One usage record per request: what the ledger stores."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import NamedTuple


class UsageRecord(NamedTuple):
    """Usage of one request. Token fields are None when unknown, never a made-up 0.

    A named tuple, not a dataclass: one is made per request, and a frozen dataclass of
    this many fields costs four times as much to build. Its fields are the ledger's
    columns, in order, so the tuple is the row as it is.
    """

    request_id: str
    created_at: datetime
    key_id: str
    user_id: str
    team_id: str | None
    route: str
    model: str
    provider: str
    upstream_model: str
    stream: bool
    status: int
    error_code: str | None
    # Counted by the gateway before forwarding, and whether that count is exact.
    prompt_tokens_estimated: int
    prompt_estimate_exact: bool
    reserved_tokens: int
    # As the provider reported them (usage_source "provider"), or counted from the
    # relayed output when the provider's usage never arrived ("counted").
    prompt_tokens: int | None
    completion_tokens: int | None
    usage_source: str
    latency_ms: float
    upstream_latency_ms: float | None
    client_request_id: str | None
    cost_usd: float | None = None
    # Upstream attempts it took (retries and failover); 0 when it never reached one.
    attempts: int = 0
    # What more is known of an error than its code, from a small fixed set: the cause of
    # a failed connection (dns, refused, tls, ...) or the timeout that ran out.
    error_detail: str | None = None
    # Of prompt_tokens, those read from and written to the provider's prompt cache.
    cached_prompt_tokens: int | None = None
    cache_write_tokens: int | None = None
    # The API family the caller spoke and the one the provider spoke ("openai",
    # "anthropic"): they differ when the gateway translated (docs/translation.md).
    caller_api: str | None = None
    provider_api: str | None = None

    def row(self) -> tuple[object, ...]:
        return self


USAGE_COLUMNS: tuple[str, ...] = UsageRecord._fields


@dataclass(frozen=True)
class ModelUsage:
    """One model's recorded usage for one subject over a period (quota rebuilds read it)."""

    model: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float


@dataclass(frozen=True)
class ReportRow:
    """One line of a usage report."""

    name: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float


# What a report can group by, and the rollup column that holds it.
REPORT_GROUPS = {"key": "key_id", "user": "user_id", "team": "team_id", "model": "model", "day": "day"}

# Requests per model, status and error code over [since, until), and of them those whose
# prompt tokens the provider billed: what the gateway counted for them and what was billed.
# {exact} is the dialect's test of prompt_estimate_exact; {since} and {until} its parameters.
_BILLED = "usage_source = 'provider' AND prompt_tokens IS NOT NULL"
EVENT_GROUPS_SELECT = (
    "SELECT model, status, error_code, count(*), "
    f"coalesce(sum(CASE WHEN {_BILLED} THEN 1 ELSE 0 END), 0), "
    f"coalesce(sum(CASE WHEN {_BILLED} THEN prompt_tokens_estimated ELSE 0 END), 0), "
    f"coalesce(sum(CASE WHEN {_BILLED} THEN prompt_tokens ELSE 0 END), 0), "
    f"coalesce(sum(CASE WHEN {_BILLED} AND {{exact}} THEN 1 ELSE 0 END), 0) "
    "FROM usage_events WHERE created_at >= {since} AND created_at < {until} "
    "GROUP BY model, status, error_code ORDER BY model, status, error_code"
)

# The ledger column that identifies each policy scope's subject.
SCOPE_COLUMNS = {"key": "key_id", "user": "user_id", "team": "team_id"}


@dataclass(frozen=True)
class UsageFilter:
    """Rollup rows whose key, user, team and model equal these (None: any). A team of ""
    is the rollups' name for requests without a team."""

    key_id: str | None = None
    user_id: str | None = None
    team_id: str | None = None
    model: str | None = None

    def conditions(self) -> list[tuple[str, str]]:
        """(column, value) for each field that is set, in a fixed order."""
        fields = (("key_id", self.key_id), ("user_id", self.user_id), ("team_id", self.team_id))
        return [(column, value) for column, value in (*fields, ("model", self.model)) if value is not None]


@dataclass(frozen=True)
class EventGroup:
    """Recorded requests of one model with one status and error code over a period.

    `billed_*` cover the requests whose prompt tokens the provider reported: those are the
    ones where the gateway's pre-flight count can be compared with the bill.
    """

    model: str
    status: int
    error_code: str | None
    requests: int
    billed_requests: int
    estimated_prompt_tokens: int
    billed_prompt_tokens: int
    # Of the billed requests, those whose pre-flight count was exact (not an estimate).
    exact_requests: int


@dataclass(frozen=True)
class ConsoleSession:
    """A signed-in console session; the database keeps only its id's SHA-256."""

    sha256: str
    created_at: datetime
    last_seen_at: datetime
    # The absolute end, whatever the activity (console.session_lifetime_seconds).
    expires_at: datetime
