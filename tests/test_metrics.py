"""/metrics moves by exactly what the requests did."""

from __future__ import annotations

import asyncio

import aiohttp
import asyncpg
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import T0_MS, StartGateway
from tests.fakes.openai_upstream import FakeUpstream

HI = [{"role": "user", "content": "hi"}]
ROUTE = "/v1/chat/completions"


async def scrape(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    async with aiohttp.ClientSession() as session, session.get(f"{url}/metrics") as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = await response.text()
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def test_metrics_move_by_the_right_amounts(
    start_gateway: StartGateway, fake_upstream: FakeUpstream, pg: asyncpg.Connection
) -> None:
    gateway = await start_gateway(
        """
        policies:
          - name: tpm
            scope: user
            limits: [{tokens: 60, per: minute}]
        """,
        clock_ms=lambda: T0_MS,
    )
    before = await scrape(gateway.url)
    client = gateway.client()
    # Two completions of 5 tokens each: prompt 8 + 5 = 13 tokens each.
    for _ in range(2):
        await client.chat.completions.create(model="gpt-4o-mini", messages=HI, max_tokens=5)
    await gateway.settle()
    # 26 used; 8 + 40 more does not fit in 60.
    with pytest.raises(openai.RateLimitError):
        await client.chat.completions.create(model="gpt-4o-mini", messages=HI, max_tokens=40)
    with pytest.raises(openai.NotFoundError):
        await client.chat.completions.create(model="nope", messages=HI)
    await gateway.settle()
    after = await scrape(gateway.url)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("gateway_requests_total", route=ROUTE, model="gpt-4o-mini", status="200") == 2
    assert delta("gateway_requests_total", route=ROUTE, model="gpt-4o-mini", status="429") == 1
    assert delta("gateway_requests_total", route=ROUTE, model="unknown", status="404") == 1
    assert delta("gateway_prompt_tokens_total", model="gpt-4o-mini") == 16
    assert delta("gateway_completion_tokens_total", model="gpt-4o-mini") == 10
    assert delta("gateway_prompt_tokens_estimated_total", model="gpt-4o-mini") == 16
    assert delta("gateway_settlements_total", source="provider") == 2
    assert delta("gateway_settlements_total", source="counted") == 0
    assert delta("gateway_quota_rejections_total", limit="tokens_per_minute", scope="user") == 1
    assert delta("gateway_quota_admissions_total") == 2
    # gpt-4o-mini at $0.15 / $0.60 per million: 16 prompt and 10 completion tokens.
    assert delta("gateway_cost_usd_total", model="gpt-4o-mini") == pytest.approx(16 * 0.15e-6 + 10 * 0.6e-6)
    assert delta("gateway_request_duration_seconds_count", route=ROUTE, model="gpt-4o-mini") == 3
    assert delta("gateway_upstream_duration_seconds_count", provider="fake", model="gpt-4o-mini") == 2
    assert delta("gateway_ledger_rows_written_total") == 2
    assert delta("gateway_overhead_seconds_count", route=ROUTE) == 2
    assert delta("gateway_backend_call_seconds_count", backend="redis", operation="reserve") == 3
    assert delta("gateway_backend_call_seconds_count", backend="redis", operation="settle") == 2
    assert delta("gateway_backend_call_seconds_count", backend="database", operation="write_batch") >= 1
    assert value(after, "gateway_requests_in_flight") == 0
    assert value(after, "gateway_ledger_queue_depth") == 0


async def test_event_loop_tasks_return_to_their_count_after_traffic(
    start_gateway: StartGateway, pg: asyncpg.Connection
) -> None:
    gateway = await start_gateway()
    client = gateway.client()
    await client.chat.completions.create(model="gpt-4o-mini", messages=HI, max_tokens=2)
    await gateway.settle()
    before = value(await scrape(gateway.url), "gateway_event_loop_tasks")
    for _ in range(10):
        await client.chat.completions.create(model="gpt-4o-mini", messages=HI, max_tokens=2)
        stream = await client.chat.completions.create(
            model="gpt-4o-mini", messages=HI, max_tokens=2, stream=True
        )
        async for _chunk in stream:
            pass
    await gateway.settle()
    after = value(await scrape(gateway.url), "gateway_event_loop_tasks")
    # The scrape's own handler is one of them; a leak of one task per request shows as +20.
    assert before >= 2
    assert after == before


async def test_metric_labels_hold_no_keys_users_or_ids(
    start_gateway: StartGateway, pg: asyncpg.Connection
) -> None:
    gateway = await start_gateway()
    raw = await gateway.client().chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=HI, max_tokens=2
    )
    await gateway.settle()
    async with aiohttp.ClientSession() as session, session.get(f"{gateway.url}/metrics") as response:
        text = await response.text()
    for secret in ("alice", "research", "alice-key", "gw-test-key", raw.headers["x-request-id"]):
        assert secret not in text


