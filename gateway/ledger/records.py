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

# The ledger column that identifies each policy scope's subject.
SCOPE_COLUMNS = {"key": "key_id", "user": "user_id", "team": "team_id"}
