"""The run: start every server once, warm each up, then interleave the measurements.

Run: ./scripts/bench http [--smoke] [--compare REV,...] [--duration S] [--rounds N] [--output FILE] ...
Layout on the machine's cores (2 on the reference machine): the server under test
on core 0, wrk and nginx on core 1; the two-worker gateway unpinned. Each round runs
every scenario against every target in turn, so drift (thermal, other load) hits all
alike; the report takes the median of the rounds. CPU and peak RSS come from /proc
(a supervisor and its workers added up). Everything started here is stopped at the
end, whatever happens, and the temp folder, database and Redis keys are removed.
With --compare, each revision is one more target, gateway@REV, run like `gateway`
from a git worktree of that revision (see revisions.py); the worktrees go at the end too.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import redis

from bench.http import report, revisions, workload, wrk
from bench.http.processes import (
    CLOCK_TICKS,
    Process,
    cpu_seconds,
    free_port,
    peak_rss_kb,
    reset_peak_rss,
    stop,
    wait_for_port,
)
from bench.http.revisions import Revision, StartError
from bench.http.targets import Target, start_floor, start_gateway
from bench.http.upstream import nginx_binary, start_nginx
from bench.http.workload import Scenario

REPO = Path(__file__).resolve().parents[2]
LATEST = REPO / "bench" / "results" / "latest.json"
ALL_TARGETS = (report.FLOOR, report.GATEWAY, report.GATEWAY_WORKERS)
DEFAULT_DATABASE_SERVER = "postgresql://postgres@127.0.0.1:5432/postgres"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="./scripts/bench http", description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="1 round of 1 s runs, 200-token prompts only")
    parser.add_argument("--duration", type=int, help="seconds per measured run (default 5; smoke 1)")
    parser.add_argument("--rounds", type=int, help="rounds over every target x scenario (default 3; smoke 1)")
    parser.add_argument("--warmup", type=int, default=1, help="seconds of warm-up per target and prompt kind")
    parser.add_argument(
        "--sizes", help=f"prompt sizes, comma-separated, of {','.join(workload.PROMPT_SIZES)}"
    )
    parser.add_argument(
        "--targets",
        help=f"comma-separated subset of {','.join(ALL_TARGETS)} (default: all), and gateway@REV names",
    )
    parser.add_argument(
        "--compare",
        metavar="REV[,REV...]",
        help="git revisions to measure too: one target gateway@REV each, the gateway as of REV",
    )
    parser.add_argument(
        "--output", type=Path, help="the JSON report (default bench/results/latest.json; smoke: a temp file)"
    )
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    parser.add_argument(
        "--database-url",
        help="a database to use as is (default: a throwaway one on $DATABASE_URL's server, dropped after)",
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the temp folder (configs, logs) and the database"
    )
    parser.add_argument(
        "--report",
        type=Path,
        metavar="JSON",
        help="measure nothing: derive the table, ratios and verdict again from a saved report's runs",
    )
    args = parser.parse_args(argv)
    args.duration = args.duration or (1 if args.smoke else 5)
    args.rounds = args.rounds or (1 if args.smoke else 3)
    args.sizes = tuple((args.sizes or ("200" if args.smoke else ",".join(workload.PROMPT_SIZES))).split(","))
    for size in args.sizes:
        if size not in workload.PROMPT_SIZES:
            parser.error(f"--sizes: unknown size {size!r}")
    args.targets, args.revisions = _targets(parser, args.targets, args.compare)
    if args.output is None:
        args.output = Path(tempfile.gettempdir()) / "gateway-bench-smoke.json" if args.smoke else LATEST
    return args


def _targets(
    parser: argparse.ArgumentParser, targets: str | None, compare: str | None
) -> tuple[tuple[str, ...], dict[str, Revision]]:
    """The target names in run order, and the revision of each gateway@REV among them.

    `--compare` adds its revisions after the gateway (and any gateway@REV named in
    `--targets`), so the table shows them next to it.
    """
    names: list[str] = []
    found: dict[str, Revision] = {}

    def revision(given: str, option: str) -> str:
        try:
            resolved = revisions.resolve(REPO, given)
        except ValueError as exc:
            parser.error(f"{option}: {exc}")
        found.setdefault(resolved.name, resolved)
        return resolved.name

    for name in (targets or ",".join(ALL_TARGETS)).split(","):
        if name.startswith(revisions.PREFIX):
            name = revision(name.removeprefix(revisions.PREFIX), "--targets")
        elif name not in ALL_TARGETS:
            parser.error(f"--targets: unknown target {name!r}")
        if name not in names:
            names.append(name)
    added = [revision(given, "--compare") for given in (compare or "").split(",") if given]
    added = list(dict.fromkeys(name for name in added if name not in names))
    gateways = [i for i, name in enumerate(names) if name == report.GATEWAY or name in found]
    at = gateways[-1] + 1 if gateways else len(names)
    names[at:at] = added
    return tuple(names), found


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report is not None:
        return _report_again(args.report)
    # SIGTERM (a timeout, a CI cancel) unwinds like Ctrl-C, so the cleanup below runs.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    _use_shared_tiktoken_cache()
    for tool in ("wrk", "taskset"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is not installed (./scripts/bench installs it)")
    nginx_binary()
    run_id = uuid.uuid4().hex[:8]
    folder = Path(tempfile.mkdtemp(prefix=f"gateway-bench-{run_id}-"))
    key_prefix = f"bench:{run_id}:"
    processes: list[Process] = []
    worktrees: list[Path] = []
    created_database = None
    # Databases of their own for gateways of other revisions: one of an older schema
    # refuses a database a newer gateway has migrated.
    revision_databases: list[str] = []
    server = os.environ.get("DATABASE_URL", DEFAULT_DATABASE_SERVER)
    try:
        database_url = args.database_url
        if database_url is None:
            created_database = f"gateway_bench_{run_id}"
            database_url = asyncio.run(_create_database(server, created_database))
        try:
            result = _run(args, folder, processes, worktrees, database_url, key_prefix, revision_databases)
        except StartError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
        print(f"\nwrote {args.output}")
        return 0
    finally:
        stop_all(processes, worktrees)
        _delete_redis_keys(args.redis_url, key_prefix)
        if args.keep:
            print(f"kept {folder}" + (f" and database {created_database}" if created_database else ""))
        else:
            for name in [created_database, *revision_databases]:
                if name is not None:
                    asyncio.run(_drop_database(server, name))
            shutil.rmtree(folder, ignore_errors=True)


def _run(
    args: argparse.Namespace,
    folder: Path,
    processes: list[Process],
    worktrees: list[Path],
    database_url: str,
    key_prefix: str,
    revision_databases: list[str],
) -> dict[str, Any]:
    """revision_databases: filled with the names of the databases made for gateway@REV targets."""
    pinned = (os.cpu_count() or 1) >= 2
    server_cpus, load_cpus = ("0", "1") if pinned else (None, None)
    chosen = [s for s in workload.scenarios(args.sizes)]
    files = _write_load_files(folder, chosen)
    ledger_before = asyncio.run(_ledger_rows(database_url))
    database_urls = [database_url]
    started_at = datetime.now(UTC)
    load_start = os.getloadavg()

    upstream_port = free_port()
    nginx = start_nginx(folder / "nginx", upstream_port, load_cpus)
    processes.append(nginx)
    wait_for_port(nginx)
    targets: list[Target] = []
    for name in args.targets:
        if name == report.FLOOR:
            target = start_floor(folder, upstream_port, server_cpus)
        else:
            workers = 2 if name == report.GATEWAY_WORKERS else 1
            revision = args.revisions.get(name)
            worktree = None
            target_database = database_url
            if revision is not None:
                worktree = folder / revision.folder_name
                worktrees.append(worktree)  # before it exists: a half-made one is removed too
                revisions.add_worktree(REPO, folder, revision)
                revision_databases.append(f"{database_url.rpartition('/')[2]}_{len(revision_databases) + 1}")
                target_database = asyncio.run(_create_database(database_url, revision_databases[-1]))
                database_urls.append(target_database)
            target = start_gateway(
                name,
                folder / name,
                workers=workers,
                upstream_port=upstream_port,
                redis_url=args.redis_url,
                database_url=target_database,
                key_prefix=f"{key_prefix}{name}:",
                cpus=server_cpus if workers == 1 else None,
                revision=revision,
                worktree=worktree,
            )
        processes.append(target.process)
        targets.append(target)
    print(
        f"{len(targets)} targets x {len(chosen)} scenarios x {args.rounds} rounds x {args.duration} s; "
        f"server on core {server_cpus}, wrk and nginx on core {load_cpus}"
        if pinned
        else "one core: nothing pinned",
        flush=True,
    )
    for target in targets:
        print(f"  {target.name}: {target.description}", flush=True)
        for scenario in chosen:
            if scenario.connections == max(workload.CONNECTIONS):
                _load(target, scenario, files, args.warmup, load_cpus)
        # Peak RSS counts from here: loading tokenizers at start-up peaks briefly
        # above what the process then holds, and that transient is not the figure.
        reset_peak_rss(target.process.tree())

    width = max(len(target.name) for target in targets)
    runs: list[dict[str, Any]] = []
    for round_number in range(1, args.rounds + 1):
        for scenario in chosen:
            for target in targets:
                run = _measure(target, scenario, files, args.duration, load_cpus, nginx)
                run["round"] = round_number
                runs.append(run)
                print(
                    f"round {round_number}/{args.rounds}  {scenario.name:<15} {target.name:<{width}} "
                    f"{run['requests_per_second']:>8.0f} req/s  p50 {run['latency_ms']['p50']:.2f} ms  "
                    f"p99 {run['latency_ms']['p99']:.2f} ms  {run['cpu_us_per_request']:.0f} CPU-µs/req  "
                    f"non-2xx {run['non_2xx']}  other load {run['other_cpu_fraction'] * 100:.0f}%",
                    flush=True,
                )

    # Stopped before the logs and the ledger are read: the gateways flush both on SIGTERM.
    for target in targets:
        if target.is_gateway:
            stop(target.process)
    gateway_logs = {t.name: _log_summary(t.process.log) for t in targets if t.is_gateway}
    ledger_rows = sum(asyncio.run(_ledger_rows(url)) for url in database_urls) - ledger_before
    logged = sum(
        count for logs in gateway_logs.values() for count in logs["chat_completions_by_status"].values()
    )

    summary = report.summarize(runs, [t.name for t in targets], [s.name for s in chosen])
    checks = report.verdict(summary)
    print()
    print(report.table(summary))
    print(
        "\nmedians over rounds; ratios against the floor in the same run; RSS is the peak "
        "(VmHWM, reset after warm-up) of the largest process, 'max/sum' for a supervisor and its workers"
        + (
            "; gw/rev: the gateway of this tree over gateway@REV in the same run "
            "(req/s above 1 and CPU below 1: this tree is faster)"
            if args.revisions
            else ""
        )
    )
    print(f"\nverdict ({'smoke run: too short to judge' if args.smoke else 'issue 7 targets'}):")
    print(report.verdict_text(checks))
    print(f"\nledger rows written: {ledger_rows:,}; chat requests in the gateways' request logs: {logged:,}")
    for name, logs in gateway_logs.items():
        print(f"{name} log: statuses {logs['chat_completions_by_status']}, levels {logs['levels']}")
        for message, count in logs["warnings_and_errors"]:
            print(f"    {count}x {message}")

    return {
        "mode": "smoke" if args.smoke else "full",
        "date": started_at.isoformat(timespec="seconds"),
        "machine": _machine(load_start),
        "settings": {
            "duration_seconds": args.duration,
            "rounds": args.rounds,
            "warmup_seconds_per_kind": args.warmup,
            "prompt_tokens": {size: workload.PROMPT_SIZES[size] for size in args.sizes},
            "max_tokens": workload.MAX_TOKENS,
            "completion_tokens": workload.usage("200")["completion_tokens"],
            "keys": workload.KEY_COUNT,
            "wrk_threads": 1,
            "server_cpus": server_cpus,
            "load_cpus": load_cpus,
            "tokenizer": workload.ENCODING,
            "upstream_model": workload.UPSTREAM_MODEL,
        },
        "targets": [
            {
                "name": t.name,
                "description": t.description,
                "cpus": t.cpus,
                **({"revision": t.revision.given, "commit": t.revision.sha} if t.revision else {}),
            }
            for t in targets
        ],
        "scenarios": [
            {"name": s.name, "mode": s.mode, "prompt": s.size, "connections": s.connections} for s in chosen
        ],
        "runs": runs,
        "summary": summary,
        "verdict": [check.as_json() for check in checks],
        "gateway_logs": gateway_logs,
        "ledger": {"rows_written": ledger_rows, "chat_requests_logged": logged},
    }


def stop_all(processes: list[Process], worktrees: list[Path]) -> None:
    """Every server started, last first, then every worktree made."""
    for process in reversed(processes):
        stop(process)
    for worktree in worktrees:
        revisions.remove_worktree(REPO, worktree)


def _report_again(path: Path) -> int:
    """Summary and verdict of a saved report recomputed from its raw runs (and saved back)."""
    result = json.loads(path.read_text())
    targets = [target["name"] for target in result["targets"]]
    scenarios = [scenario["name"] for scenario in result["scenarios"]]
    result["summary"] = report.summarize(result["runs"], targets, scenarios)
    checks = report.verdict(result["summary"])
    result["verdict"] = [check.as_json() for check in checks]
    path.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    print(report.table(result["summary"]))
    print(
        f"\nverdict ({'smoke run: too short to judge' if result['mode'] == 'smoke' else 'issue 7 targets'}):"
    )
    print(report.verdict_text(checks))
    print(f"\nrewrote {path}")
    return 0


def _write_load_files(folder: Path, chosen: list[Scenario]) -> dict[str, Path]:
    files = {"keys": folder / "keys.txt"}
    files["keys"].write_text("".join(f"{key.key}\n" for key in workload.bench_keys()))
    for scenario in chosen:
        files[scenario.name] = folder / f"{scenario.name}.json"
        files[scenario.name].write_bytes(workload.request_body(scenario))
    return files


def _load(
    target: Target, scenario: Scenario, files: dict[str, Path], seconds: int, cpus: str | None
) -> wrk.WrkResult:
    result, _ = wrk.run(
        target.url,
        target.path(scenario),
        files[scenario.name],
        files["keys"],
        connections=scenario.connections,
        seconds=seconds,
        cpus=cpus,
    )
    return result


def _measure(
    target: Target, scenario: Scenario, files: dict[str, Path], seconds: int, cpus: str | None, nginx: Process
) -> dict[str, Any]:
    """One wrk run against one target, with the target's CPU time and peak RSS from /proc.

    Also the CPU of everything else on the machine (Redis and PostgreSQL included), so
    that a run disturbed by other load can be told apart.
    """
    cpu_before = cpu_seconds(target.process.tree())
    nginx_before = sum(cpu_seconds(nginx.tree()).values())
    wrk_before = _children_cpu_seconds()
    busy_before = _machine_ticks()
    result = _load(target, scenario, files, seconds, cpus)
    busy_after = _machine_ticks()
    wrk_used = _children_cpu_seconds() - wrk_before
    nginx_used = sum(cpu_seconds(nginx.tree()).values()) - nginx_before
    pids = target.process.tree()
    if target.process.popen.poll() is not None:
        raise RuntimeError(f"{target.name} exited during {scenario.name}; see {target.process.log}")
    cpu_after = cpu_seconds(pids)
    # A process that is new since the start (a restarted worker) counts from its own start.
    used = sum(after - cpu_before.get(pid, 0.0) for pid, after in cpu_after.items())
    peaks = peak_rss_kb(pids)
    busy_seconds = (busy_after[0] - busy_before[0]) / CLOCK_TICKS
    capacity = (busy_after[1] - busy_before[1]) / CLOCK_TICKS
    other = max(0.0, busy_seconds - used - wrk_used - nginx_used)
    return {
        "target": target.name,
        "scenario": scenario.name,
        **result.as_json(),
        "cpu_seconds": round(used, 3),
        "cpu_us_per_request": used / result.requests * 1e6 if result.requests else 0.0,
        "rss_peak_mb": {"max": max(peaks.values()) / 1024, "sum": sum(peaks.values()) / 1024},
        "processes": len(pids),
        "process_set_changed": sorted(cpu_before) != sorted(cpu_after),
        "wrk_cpu_seconds": round(wrk_used, 3),
        "nginx_cpu_seconds": round(nginx_used, 3),
        "machine_busy": round(busy_seconds / capacity, 3) if capacity else 0.0,
        # Share of all cores used by neither the target, wrk nor nginx during the run.
        "other_cpu_fraction": round(other / capacity, 3) if capacity else 0.0,
    }


def _children_cpu_seconds() -> float:
    """CPU of this process's reaped children: wrk's, around one wrk run."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _machine_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of all cores, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def _log_summary(path: Path) -> dict[str, Any]:
    """Request statuses, log levels and the most frequent warnings and errors of a gateway's log."""
    statuses: Counter[str] = Counter()
    levels: Counter[str] = Counter()
    messages: Counter[str] = Counter()
    for line in path.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            levels["not json"] += 1
            messages[line[:160]] += 1
            continue
        levels[entry.get("level", "?")] += 1
        if entry.get("logger") == "gateway.request":
            if "chat/completions" in str(entry.get("route")):
                statuses[str(entry.get("status"))] += 1
        elif entry.get("level") in ("warning", "error", "critical"):
            messages[str(entry.get("message"))[:160]] += 1
    return {
        "chat_completions_by_status": dict(statuses),
        "levels": dict(levels),
        "warnings_and_errors": messages.most_common(10),
    }


