"""The console at scale: each page's server time over a generated ledger of a million rows.

Run: ./scripts/bench console [--rows N] [--requests N] [--output FILE] [--smoke]
     (DATABASE_URL and REDIS_URL override the local servers on their standard ports)

It makes a database of its own, writes a ledger into it with COPY (usage events over
90 days by 50 users in 10 teams with 200 keys and 8 models, each request id in
usage_request_ids, and the daily rollups made from the events by the statement the
ledger's migration 0004 backfills them with), starts a real `gateway serve` on it
(Redis, PostgreSQL, the mock provider), signs in to /ui/ as a browser does, and asks
each page N times in turn on one kept-alive connection. A page's time is from the
request's first byte sent to the answer's last byte read, over loopback: the server's
time plus a few tens of microseconds. It prints the median and p95 of each page.

The Overview's "this month" figures scan the month's usage events so far: small early
in a month, largest on its last day. The real clock decides which day it is, so the
same Overview queries are also timed straight through the ledger store over the last
31 days ("at month end"), the most any month asks of them.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import math
import os
import random
import re
import statistics
import sys
import tempfile
import textwrap
import time
import urllib.request
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, date, datetime, timedelta
from datetime import time as day_time
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import redis.asyncio as redis_asyncio

from bench.http.processes import Process, free_port, start, stop, wait_for_port
from gateway.config import PostgresConfig
from gateway.ledger.postgres import PostgresStore
from gateway.ledger.records import USAGE_COLUMNS

DATABASE_URL = os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
ADMIN_KEY = "gw-bench-console-admin-key"
REPO = Path(__file__).resolve().parents[1]
# A page slower than this at a million rows gets its queries fixed (issue 23).
TARGET_MEDIAN_MS = 250.0


@dataclass(frozen=True)
class Model:
    name: str
    route: str
    # USD per million prompt and completion tokens.
    input_price: float
    output_price: float
    # Whether the gateway's pre-flight count is exact (a public tokenizer) or an estimate.
    exact_count: bool
    share: float


MODELS = (
    Model("gpt-4o-mini", "chat", 0.15, 0.6, True, 0.30),
    Model("gpt-4o", "chat", 2.5, 10.0, True, 0.16),
    Model("gpt-4.1", "chat", 2.0, 8.0, True, 0.10),
    Model("gpt-4.1-mini", "chat", 0.4, 1.6, True, 0.10),
    Model("o3-mini", "responses", 1.1, 4.4, True, 0.05),
    Model("claude-sonnet", "messages", 3.0, 15.0, False, 0.14),
    Model("claude-haiku", "messages", 0.8, 4.0, False, 0.07),
    Model("text-embedding-3-small", "embeddings", 0.02, 0.0, True, 0.08),
)
# (status, error code, usage source, share): most requests answered, a few failed.
OUTCOMES = (
    (200, None, "provider", 0.955),
    (429, "upstream_rate_limited", "none", 0.012),
    (502, "upstream_error", "none", 0.008),
    (504, "upstream_timeout", "estimated", 0.005),
    (499, "client_disconnected", "counted", 0.012),
    (400, "upstream_rejected", "none", 0.008),
)


@dataclass(frozen=True)
class LedgerShape:
    rows: int = 1_000_000
    days: int = 90
    users: int = 50
    teams: int = 10
    keys: int = 200
    models: int = 8
    seed: int = 23


@dataclass(frozen=True)
class LedgerKey:
    key_id: str
    user: str
    team: str | None
    tags: tuple[str, ...]
    # Requests of this key, relative to the others'.
    weight: float
    revoked: bool
    expires_at: datetime | None


def ledger_keys(shape: LedgerShape, now: datetime) -> list[LedgerKey]:
    """Keys spread over the users (a few users heavy, most light); every fifth user has no team."""
    rng = random.Random(shape.seed)
    keys = []
    for index in range(shape.keys):
        user_number = index % shape.users
        team = None if user_number % 5 == 4 else f"team-{user_number % shape.teams:02d}"
        revoked = index % 37 == 36
        expires = now + timedelta(days=rng.randint(5, 60)) if index % 11 == 10 else None
        keys.append(
            LedgerKey(
                key_id=f"key-{index:04d}",
                user=f"user-{user_number:02d}",
                team=team,
                tags=("batch",) if index % 3 == 0 else ("interactive",),
                # Zipf-like: user 0 spends most, then fewer and fewer.
                weight=1.0 / (user_number + 1) ** 1.1 * rng.uniform(0.5, 1.5),
                revoked=revoked,
                expires_at=expires,
            )
        )
    return keys


def _day_weights(first: date, days: int, now: datetime) -> list[float]:
    """Weekdays busier than weekends, a slow growth over the period, today only so far."""
    weights = []
    for offset in range(days):
        day = first + timedelta(days=offset)
        weight = (0.35 if day.weekday() >= 5 else 1.0) * (0.7 + 0.6 * offset / max(1, days - 1))
        if day == now.date():
            weight *= (now - datetime.combine(day, day_time(), UTC)).total_seconds() / 86_400
        weights.append(weight)
    return weights


def _apportion(total: int, weights: list[float]) -> list[int]:
    """`total` split by `weights` into whole numbers that add up to it exactly."""
    scale = total / sum(weights)
    counts = [math.floor(weight * scale) for weight in weights]
    by_remainder = sorted(range(len(weights)), key=lambda i: weights[i] * scale - counts[i], reverse=True)
    for index in by_remainder[: total - sum(counts)]:
        counts[index] += 1
    return counts


# Hours of the day (UTC) weighted: office hours in Europe and the Americas.
HOUR_WEIGHTS = [0.3, 0.25, 0.2, 0.2, 0.25, 0.4, 0.7, 1.0, 1.2, 1.3, 1.3, 1.2]
HOUR_WEIGHTS += [1.1, 1.3, 1.4, 1.4, 1.3, 1.1, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4]


def usage_rows(shape: LedgerShape, keys: list[LedgerKey], now: datetime) -> Iterator[tuple[object, ...]]:
    """The ledger's rows (USAGE_COLUMNS order) in time order, over `shape.days` days up to `now`."""
    rng = random.Random(shape.seed + 1)
    models = MODELS[: shape.models]
    model_weights = [model.share for model in models]
    key_weights = [key.weight for key in keys]
    outcome_weights = [outcome[3] for outcome in OUTCOMES]
    first = now.date() - timedelta(days=shape.days - 1)
    hours = list(range(24))
    index = 0
    for offset, count in enumerate(_apportion(shape.rows, _day_weights(first, shape.days, now))):
        midnight = datetime.combine(first + timedelta(days=offset), day_time(), UTC)
        limit = min(86_400.0, (now - midnight).total_seconds())
        seconds = []
        while len(seconds) < count:
            second = (rng.choices(hours, HOUR_WEIGHTS)[0] + rng.random()) * 3600
            if second < limit:
                seconds.append(second)
        seconds.sort()
        picked_keys = rng.choices(keys, key_weights, k=count)
        picked_models = rng.choices(models, model_weights, k=count)
        picked_outcomes = rng.choices(OUTCOMES, outcome_weights, k=count)
        for second, key, model, (status, error_code, source, _) in zip(
            seconds, picked_keys, picked_models, picked_outcomes, strict=True
        ):
            prompt = min(120_000, int(rng.lognormvariate(6.2, 1.1)) + 8)
            completion = 0 if model.route == "embeddings" else min(8_000, int(rng.lognormvariate(5.2, 0.9)))
            estimated = prompt if model.exact_count else round(prompt * rng.uniform(0.98, 1.12))
            billed_prompt: int | None = prompt
            billed_completion: int | None = completion
            if source == "none":
                billed_prompt = billed_completion = None
            elif source != "provider":
                billed_completion = completion // 3
            cost = None
            if billed_prompt is not None and billed_completion is not None:
                cost = (billed_prompt * model.input_price + billed_completion * model.output_price) / 1e6
            latency = rng.lognormvariate(6.5, 0.8)
            yield (
                f"bench-{shape.seed}-{index:08d}",  # request_id
                midnight + timedelta(seconds=second),  # created_at
                key.key_id,
                key.user,
                key.team,
                model.route,
                model.name,
                "anthropic" if model.route == "messages" else "openai",  # provider
                model.name,  # upstream_model
                model.route != "embeddings" and index % 4 == 0,  # stream
                status,
                error_code,
                estimated,  # prompt_tokens_estimated
                model.exact_count,  # prompt_estimate_exact
                estimated + 1024,  # reserved_tokens
                billed_prompt,
                billed_completion,
                source,  # usage_source
                latency,  # latency_ms
                latency * 0.97 if status != 499 else None,  # upstream_latency_ms
                None,  # client_request_id
                cost,
                1 if status < 500 else 2,  # attempts
                "first_byte_timeout" if status == 504 else None,  # error_detail
                None,  # cached_prompt_tokens
                None,  # cache_write_tokens
                "anthropic" if model.route == "messages" else "openai",  # caller_api
                "anthropic" if model.route == "messages" else "openai",  # provider_api
            )
            index += 1


