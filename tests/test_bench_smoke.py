"""The HTTP benchmark's smoke mode runs end to end: every target and scenario serves 2xx only.

A gateway that rejected the bench keys, failed to reach the canned upstream or broke
under load would show here as non-2xx responses or runs without requests. Needs wrk
and nginx (scripts/test installs them), Redis and PostgreSQL.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TARGETS = {"floor", "gateway", "gateway-w2"}
SCENARIOS = {"plain-200-c1", "plain-200-c32", "stream-200-c1", "stream-200-c32"}
RUN_FIELDS = {
    "round",
    "target",
    "scenario",
    "requests",
    "requests_per_second",
    "latency_ms",
    "non_2xx",
    "socket_errors",
    "cpu_seconds",
    "cpu_us_per_request",
    "rss_peak_mb",
}


def test_smoke_run_covers_every_target_and_scenario(
    tmp_path: Path, redis_url: str, database_url: str
) -> None:
    _require("wrk", "nginx", "taskset")
    output = tmp_path / "smoke.json"
    command = [sys.executable, "-m", "bench.http", "--smoke", "--output", str(output)]
    _run_smoke([*command, "--redis-url", redis_url, "--database-url", database_url], timeout=120)

    result = json.loads(output.read_text())
    assert result["mode"] == "smoke"
    assert {"nproc", "python"} <= result["machine"].keys()
    assert result["date"]
    assert {target["name"] for target in result["targets"]} == TARGETS
    assert {scenario["name"] for scenario in result["scenarios"]} == SCENARIOS
    ran = {(run["target"], run["scenario"]) for run in result["runs"]}
    assert ran == {(target, scenario) for target in TARGETS for scenario in SCENARIOS}
    for run in result["runs"]:
        where = f"{run['target']} {run['scenario']}"
        assert RUN_FIELDS <= run.keys(), where
        assert run["requests"] > 0, where
        assert run["non_2xx"] == 0, where
        assert run["cpu_us_per_request"] > 0, where
        assert run["rss_peak_mb"]["max"] > 0, where
        assert {"p50", "p75", "p90", "p99"} <= run["latency_ms"].keys(), where
    for row in result["summary"]:
        assert {"requests_per_second", "p50_ms", "p90_ms", "p99_ms", "cpu_us_per_request"} <= row.keys()
        assert row["vs_floor"].keys() == {
            "throughput_ratio",
            "cpu_ratio",
            "p50_added_ms",
            "p50_added_ratio",
            "p99_ratio",
        }
    assert {check["name"] for check in result["verdict"]} == {
        "throughput",
        "cpu",
        "p50",
        "p99",
        "stream",
        "others",
        "rss",
        "workers",
    }
    assert result["ledger"]["rows_written"] > 0
    # Clients leaving when wrk stops were once logged as 500s; nothing may be.
    for name, logs in result["gateway_logs"].items():
        assert "500" not in logs["chat_completions_by_status"], (name, logs)
        assert logs["levels"].get("error", 0) == 0, (name, logs)


def test_compare_adds_one_target_per_revision_next_to_the_gateway() -> None:
    from bench.http.runner import parse_args

    head = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    args = parse_args(["--smoke", "--compare", f"HEAD,{head}"])
    assert args.targets == ("floor", "gateway", "gateway@HEAD", f"gateway@{head[:7]}", "gateway-w2")
    assert {name: revision.sha for name, revision in args.revisions.items()} == {
        "gateway@HEAD": head,
        f"gateway@{head[:7]}": head,
    }
    # --targets takes the names too; --compare adds to what --targets chose.
    args = parse_args(["--targets", "gateway@HEAD,floor", "--compare", head])
    assert args.targets == ("gateway@HEAD", f"gateway@{head[:7]}", "floor")
    with pytest.raises(SystemExit):
        parse_args(["--compare", "no-such-revision"])


def measured(target: str, scenario: str, rps: float, cpu: float, number: int = 1) -> dict[str, object]:
    """One run as the harness records it, with made-up figures."""
    return {
        "target": target,
        "scenario": scenario,
        "round": number,
        "requests_per_second": rps,
        "latency_ms": {"p50": 1.0, "p90": 2.0, "p99": 3.0},
        "cpu_us_per_request": cpu,
        "rss_peak_mb": {"max": 50.0, "sum": 50.0},
        "processes": 1,
        "requests": 100,
        "non_2xx": 0,
        "socket_errors": {"connect": 0},
    }


def test_gateway_over_each_revision_in_the_summary_and_the_table() -> None:
    from bench.http import report

    def run(target: str, rps: float, cpu: float) -> dict[str, object]:
        return measured(target, "plain-200-c1", rps, cpu)

    runs = [run("floor", 1000, 100), run("gateway", 500, 200), run("gateway@abc1234", 250, 500)]
    summary = report.summarize(runs, ["floor", "gateway", "gateway@abc1234"], ["plain-200-c1"])
    rows = {row["target"]: row for row in summary}
    assert rows["gateway"]["gateway_vs_revision"] is None
    assert rows["gateway@abc1234"]["gateway_vs_revision"] == {"throughput_ratio": 2.0, "cpu_ratio": 0.4}
    assert rows["gateway@abc1234"]["vs_floor"]["throughput_ratio"] == 0.25
    lines = report.table(summary).splitlines()
    assert "gw/rev req/s" in lines[0]
    assert lines[-1].startswith("gateway@abc1234 ") and lines[-1].split()[-2:] == ["2.00", "0.40"]


def test_ratios_are_paired_by_round() -> None:
    """Drift between rounds must cancel: each round's ratio first, then their median."""
    from bench.http import report

    def run(target: str, number: int, rps: float) -> dict[str, object]:
        return measured(target, "plain-200-c32", rps, 1e6 / rps, number)

    floor = [run("floor", n, rps) for n, rps in ((1, 1000), (2, 2000), (3, 3000))]
    gateway = [run("gateway", n, rps) for n, rps in ((1, 500), (2, 1000), (3, 600))]
    workers = [run("gateway-w2", n, rps) for n, rps in ((1, 800), (2, 1700), (3, 1500))]
    summary = report.summarize(
        floor + gateway + workers, ["floor", "gateway", "gateway-w2"], ["plain-200-c32"]
    )
    rows = {row["target"]: row for row in summary}
    # Round by round 0.5, 0.5 and 0.2: the median is 0.5 (medians alone would say 600/2000 = 0.3).
    assert rows["gateway"]["vs_floor"]["throughput_ratio"] == 0.5
    assert rows["gateway"]["vs_floor"]["cpu_ratio"] == 2.0
    # Two workers over one, round by round 1.6, 1.7 and 2.5.
    assert rows["gateway-w2"]["workers_scaling"] == 1.7