def _machine(load_start: tuple[float, float, float]) -> dict[str, Any]:
    cpu_model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu_model,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "loadavg_start": load_start,
        "loadavg_end": os.getloadavg(),
        "nginx": _version([nginx_binary(), "-v"]),
        "wrk": _version(["wrk", "--version"]),
        "git": _version(["git", "-C", str(REPO), "describe", "--always", "--dirty"]),
    }


def _version(command: list[str]) -> str:
    try:
        finished = subprocess.run(command, capture_output=True, text=True, timeout=10)
    except OSError:
        return "?"
    return (
        (finished.stdout or finished.stderr).strip().splitlines()[0]
        if (finished.stdout or finished.stderr)
        else "?"
    )


def _use_shared_tiktoken_cache() -> None:
    """Tokenizer files come from the shared cache, never from the network."""
    shared = REPO.parent / "shared" / "tiktoken-cache"
    if "TIKTOKEN_CACHE_DIR" not in os.environ and shared.is_dir():
        os.environ["TIKTOKEN_CACHE_DIR"] = str(shared)


async def _create_database(server_url: str, name: str) -> str:
    await _execute(server_url, f'CREATE DATABASE "{name}"')
    base, _, _ = server_url.rpartition("/")
    return f"{base}/{name}"


async def _drop_database(server_url: str, name: str) -> None:
    await _execute(server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def _execute(server_url: str, statement: str) -> None:
    connection = await asyncpg.connect(server_url, timeout=5)
    try:
        await connection.execute(statement)
    finally:
        await connection.close()


async def _ledger_rows(database_url: str) -> int:
    """Ledger rows of bench keys (the database may be shared with other tests)."""
    connection = await asyncpg.connect(database_url, timeout=5)
    try:
        if await connection.fetchval("SELECT to_regclass('usage_events')") is None:
            return 0
        return int(
            await connection.fetchval("SELECT count(*) FROM usage_events WHERE key_id LIKE 'bench-key-%'")
        )
    finally:
        await connection.close()


def _delete_redis_keys(url: str, prefix: str) -> None:
    client = redis.Redis.from_url(url, socket_connect_timeout=3)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
    except redis.RedisError as exc:
        print(f"could not delete the Redis keys {prefix}*: {exc}", file=sys.stderr)
    finally:
        client.close()