# The statement migration 0004 fills usage_daily with from usage_events (and the ledger's
# writer adds to it batch by batch): the rollups are the events, added up.
KEY_COLUMNS = ["key_id", "key_sha256", "user_id", "team_id", "created_at", "revoked_at", "tags", "expires_at"]
ROLL_UP_ALL = """
INSERT INTO usage_daily
    (day, key_id, user_id, team_id, model, requests, prompt_tokens, completion_tokens, cost_usd)
SELECT (created_at AT TIME ZONE 'UTC')::date, key_id, user_id, coalesce(team_id, ''), model, count(*),
       coalesce(sum(prompt_tokens), 0), coalesce(sum(completion_tokens), 0), coalesce(sum(cost_usd), 0)
FROM usage_events
GROUP BY 1, 2, 3, 4, 5
"""


@dataclass(frozen=True)
class LoadedLedger:
    rows: int
    rollup_rows: int
    keys: int
    seconds: float
    # Read back after the load: each must equal `rows` (the rollups add up the events).
    request_ids: int
    rollup_requests: int
    # Prompt and completion tokens in the events and in the rollups: equal pairs.
    event_tokens: tuple[int, int]
    rollup_tokens: tuple[int, int]


async def load_ledger(
    connection: asyncpg.Connection, shape: LedgerShape, now: datetime, chunk: int = 50_000
) -> LoadedLedger:
    """Writes keys, events, request ids and rollups into a migrated ledger that holds no usage yet."""
    if await connection.fetchval("SELECT count(*) FROM usage_daily") != 0:
        raise RuntimeError("the ledger already holds usage: the rollups would count it twice")
    started = time.perf_counter()
    keys = ledger_keys(shape, now)
    await connection.copy_records_to_table(
        "api_keys",
        columns=KEY_COLUMNS,
        records=[
            (
                key.key_id,
                hashlib.sha256(f"{key.key_id}-{shape.seed}".encode()).hexdigest(),
                key.user,
                key.team,
                now - timedelta(days=shape.days + 5),
                now - timedelta(days=3) if key.revoked else None,
                list(key.tags),
                key.expires_at,
            )
            for key in keys
        ],
    )
    first = now.date() - timedelta(days=shape.days - 1)
    month = first.replace(day=1)
    while month <= now.date():
        following = (month + timedelta(days=32)).replace(day=1)
        # The partitions the ledger's writer makes for each month it writes (postgres.py).
        await connection.execute(
            f"CREATE TABLE IF NOT EXISTS usage_events_{month.year:04d}_{month.month:02d} "
            f"PARTITION OF usage_events FOR VALUES FROM ('{month}') TO ('{following}')"
        )
        month = following
    written = 0
    batch: list[tuple[object, ...]] = []
    for row in usage_rows(shape, keys, now):
        batch.append(row)
        if len(batch) == chunk:
            written += await _copy_events(connection, batch)
            batch = []
    if batch:
        written += await _copy_events(connection, batch)
    await connection.execute(ROLL_UP_ALL)
    await connection.execute("ANALYZE")
    seconds = time.perf_counter() - started
    rollups = await connection.fetchrow(
        "SELECT count(*), coalesce(sum(requests), 0), coalesce(sum(prompt_tokens), 0), "
        "coalesce(sum(completion_tokens), 0) FROM usage_daily"
    )
    events = await connection.fetchrow(
        "SELECT coalesce(sum(prompt_tokens), 0), coalesce(sum(completion_tokens), 0) FROM usage_events"
    )
    request_ids = await connection.fetchval("SELECT count(*) FROM usage_request_ids")
    return LoadedLedger(
        rows=written,
        rollup_rows=int(rollups[0]),
        keys=len(keys),
        seconds=round(seconds, 2),
        request_ids=int(request_ids),
        rollup_requests=int(rollups[1]),
        event_tokens=(int(events[0]), int(events[1])),
        rollup_tokens=(int(rollups[2]), int(rollups[3])),
    )


