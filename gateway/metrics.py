"""Every Prometheus metric the gateway exports, on one registry per application.

Labels hold only bounded values: route, configured model and provider names, status
codes and limit names. Never a key, a user, a request id or a raw path.
"""

from __future__ import annotations

import bisect
import os
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar, cast

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    multiprocess,
)

from gateway import __version__

# Seconds; spans a cached tiny completion to a long generation.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
UNKNOWN_MODEL = "unknown"
# Set (to a folder) when `server.workers` > 1: workers write their metrics there.
MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Relative error of pre-flight prompt counts; 0 is exact, negative under-reserves.
ESTIMATE_ERROR_BUCKETS = (-0.5, -0.25, -0.1, -0.05, -0.01, 0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0)
# prometheus_client's own switch. Unset, the gateway turns the `_created` series off: a
# start time per counter and histogram child (with its own HELP and TYPE lines), a fifth
# of /metrics that no dashboard or alert reads. PROMETHEUS_DISABLE_CREATED_SERIES=false
# brings them back. (Workers' metrics, added up from their files, never had them.)
CREATED_SERIES_ENV = "PROMETHEUS_DISABLE_CREATED_SERIES"

if CREATED_SERIES_ENV not in os.environ:
    # prometheus_client reads this flag at every scrape, for every registry in the process.
    disable_created_metrics()  # type: ignore[no-untyped-call]


_Child = TypeVar("_Child")


class CounterChild(Protocol):
    def inc(self, amount: float = 1) -> None: ...


class HistogramChild(Protocol):
    def observe(self, amount: float) -> None: ...


class CounterTally:
    """A counter's increments, added up here and handed to prometheus_client when read.

    prometheus_client takes a lock and checks the metric on every increment, and walks
    a histogram's buckets one by one in Python; a request makes about twenty such
    updates. Tallies make each a plain addition. Only for one process: with several
    workers, metrics go through prometheus_client's shared files as they happen.
    """

    __slots__ = ("_pending", "_target")

    def __init__(self, target: Counter | Gauge) -> None:
        self._target = target
        self._pending = 0.0

    def inc(self, amount: float = 1) -> None:
        self._pending += amount

    def dec(self, amount: float = 1) -> None:
        self._pending -= amount

    def flush(self) -> None:
        if self._pending:
            self._target.inc(self._pending)
            self._pending = 0.0


class HistogramTally:
    """A histogram's observations, counted per bucket here until read (see CounterTally)."""

    __slots__ = ("_bounds", "_counts", "_sum", "_target")

    def __init__(self, target: Histogram) -> None:
        self._target = target
        # prometheus_client's own bounds and per-bucket values (not cumulative), the
        # ones its observe() adds to.
        self._bounds: list[float] = target._upper_bounds
        self._counts = [0] * len(self._bounds)
        self._sum = 0.0

    def observe(self, amount: float) -> None:
        self._sum += amount
        self._counts[bisect.bisect_left(self._bounds, amount)] += 1

    def flush(self) -> None:
        buckets = self._target._buckets
        for index, count in enumerate(self._counts):
            if count:
                buckets[index].inc(count)
                self._counts[index] = 0
        if self._sum:
            self._target._sum.inc(self._sum)
            self._sum = 0.0


class Labelled(Generic[_Child]):
    """A labelled metric whose children are looked up once per label set.

    prometheus_client validates and locks on every labels() call (~3 µs); the request
    path makes a dozen such calls, for label sets that repeat. With `tallies`, each
    child is a tally (see CounterTally) kept in that list until flushed.
    """

    def __init__(
        self, metric: Counter | Histogram, tallies: list[CounterTally | HistogramTally] | None
    ) -> None:
        self.metric = metric
        self._tallies = tallies
        self._children: dict[tuple[str, ...], _Child] = {}

    def labels(self, *values: str) -> _Child:
        child = self._children.get(values)
        if child is None:
            made = self.metric.labels(*values)
            if self._tallies is not None:
                made = _tally(made, self._tallies)
            child = self._children[values] = cast(_Child, made)
        return child


def _tally(metric: Counter | Gauge | Histogram, tallies: list[CounterTally | HistogramTally]) -> Any:
    tally = HistogramTally(metric) if isinstance(metric, Histogram) else CounterTally(metric)
    tallies.append(tally)
    return tally