def test_latency_added_is_judged_against_the_floors_p50() -> None:
    """+0.5 ms where the floor's p50 was 0.22 ms: the added time may be 2.27x the floor's p50."""
    from bench.http import report

    def run(target: str, scenario: str, p50: float) -> dict[str, object]:
        return {**measured(target, scenario, 1000, 100), "latency_ms": {"p50": p50, "p90": 9.0, "p99": 9.0}}

    def verdict(floor_p50: float, gateway_p50: float) -> tuple[bool | None, list[str]]:
        runs = [
            run(target, scenario, p50)
            for scenario in ("plain-200-c1", "stream-200-c1")
            for target, p50 in (("floor", floor_p50), ("gateway", gateway_p50))
        ]
        scenarios = ["plain-200-c1", "stream-200-c1"]
        checks = {c.name: c for c in report.verdict(report.summarize(runs, ["floor", "gateway"], scenarios))}
        assert checks["p50"].passed == checks["stream"].passed
        return checks["p50"].passed, checks["p50"].details

    # A slow hour: the floor at 0.71 ms, +0.98 ms is 1.38x of it.
    assert verdict(0.71, 1.69) == (True, ["plain-200-c1 +0.98 ms = 1.38x the floor's p50"])
    # The machine: +0.55 ms over 0.22 is 2.50x, past the target.
    assert verdict(0.22, 0.77) == (False, ["plain-200-c1 +0.55 ms = 2.50x the floor's p50 ✗"])
    assert verdict(0.22, 0.72)[0] is True


