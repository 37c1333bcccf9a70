"""The Overview's figures, worked out from the ledger's rows and the gateway's counters.

Nothing here counts anew: totals add up the rollup rows `gateway usage` reads, outcomes
and estimate accuracy add up the ledger's events, rejections read the gateway's own
Prometheus counters (a request refused before admission is never a ledger row).
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, multiprocess

from gateway.ledger.records import EventGroup, ReportRow
from gateway.metrics import MULTIPROCESS_ENV, Metrics


@dataclass(frozen=True)
class Totals:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def totals(rows: Iterable[ReportRow]) -> Totals:
    listed = list(rows)
    return Totals(
        sum(row.requests for row in listed),
        sum(row.prompt_tokens for row in listed),
        sum(row.completion_tokens for row in listed),
        sum(row.cost_usd for row in listed),
    )


def top(rows: Sequence[ReportRow], count: int) -> list[ReportRow]:
    """The rows with the most tokens (then the most requests, then by name)."""
    ranked = sorted(rows, key=lambda r: (-(r.prompt_tokens + r.completion_tokens), -r.requests, r.name))
    return ranked[:count]


@dataclass(frozen=True)
class Outcome:
    status: int
    error_code: str | None
    requests: int


@dataclass(frozen=True)
class ModelAccuracy:
    """How the gateway's pre-flight prompt counts compare with the provider's bills."""

    model: str
    billed_requests: int
    estimated_prompt_tokens: int
    billed_prompt_tokens: int
    exact_requests: int

    @property
    def error_ratio(self) -> float | None:
        """(counted - billed) / billed over the period; positive reserves too much."""
        if not self.billed_prompt_tokens:
            return None
        return (self.estimated_prompt_tokens - self.billed_prompt_tokens) / self.billed_prompt_tokens


@dataclass(frozen=True)
class EventFigures:
    requests: int
    # Recorded requests that failed at the gateway or the provider (status 500 and up).
    server_errors: int
    outcomes: list[Outcome]
    accuracy: list[ModelAccuracy]

    @property
    def error_rate(self) -> float | None:
        return self.server_errors / self.requests if self.requests else None


def event_figures(groups: Sequence[EventGroup]) -> EventFigures:
    outcomes: dict[tuple[int, str | None], int] = defaultdict(int)
    per_model: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    for group in groups:
        if group.status >= 400:
            outcomes[(group.status, group.error_code)] += group.requests
        figures = per_model[group.model]
        figures[0] += group.billed_requests
        figures[1] += group.estimated_prompt_tokens
        figures[2] += group.billed_prompt_tokens
        figures[3] += group.exact_requests
    return EventFigures(
        requests=sum(group.requests for group in groups),
        server_errors=sum(group.requests for group in groups if group.status >= 500),
        outcomes=sorted(
            (Outcome(status, code, count) for (status, code), count in outcomes.items()),
            key=lambda outcome: (-outcome.requests, outcome.status, outcome.error_code or ""),
        ),
        accuracy=[
            ModelAccuracy(model, *figures) for model, figures in sorted(per_model.items()) if figures[0]
        ],
    )


@dataclass(frozen=True)
class Rejection:
    """Requests refused with one status, or by one quota limit, since the gateway started."""

    reason: str
    requests: int


def counter_samples(metrics: Metrics, sample_name: str) -> list[tuple[dict[str, str], float]]:
    """Every labelled value of one counter: this process's, or every worker's added up."""
    registry = metrics.registry
    if os.environ.get(MULTIPROCESS_ENV):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    found: dict[tuple[tuple[str, str], ...], float] = defaultdict(float)
    for family in registry.collect():
        for sample in family.samples:
            if sample.name == sample_name:
                found[tuple(sorted(sample.labels.items()))] += sample.value
    return [(dict(labels), value) for labels, value in found.items()]


def rejections(metrics: Metrics) -> tuple[list[Rejection], list[Rejection]]:
    """(answers with a 4xx status by status, quota rejections by limit and scope)."""
    by_status: dict[str, float] = defaultdict(float)
    for labels, value in counter_samples(metrics, "gateway_requests_total"):
        if labels.get("status", "").startswith("4"):
            by_status[labels["status"]] += value
    by_limit: dict[str, float] = defaultdict(float)
    for labels, value in counter_samples(metrics, "gateway_quota_rejections_total"):
        by_limit[f"{labels.get('scope', '?')} {labels.get('limit', '?')}"] += value

    def ranked(found: dict[str, float]) -> list[Rejection]:
        listed = [Rejection(reason, int(value)) for reason, value in found.items() if value]
        return sorted(listed, key=lambda rejection: (-rejection.requests, rejection.reason))

    return ranked(by_status), ranked(by_limit)