async def _copy_events(connection: asyncpg.Connection, rows: list[tuple[object, ...]]) -> int:
    await connection.copy_records_to_table("usage_events", records=rows, columns=USAGE_COLUMNS)
    await connection.copy_records_to_table(
        "usage_request_ids", records=[(row[0], row[1]) for row in rows], columns=["request_id", "created_at"]
    )
    return len(rows)


# ---------------------------------------------------------------- the gateway


POLICIES = """\
policies:
  - name: per-user
    scope: user
    limits:
      - {tokens: 2000000, per: day}
      - {requests: 600, per: minute}
  - name: per-team
    scope: team
    limits:
      - {cost_usd: 500, per: month}
  - name: per-key
    scope: key
    limits:
      - {requests: 60, per: minute}
"""


def write_config(directory: Path, dsn: str, redis_url: str, key_prefix: str, shape: LedgerShape) -> Path:
    models = "".join(
        f"  {model.name}: {{provider: mock, upstream_model: gpt-4o, "
        f"price: {{input: {model.input_price}, output: {model.output_price}}}}}\n"
        for model in MODELS[: shape.models]
    )
    (directory / "policies").mkdir(exist_ok=True)
    (directory / "policies" / "bench.yaml").write_text(POLICIES)
    path = directory / "gateway.yaml"
    path.write_text(
        textwrap.dedent(
            f"""\
            server: {{host: 127.0.0.1, log_json: true}}
            backends:
              redis: {{url: "{redis_url}", key_prefix: "{key_prefix}"}}
              postgres: {{dsn: "{dsn}"}}
            providers:
              mock: {{type: mock}}
            admin:
              key_sha256: {hashlib.sha256(ADMIN_KEY.encode()).hexdigest()}
            quota:
              policies: policies/*.yaml
            models:
            """
        )
        + models
    )
    return path