def test_instruction_count_smoke_run(tmp_path: Path, redis_url: str) -> None:
    """./scripts/bench instructions --smoke: the gateway under callgrind counts a positive,
    plausible number of instructions for each chat request it answered."""
    _require("valgrind", "wrk", "nginx", "taskset")
    output = tmp_path / "instructions.json"
    command = [sys.executable, "-m", "bench.instructions", "--smoke", "--output", str(output)]
    _run_smoke([*command, "--redis-url", redis_url], timeout=300)
    (window,) = json.loads(output.read_text())
    assert (window["target"], window["connections"]) == ("gateway", 1)
    assert window["requests"] > 0
    # A request costs the gateway about two million instructions; far off means a broken count.
    assert 200_000 < window["per_request"] < 50_000_000, window


CONSOLE_PAGES = {
    "overview (today)",
    "overview (this month)",
    "usage by user (month)",
    "usage by key (90 days)",
    "usage by day (90 days)",
    "usage by model, one user",
    "usage.csv by key (90 days)",
    "keys",
    "quotas",
    "policies",
    "health",
}


def test_console_benchmark_smoke_run(tmp_path: Path, redis_url: str, database_url: str) -> None:
    """./scripts/bench console --smoke: a 2,000-row ledger whose rollups add up to its events,
    and every console page answered 200 through a real gateway, each timed 3 times."""
    from tests.conftest import REDIS_KEY_PREFIX

    output = tmp_path / "console.json"
    command = [sys.executable, "-m", "bench.console", "--smoke", "--output", str(output)]
    command += ["--redis-url", redis_url, "--database-url", database_url]
    _run_smoke([*command, "--redis-key-prefix", f"{REDIS_KEY_PREFIX}bench-console:"], timeout=120)

    result = json.loads(output.read_text())
    ledger = result["ledger"]
    assert (ledger["rows"], ledger["request_ids"], ledger["rollup_requests"]) == (2_000, 2_000, 2_000)
    assert ledger["keys"] == 200
    assert ledger["rollup_tokens"] == ledger["event_tokens"]
    assert ledger["event_tokens"][0] > 0 and ledger["event_tokens"][1] > 0
    assert 0 < ledger["rollup_rows"] <= 2_000
    assert {page["name"] for page in result["pages"]} == CONSOLE_PAGES
    for timing in result["pages"] + result["month_end"]:
        assert timing["requests"] == 3, timing
        assert 0 < timing["median_ms"] <= timing["p95_ms"] <= timing["max_ms"], timing
    for page in result["pages"]:
        assert page["bytes"] > 0, page
    assert result["gateway_errors"] == []


def _require(*tools: str) -> None:
    for tool in tools:
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            pytest.fail(f"{tool} is missing; run the tests with scripts/test, which installs it")


def _run_smoke(command: list[str], timeout: float) -> None:
    """Run a harness to its end; fail with its output if it fails or takes too long."""
    # SIGTERM on a timeout, never SIGKILL: the harness then stops every server it started.
    process = subprocess.Popen(
        command, cwd=REPO, env=os.environ.copy(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.terminate()
        stdout, stderr = process.communicate(timeout=90)
        pytest.fail(f"the smoke run took over {timeout:.0f} s:\n{stdout[-3000:]}{stderr[-3000:]}")
    assert process.returncode == 0, stdout[-3000:] + stderr[-3000:]