async def test_time_to_first_token_is_measured_for_streams(
    start_gateway: StartGateway, pg: asyncpg.Connection
) -> None:
    gateway = await start_gateway()
    client = gateway.client()
    await client.chat.completions.create(model="gpt-4o-mini", messages=HI, max_tokens=2)
    stream = await client.chat.completions.create(model="gpt-4o-mini", messages=HI, max_tokens=2, stream=True)
    async for _ in stream:
        pass
    await gateway.settle()
    after = await scrape(gateway.url)
    assert value(after, "gateway_time_to_first_token_seconds_count", model="gpt-4o-mini") == 1


def test_every_metric_is_in_the_catalogue_and_back() -> None:
    import re
    from pathlib import Path

    from gateway.metrics import Metrics

    registered = {family.name for family in Metrics(team_labels=True).registry.collect()}
    catalogue = (Path(__file__).resolve().parents[1] / "docs" / "metrics.md").read_text()
    documented = set(re.findall(r"^\| `(gateway_[a-z_]+)`", catalogue, re.MULTILINE))
    # prometheus_client names counters without their _total suffix
    registered = {name if name in documented else f"{name}_total" for name in registered}
    assert registered == documented


async def test_two_workers_add_up_on_one_port(config_writer, pg: asyncpg.Connection) -> None:  # type: ignore[no-untyped-def]
    import signal

    from tests.conftest import USER_KEY, free_port
    from tests.processes import serve, wait_healthy

    config_writer.extra = "server: {workers: 2}\n"
    config_writer.write()
    port = free_port()
    process = serve(config_writer.directory, port)
    url = f"http://127.0.0.1:{port}"
    try:
        await wait_healthy(port, process)
        await asyncio.sleep(1.0)  # both workers up
        for _ in range(40):
            # A new connection each time, so the kernel spreads them over the workers.
            async with (
                aiohttp.ClientSession() as session,
                session.post(
                    f"{url}/v1/chat/completions",
                    headers={"Authorization": f"Bearer {USER_KEY}"},
                    json={"model": "gpt-4o-mini", "messages": HI, "max_tokens": 2},
                ) as response,
            ):
                assert response.status == 200
        await asyncio.sleep(0.5)
        totals = []
        for _ in range(6):  # each scrape may land on either worker: the sums must agree
            samples = await scrape(url)
            totals.append(
                (
                    value(samples, "gateway_requests_total", route=ROUTE, model="gpt-4o-mini", status="200"),
                    value(samples, "gateway_prompt_tokens_total", model="gpt-4o-mini"),
                    value(samples, "gateway_completion_tokens_total", model="gpt-4o-mini"),
                )
            )
        assert set(totals) == {(40.0, 320.0, 80.0)}
        # Added up from the workers' files: no `_created` series on this path either.
        assert [line for line in (await scrape_text(url)).splitlines() if "_created" in line] == []
        # Each worker spools into its own slot: both served some of the 40.
        per_slot = [
            sum(len(path.read_bytes().splitlines()) for path in slot.glob("segment-*.jsonl"))
            for slot in sorted((config_writer.directory / "var" / "spool").glob("slot-*"))
        ]
        assert len(per_slot) == 2 and sum(per_slot) == 40 and min(per_slot) > 0, per_slot
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
    assert process.returncode == 0


async def test_team_labels_only_when_opted_in(
    start_gateway: StartGateway, config_writer, pg: asyncpg.Connection
) -> None:  # type: ignore[no-untyped-def]
    gateway = await start_gateway()
    await gateway.client().chat.completions.create(model="gpt-4o-mini", messages=HI, max_tokens=2)
    await gateway.settle()
    assert "research" not in (await scrape_text(gateway.url))
    config_writer.extra = "metrics: {team_labels: true}\n"
    opted = await start_gateway()
    await opted.client().chat.completions.create(model="gpt-4o-mini", messages=HI, max_tokens=2)
    await opted.settle()
    samples = await scrape(opted.url)
    assert value(samples, "gateway_team_tokens_total", team="research", type="prompt") == 8
    assert value(samples, "gateway_team_tokens_total", team="research", type="completion") == 2