class _TallyFlusher:
    """A collector of nothing that hands the tallies to prometheus_client when the
    registry is read, so that any reader of it (a scrape, a test) sees them added in."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> list[Any]:
        self._metrics.flush()
        return []


class RequestSeries:
    """The series the answers of one route and model update, looked up once per pair:
    three labels() calls per request become one dictionary lookup (see Metrics.series_of)."""

    __slots__ = ("_answered", "_metrics", "_model", "_overhead", "_route", "duration")

    def __init__(self, metrics: Metrics, route: str, model: str) -> None:
        self._metrics, self._route, self._model = metrics, route, model
        self._answered: dict[int, CounterChild] = {}
        self._overhead: HistogramChild | None = None
        self.duration = metrics.request_duration.labels(route, model)

    def answered(self, status: int) -> CounterChild:
        """gateway_requests_total's series for this status."""
        child = self._answered.get(status)
        if child is None:
            child = self._answered[status] = self._metrics.requests.labels(
                self._route, self._model, str(status)
            )
        return child

    def overhead(self) -> HistogramChild:
        """gateway_overhead_seconds's series (made when first used: only requests sent upstream have it)."""
        if self._overhead is None:
            self._overhead = self._metrics.overhead.labels(self._route)
        return self._overhead


class ModelSeries:
    """The series a settled request of one model updates, looked up once per model.

    The token counters are made at once (every settled request adds to them); the others
    when first used, so that /metrics shows no series a model never had before.
    """

    __slots__ = (
        "_cost",
        "_first_token",
        "_metrics",
        "_model",
        "_upstream",
        "completion_tokens",
        "estimated_prompt_tokens",
        "prompt_tokens",
    )

    def __init__(self, metrics: Metrics, model: str) -> None:
        self._metrics, self._model = metrics, model
        self.estimated_prompt_tokens = metrics.estimated_prompt_tokens.labels(model)
        self.prompt_tokens = metrics.prompt_tokens.labels(model)
        self.completion_tokens = metrics.completion_tokens.labels(model)
        self._cost: CounterChild | None = None
        self._first_token: HistogramChild | None = None
        self._upstream: dict[str, HistogramChild] = {}

    def cost(self) -> CounterChild:
        if self._cost is None:
            self._cost = self._metrics.cost.labels(self._model)
        return self._cost

    def time_to_first_token(self) -> HistogramChild:
        if self._first_token is None:
            self._first_token = self._metrics.time_to_first_token.labels(self._model)
        return self._first_token

    def upstream_duration(self, provider: str) -> HistogramChild:
        child = self._upstream.get(provider)
        if child is None:
            child = self._upstream[provider] = self._metrics.upstream_duration.labels(provider, self._model)
        return child