def start_gateway(directory: Path) -> Process:
    port = free_port()
    process = start(
        "gateway",
        [sys.executable, "-m", "gateway", "serve", "--config", "gateway.yaml", "--port", str(port)],
        cwd=directory,
        log=directory / "gateway.log",
        port=port,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    wait_for_port(process, timeout=60)
    for _ in range(300):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as answer:
                if answer.status == 200:
                    return process
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"the gateway did not become healthy; see {process.log}")


async def sign_in(session: aiohttp.ClientSession, base: str) -> None:
    async with session.get(f"{base}/ui/login") as answer:
        found = re.search(r'name="csrf_token" value="([^"]+)"', await answer.text())
    if found is None:
        raise RuntimeError("no login form at /ui/login")
    fields = {"csrf_token": found[1], "admin_key": ADMIN_KEY, "next": "/ui/"}
    async with session.post(f"{base}/ui/login", data=fields, allow_redirects=False) as answer:
        if answer.status != 303:
            raise RuntimeError(f"login answered {answer.status}")


def pages(today: date, days: int) -> dict[str, str]:
    """Name → path of every page the benchmark asks for, the costly variants too."""
    first = (today - timedelta(days=days - 1)).isoformat()
    until = (today + timedelta(days=1)).isoformat()
    return {
        "overview (today)": "/ui/",
        "overview (this month)": "/ui/?period=month",
        "usage by user (month)": "/ui/usage",
        f"usage by key ({days} days)": f"/ui/usage?by=key&since={first}&until={until}",
        f"usage by day ({days} days)": f"/ui/usage?by=day&since={first}&until={until}",
        "usage by model, one user": f"/ui/usage?by=model&user=user-00&since={first}&until={until}",
        f"usage.csv by key ({days} days)": f"/ui/usage.csv?by=key&since={first}&until={until}",
        "keys": "/ui/keys",
        "quotas": "/ui/quotas",
        "policies": "/ui/policies",
        "health": "/ui/health",
    }