async def scrape_text(url: str) -> str:
    async with aiohttp.ClientSession() as session, session.get(f"{url}/metrics") as response:
        return await response.text()


async def test_requests_being_served_are_in_flight(
    start_gateway: StartGateway, fake_upstream: FakeUpstream, pg: asyncpg.Connection
) -> None:
    gateway = await start_gateway()
    client = gateway.client()
    fake_upstream.delay_seconds = 0.5
    waiting = [
        asyncio.ensure_future(client.chat.completions.create(model="gpt-4o-mini", messages=HI, max_tokens=2))
        for _ in range(3)
    ]
    await asyncio.sleep(0.25)
    during = value(await scrape(gateway.url), "gateway_requests_in_flight")
    await asyncio.gather(*waiting)
    await gateway.settle()
    # Scrapes and health checks are not API requests: only the three count.
    assert during == 3
    assert value(await scrape(gateway.url), "gateway_requests_in_flight") == 0


def test_tallied_metrics_read_as_prometheus_client_counts_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """One process tallies updates and hands them over when read: same figures, never twice."""
    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    from gateway.metrics import LATENCY_BUCKETS, MULTIPROCESS_ENV, Metrics

    monkeypatch.delenv(MULTIPROCESS_ENV, raising=False)
    metrics = Metrics()
    direct_registry = CollectorRegistry()
    direct = Histogram(
        "gateway_request_duration_seconds",
        "direct",
        ["route", "model"],
        buckets=LATENCY_BUCKETS,
        registry=direct_registry,
    )
    # Bounds themselves, just past them, zero and past the last bound.
    observed = [0.0, 0.005, 0.0050001, 0.3, 1, 1.0000001, 299.9, 300, 301, 1e9]
    for seconds in observed:
        metrics.request_duration.labels("r", "m").observe(seconds)
        direct.labels("r", "m").observe(seconds)
    metrics.requests.labels("r", "m", "200").inc()
    metrics.requests.labels("r", "m", "200").inc(2.5)
    metrics.in_flight.inc()
    metrics.in_flight.inc()
    metrics.in_flight.dec()

    def lines(text: bytes, prefix: str) -> list[str]:
        return [
            line for line in text.decode().splitlines() if line.startswith(prefix) and "_created" not in line
        ]

    first = metrics.exposition()
    expected = lines(generate_latest(direct_registry), "gateway_request_duration_seconds")
    assert len(expected) == len(LATENCY_BUCKETS) + 3  # the buckets, +Inf, count and sum
    assert lines(first, "gateway_request_duration_seconds") == expected
    assert 'gateway_requests_total{model="m",route="r",status="200"} 3.5' in lines(first, "gateway_requests")
    assert lines(first, "gateway_requests_in_flight ") == ["gateway_requests_in_flight 1.0"]
    # Read again with nothing new: nothing is handed over twice.
    assert lines(metrics.exposition(), "gateway_re") == lines(first, "gateway_re")
    metrics.in_flight.dec()
    assert lines(metrics.exposition(), "gateway_requests_in_flight ") == ["gateway_requests_in_flight 0.0"]


CREATED_PROBE = """
from gateway.metrics import Metrics
metrics = Metrics()
metrics.requests.labels("r", "m", "200").inc()
metrics.request_duration.labels("r", "m").observe(0.1)
metrics.ledger_rows.inc()
text = metrics.exposition().decode()
print(len(text.splitlines()), sum("_created" in line for line in text.splitlines()))
"""


def test_created_series_only_when_asked() -> None:
    """PROMETHEUS_DISABLE_CREATED_SERIES: unset, the gateway leaves `_created` out; false brings it back."""
    import os
    import subprocess
    import sys

    from gateway.metrics import CREATED_SERIES_ENV

    def probe(setting: str | None) -> tuple[int, int]:
        environment = {name: value for name, value in os.environ.items() if name != CREATED_SERIES_ENV}
        if setting is not None:
            environment[CREATED_SERIES_ENV] = setting
        # The flag is read when gateway.metrics is imported: a fresh process each time.
        run = subprocess.run(
            [sys.executable, "-c", CREATED_PROBE], env=environment, capture_output=True, text=True, check=True
        )
        lines, created = map(int, run.stdout.split())
        return lines, created

    default, asked, refused = probe(None), probe("false"), probe("true")
    assert default[1] == 0 and refused == default
    # Each unlabelled counter and each child used: a sample, plus a HELP and a TYPE line.
    assert asked[1] > 0
    assert asked[0] - default[0] == asked[1]