@dataclass
class Metrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    # Per-team series only when the operator opts in (metrics.team_labels): teams are a
    # bounded set they choose to expose, unlike keys or users.
    team_labels: bool = False

    def __post_init__(self) -> None:
        r = self.registry
        # With several workers each update goes to the shared files at once (see CounterTally).
        self._tallies: list[CounterTally | HistogramTally] | None = (
            None if os.environ.get(MULTIPROCESS_ENV) else []
        )
        if self._tallies is not None:
            # First on the registry, so whatever reads it reads the tallies' sums too.
            r.register(_TallyFlusher(self))
        self.team_tokens: Labelled[CounterChild] | None = None
        if self.team_labels:
            self.team_tokens = self._counters(
                Counter(
                    "gateway_team_tokens_total",
                    "Prompt and completion tokens by team (only with metrics.team_labels).",
                    ["team", "type"],
                    registry=r,
                )
            )
        self.build_info = Gauge(
            "gateway_build_info",
            "Version of the running gateway.",
            ["version"],
            registry=r,
            multiprocess_mode="max",
        )
        self.build_info.labels(__version__).set(1)
        self.requests = self._counters(
            Counter(
                "gateway_requests_total",
                "Requests answered, by route, model and HTTP status.",
                ["route", "model", "status"],
                registry=r,
            )
        )
        self.prompt_tokens = self._counters(
            Counter(
                "gateway_prompt_tokens_total",
                "Prompt (input) tokens charged: the provider's figures, else the gateway's count.",
                ["model"],
                registry=r,
            )
        )
        self.completion_tokens = self._counters(
            Counter(
                "gateway_completion_tokens_total",
                "Completion (output) tokens charged: the provider's figures, else the gateway's count.",
                ["model"],
                registry=r,
            )
        )
        self.settlements = self._counters(
            Counter(
                "gateway_settlements_total",
                "Requests settled, by where their charged figures came from: provider "
                "(its usage), counted, estimated (by the gateway) or none (nothing charged).",
                ["source"],
                registry=r,
            )
        )
        self.estimated_prompt_tokens = self._counters(
            Counter(
                "gateway_prompt_tokens_estimated_total",
                "Prompt tokens counted by the gateway before forwarding.",
                ["model"],
                registry=r,
            )
        )
        # Observed for every settled request (tokens/calibration.py): tallied too.
        self.estimate_error = self._histograms(
            Histogram(
                "gateway_prompt_estimate_error_ratio",
                "(reserved prompt tokens - billed prompt tokens) / billed, per request.",
                ["model"],
                buckets=ESTIMATE_ERROR_BUCKETS,
                registry=r,
            )
        )
        self.calibration_ratio = Gauge(
            "gateway_prompt_calibration_ratio",
            "Learned ratio of billed to counted prompt tokens, for models counted by estimate.",
            ["model"],
            registry=r,
            multiprocess_mode="mostrecent",
        )
        self.cost = self._counters(
            Counter(
                "gateway_cost_usd_total",
                "Cost of the provider's usage at the model's configured price, in US dollars.",
                ["model"],
                registry=r,
            )
        )
        self.quota_admissions = self._tallied(
            Counter(
                "gateway_quota_admissions_total",
                "Requests admitted by the quota engine (every limit that applied had room).",
                registry=r,
            )
        )
        self.quota_rejections = Counter(
            "gateway_quota_rejections_total",
            "Requests rejected by a quota limit, by the limit that rejected them.",
            ["limit", "scope"],
            registry=r,
        )
        self.quota_shadow_rejections = Counter(
            "gateway_quota_shadow_rejections_total",
            "Requests a shadow-mode policy would have rejected (they were admitted).",
            ["limit", "scope"],
            registry=r,
        )
        self.quota_fail_open = Counter(
            "gateway_quota_fail_open_admissions_total",
            "Requests admitted without Redis by fail-open policies (counted per process only).",
            registry=r,
        )
        self.quota_overshoot_tokens = Counter(
            "gateway_quota_overshoot_tokens_total",
            "Completion tokens billed beyond what was reserved for them.",
            registry=r,
        )
        self.quota_rebuilds = Counter(
            "gateway_quota_rebuilds_total",
            "Subjects whose day and month counters were rebuilt from the ledger.",
            registry=r,
        )
        self.policy_reloads = Counter(
            "gateway_policy_reloads_total",
            "Policy reloads, by result (ok, failed).",
            ["result"],
            registry=r,
        )
        self.quota_errors = Counter(
            "gateway_quota_errors_total",
            "Quota store calls that failed, by operation.",
            ["operation"],
            registry=r,
        )
        self.request_duration = self._histograms(
            Histogram(
                "gateway_request_duration_seconds",
                "Time from request arrival to the last byte sent.",
                ["route", "model"],
                buckets=LATENCY_BUCKETS,
                registry=r,
            )
        )
        self.upstream_duration = self._histograms(
            Histogram(
                "gateway_upstream_duration_seconds",
                "Time the provider took, from sending the request to its last byte.",
                ["provider", "model"],
                buckets=LATENCY_BUCKETS,
                registry=r,
            )
        )
        self.upstream_failures = Counter(
            "gateway_upstream_failures_total",
            "Upstream attempts that failed, by provider and cause: dns, refused, unreachable, tls, "
            "proxy, reset, closed, malformed, too_large, connect_timeout, first_byte_timeout, "
            "idle_timeout, total_timeout, other; status_408, status_409, status_429, status_5xx.",
            ["provider", "cause"],
            registry=r,
        )
        self.breaker_openings = Counter(
            "gateway_upstream_breaker_openings_total",
            "Times a deployment was taken out for a cool-down.",
            ["provider"],
            registry=r,
        )
        self.breaker_open = Gauge(
            "gateway_upstream_breaker_open",
            "1 while a deployment is taken out (circuit open).",
            ["provider"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.time_to_first_token = self._histograms(
            Histogram(
                "gateway_time_to_first_token_seconds",
                "Streams: time from request arrival to the first event relayed to the client.",
                ["model"],
                buckets=LATENCY_BUCKETS,
                registry=r,
            )
        )
        self.overhead = self._histograms(
            Histogram(
                "gateway_overhead_seconds",
                "What the gateway adds: total time minus the provider's time.",
                ["route"],
                buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
                registry=r,
            )
        )
        self.backend_seconds = self._histograms(
            Histogram(
                "gateway_backend_call_seconds",
                "Calls to Redis (quota scripts) and the database (ledger batches).",
                ["backend", "operation"],
                buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0),
                registry=r,
            )
        )
        in_flight = Gauge("gateway_requests_in_flight", "Requests being served now.", registry=r)
        self.in_flight: Gauge | CounterTally = (
            in_flight if self._tallies is None else _tally(in_flight, self._tallies)
        )
        self.event_loop_tasks = Gauge(
            "gateway_event_loop_tasks",
            "asyncio tasks alive in the event loop, sampled when /metrics is scraped.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.ledger_queue_depth = Gauge(
            "gateway_ledger_queue_depth",
            "Usage records spooled but not yet in the database.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.ledger_rows = Counter(
            "gateway_ledger_rows_written_total", "Usage records written to the ledger.", registry=r
        )
        self.ledger_write_errors = Counter(
            "gateway_ledger_write_errors_total",
            "Ledger batch writes that failed (the batch is retried).",
            registry=r,
        )
        self.ledger_batch_size = Histogram(
            "gateway_ledger_batch_records",
            "Records per ledger batch.",
            buckets=(1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500),
            registry=r,
        )
        self.ledger_batch_seconds = Histogram(
            "gateway_ledger_batch_seconds",
            "Time to write one ledger batch, retries included.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ledger_spooled = self._tallied(
            Counter(
                "gateway_ledger_spooled_records_total",
                "Usage records appended to the on-disk spool.",
                registry=r,
            )
        )
        self.ledger_spool_bytes = Gauge(
            "gateway_ledger_spool_bytes",
            "Spooled bytes not yet in the database.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.ledger_spool_errors = Counter(
            "gateway_ledger_spool_errors_total",
            "Spool writes that failed (disk full?): appends, whose records are held in memory, "
            "and per-batch fsyncs and checkpoints.",
            registry=r,
        )
        self.ledger_replayed = Counter(
            "gateway_ledger_replayed_records_total",
            "Records written from the spool of an earlier run (after a crash or outage).",
            registry=r,
        )
        self.ledger_rejected = Counter(
            "gateway_ledger_rejected_records_total",
            "Records the database refused for their data; kept in the spool's rejected.jsonl.",
            registry=r,
        )

        self._request_series: dict[tuple[str, str], RequestSeries] = {}
        self._model_series: dict[str, ModelSeries] = {}
        self._team_series: dict[str, tuple[CounterChild, CounterChild]] = {}

    def series_of(self, route: str, model: str) -> RequestSeries:
        """The series of answers on `route` for `model` (bounded: routes and configured models)."""
        series = self._request_series.get((route, model))
        if series is None:
            series = self._request_series[(route, model)] = RequestSeries(self, route, model)
        return series

    def model_series(self, model: str) -> ModelSeries:
        series = self._model_series.get(model)
        if series is None:
            series = self._model_series[model] = ModelSeries(self, model)
        return series

    def team_tokens_of(self, team: str) -> tuple[CounterChild, CounterChild] | None:
        """gateway_team_tokens_total's prompt and completion series of `team`, if team_labels."""
        if self.team_tokens is None:
            return None
        series = self._team_series.get(team)
        if series is None:
            prompt, completion = (
                self.team_tokens.labels(team, "prompt"),
                self.team_tokens.labels(team, "completion"),
            )
            series = self._team_series[team] = (prompt, completion)
        return series

    def _counters(self, metric: Counter) -> Labelled[CounterChild]:
        return Labelled(metric, self._tallies)

    def _histograms(self, metric: Histogram) -> Labelled[HistogramChild]:
        return Labelled(metric, self._tallies)

    def _tallied(self, metric: Counter) -> CounterChild:
        """An unlabelled counter, tallied like the labelled ones."""
        return metric if self._tallies is None else _tally(metric, self._tallies)

    def flush(self) -> None:
        """Hand every tally to prometheus_client (before anything reads the registry)."""
        for tally in self._tallies or ():
            tally.flush()

    def sample(self, name: str) -> float:
        """One unlabelled sample of this process (e.g. `gateway_requests_in_flight`), 0 if absent."""
        return self.registry.get_sample_value(name) or 0.0

    def exposition(self) -> bytes:
        """This process's metrics, or, with several workers, every worker's added up."""
        if os.environ.get(MULTIPROCESS_ENV):
            combined = CollectorRegistry()
            multiprocess.MultiProcessCollector(combined)  # type: ignore[no-untyped-call]
            return generate_latest(combined)
        return generate_latest(self.registry)