@dataclass(frozen=True)
class Timing:
    name: str
    path: str
    requests: int
    median_ms: float
    p95_ms: float
    max_ms: float
    bytes: int


def summarize(name: str, path: str, samples: list[float], size: int) -> Timing:
    ordered = sorted(samples)
    # Nearest rank: the smallest sample with 95% of them at or below it.
    p95 = ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]
    return Timing(
        name,
        path,
        len(samples),
        round(statistics.median(ordered) * 1e3, 2),
        round(p95 * 1e3, 2),
        round(ordered[-1] * 1e3, 2),
        size,
    )


async def time_pages(base: str, paths: dict[str, str], requests: int, warmup: int) -> list[Timing]:
    """Each page `requests` times after `warmup` untimed ones, in turn (page A, B, ..., A, B, ...)."""
    samples: dict[str, list[float]] = {name: [] for name in paths}
    sizes: dict[str, int] = {}
    connector = aiohttp.TCPConnector(limit=1)
    cookies = aiohttp.CookieJar(unsafe=True)  # cookies of 127.0.0.1 kept, as a browser keeps them
    async with aiohttp.ClientSession(connector=connector, cookie_jar=cookies) as session:
        await sign_in(session, base)
        for round_number in range(warmup + requests):
            for name, path in paths.items():
                started = time.perf_counter()
                async with session.get(base + path, allow_redirects=False) as answer:
                    body = await answer.read()
                elapsed = time.perf_counter() - started
                if answer.status != 200:
                    raise RuntimeError(f"{path} answered {answer.status}: {body[:500]!r}")
                sizes[name] = len(body)
                if round_number >= warmup:
                    samples[name].append(elapsed)
    return [summarize(name, path, samples[name], sizes[name]) for name, path in paths.items()]


async def time_month_end(dsn: str, now: datetime, requests: int) -> list[Timing]:
    """The Overview's five queries over a whole 31-day month, as on a month's last day."""
    store = PostgresStore(PostgresConfig(dsn=dsn))
    await store.open()
    try:
        tomorrow = now.date() + timedelta(days=1)
        month_start = tomorrow - timedelta(days=31)
        since = datetime.combine(month_start, day_time(), UTC)
        until = datetime.combine(tomorrow, day_time(), UTC)
        queries: dict[str, Callable[[], Awaitable[object]]] = {
            "rollups by day (31 days)": lambda: store.usage_report("day", month_start, tomorrow),
            "rollups by user (31 days)": lambda: store.usage_report("user", month_start, tomorrow),
            "events by model, status (31 days)": lambda: store.event_groups(since, until),
        }
        timings = []
        for name, query in queries.items():
            samples = []
            for round_number in range(2 + requests):
                started = time.perf_counter()
                await query()
                if round_number >= 2:
                    samples.append(time.perf_counter() - started)
            timings.append(summarize(name, "(store)", samples, 0))
        return timings
    finally:
        await store.close()


def table(timings: list[Timing]) -> str:
    width = max(len(timing.name) for timing in timings)
    lines = [f"{'page':<{width}}  {'median ms':>9}  {'p95 ms':>8}  {'max ms':>8}  {'KB':>6}"]
    for timing in timings:
        flag = "  ✗" if timing.median_ms > TARGET_MEDIAN_MS else ""
        size = f"{timing.bytes / 1024:6.1f}" if timing.bytes else "     -"
        figures = f"{timing.median_ms:9.2f}  {timing.p95_ms:8.2f}  {timing.max_ms:8.2f}"
        lines.append(f"{timing.name:<{width}}  {figures}  {size}{flag}")
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="./scripts/bench console", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=LedgerShape.rows, help="usage events to generate")
    parser.add_argument("--requests", type=int, default=30, help="timed requests per page")
    parser.add_argument("--warmup", type=int, default=3, help="untimed requests per page first")
    parser.add_argument("--smoke", action="store_true", help="2,000 rows, 3 requests a page: checks it runs")
    parser.add_argument("--output", type=Path, help="also write the results here as JSON")
    parser.add_argument("--database-url", default=DATABASE_URL)
    parser.add_argument("--redis-url", default=REDIS_URL)
    prefix = f"bench-console:{uuid.uuid4().hex[:8]}:"
    parser.add_argument("--redis-key-prefix", default=prefix, help="the gateway's Redis keys")
    args = parser.parse_args(argv)
    if args.smoke:
        args.rows, args.requests, args.warmup = 2_000, 3, 1
    return args


async def run(args: argparse.Namespace) -> dict[str, Any]:
    shape = LedgerShape(rows=args.rows)
    now = datetime.now(UTC)
    name = f"gateway_bench_console_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(args.database_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    dsn = args.database_url.rsplit("/", 1)[0] + f"/{name}"
    process: Process | None = None
    try:
        store = PostgresStore(PostgresConfig(dsn=dsn))
        await store.open()
        await store.migrate()
        await store.close()
        connection = await asyncpg.connect(dsn)
        try:
            loaded = await load_ledger(connection, shape, now)
            month_rows = await connection.fetchval(
                "SELECT count(*) FROM usage_events WHERE created_at >= $1",
                datetime.combine(now.date().replace(day=1), day_time(), UTC),
            )
        finally:
            await connection.close()
        print(
            f"ledger: {loaded.rows:,} events ({month_rows:,} this month so far), {loaded.rollup_rows:,} "
            f"rollup rows, {loaded.keys} keys, written in {loaded.seconds:.1f} s",
            flush=True,
        )
        with tempfile.TemporaryDirectory(prefix="bench-console-") as folder:
            directory = Path(folder)
            write_config(directory, dsn, args.redis_url, args.redis_key_prefix, shape)
            process = start_gateway(directory)
            try:
                base = f"http://127.0.0.1:{process.port}"
                timings = await time_pages(base, pages(now.date(), shape.days), args.requests, args.warmup)
            finally:
                stop(process)
                log = process.log.read_text(errors="replace")
        month_end = await time_month_end(dsn, now, args.requests)
        print(table(timings))
        print("\nThe Overview's queries over a whole month (31 days), straight through the ledger store:")
        print(table(month_end))
        errors = [line for line in log.splitlines() if _is_error(line)]
        return {
            "date": now.isoformat(timespec="seconds"),
            "machine": {"nproc": os.cpu_count(), "python": sys.version.split()[0]},
            "ledger": {**asdict(shape), **asdict(loaded), "month_rows": month_rows},
            "requests_per_page": args.requests,
            "pages": [asdict(timing) for timing in timings],
            "month_end": [asdict(timing) for timing in month_end],
            "gateway_errors": errors,
        }
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
        await _delete_redis_keys(args.redis_url, args.redis_key_prefix)


async def _delete_redis_keys(url: str, prefix: str) -> None:
    """The gateway's keys of this run (login throttle, script cache): nothing else."""
    client = redis_asyncio.Redis.from_url(url)
    try:
        keys = [key async for key in client.scan_iter(match=f"{prefix}*", count=1000)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


def _is_error(line: str) -> bool:
    """A log line at level error or above, or a traceback the logger did not format."""
    try:
        entry = json.loads(line)
    except ValueError:
        return "Traceback" in line
    return isinstance(entry, dict) and entry.get("level") in ("error", "critical")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    result = asyncio.run(run(args))
    if args.output is not None:
        args.output.write_text(json.dumps(result, indent=2) + "\n")
    return 1 if result["gateway_errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
