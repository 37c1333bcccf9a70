"""Instructions per request of the gateway, counted by callgrind: a figure that holds still.

Run: ./scripts/bench instructions [--compare REV,...] [--mode plain|stream] [--size 200|8k]
     [--seconds S] [--smoke]

On shared machines a timed run drifts by tens of percent between rounds; the number
of instructions the gateway executes per request does not (two runs of one tree agree
within 0.5%). Each target, this tree and then each REV from a git worktree, runs alone
under `valgrind --tool=callgrind`, pinned to core 0, against the HTTP bench's canned
nginx upstream, real Redis and PostgreSQL, keys and policy. Instrumentation is
switched on after a warm-up; then, for one connection and for 32, the instructions
of the gateway process over a window of wrk load are divided by the chat requests the
gateway itself counted in that window (its /metrics, read outside the window).

Only the gateway process is counted: Redis, PostgreSQL and nginx are not in it.
Under valgrind the gateway runs some 50 times slower, so the others answer relatively
at once and a settlement may travel alone rather than with the next admission. The
figure compares trees; it is not a cost in time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.http import revisions, runner, workload, wrk
from bench.http.processes import Process, free_port, start, stop, wait_for_port
from bench.http.targets import POLICY, PROVIDER_KEY_ENV, gateway_config
from bench.http.upstream import nginx_binary, start_nginx

REPO = Path(__file__).resolve().parents[1]
CONNECTIONS = (1, 32)
CHAT_REQUESTS = re.compile(r'^gateway_requests_total\{[^}]*route="/v1/chat/completions"[^}]*\} (\S+)$', re.M)


@dataclass(frozen=True)
class Window:
    target: str
    connections: int
    requests: int
    instructions: int

    @property
    def per_request(self) -> float:
        return self.instructions / self.requests if self.requests else 0.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="./scripts/bench instructions", description=__doc__.splitlines()[0])
    parser.add_argument("--compare", metavar="REV[,REV...]", help="git revisions to count as well")
    parser.add_argument(
        "--mode", choices=("plain", "stream"), default="plain", help="one JSON answer, or Server-Sent Events"
    )
    parser.add_argument(
        "--size", choices=tuple(workload.PROMPT_SIZES), default="200", help="prompt tokens per request"
    )
    parser.add_argument("--seconds", type=int, help="seconds of load per window (default 25; smoke 2)")
    parser.add_argument("--smoke", action="store_true", help="short windows, one connection only")
    parser.add_argument("--output", type=Path, help="also write the figures as JSON here")
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    args = parser.parse_args(argv)
    args.seconds = args.seconds or (2 if args.smoke else 25)
    args.connections = CONNECTIONS[:1] if args.smoke else CONNECTIONS
    args.revisions = [revisions.resolve(REPO, given) for given in (args.compare or "").split(",") if given]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    for tool in ("valgrind", "callgrind_control", "wrk", "taskset"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is not installed (./scripts/bench installs it)")
    nginx_binary()
    runner._use_shared_tiktoken_cache()
    run_id = uuid.uuid4().hex[:8]
    folder = Path(tempfile.mkdtemp(prefix=f"gateway-instructions-{run_id}-"))
    server = os.environ.get("DATABASE_URL", runner.DEFAULT_DATABASE_SERVER)
    # One database per target: a gateway of an older schema refuses one a newer one migrated.
    databases: list[str] = []
    processes: list[Process] = []
    worktrees: list[Path] = []
    try:
        files = runner._write_load_files(folder, list(workload.scenarios((args.size,))))
        upstream_port = free_port()
        nginx = start_nginx(folder / "nginx", upstream_port, "1")
        processes.append(nginx)
        wait_for_port(nginx)
        windows: list[Window] = []
        for revision in [None, *args.revisions]:
            name = "gateway" if revision is None else revision.name
            env = {**os.environ, PROVIDER_KEY_ENV: "sk-bench-provider-key", "PYTHONMALLOC": "malloc"}
            if revision is not None:
                worktree = folder / revision.folder_name
                worktrees.append(worktree)
                revisions.add_worktree(REPO, folder, revision)
                env = revisions.environment(worktree, env)
            target_folder = folder / name.replace("@", "-")
            prefix = f"bench:{run_id}:{name}:"
            databases.append(f"gateway_bench_{run_id}_{len(databases)}")
            database_url = asyncio.run(runner._create_database(server, databases[-1]))
            gateway = _start(target_folder, env, upstream_port, args.redis_url, database_url, prefix)
            processes.append(gateway)
            try:
                windows += _count(name, gateway, target_folder, files, args)
            finally:
                stop(gateway, timeout=60)
        _print(windows)
        if args.output is not None:
            figures = [{**asdict(window), "per_request": window.per_request} for window in windows]
            args.output.write_text(json.dumps(figures, indent=1) + "\n")
        return 0
    finally:
        runner.stop_all(processes, worktrees)
        runner._delete_redis_keys(args.redis_url, f"bench:{run_id}:")
        for database in databases:
            asyncio.run(runner._drop_database(server, database))
        shutil.rmtree(folder, ignore_errors=True)


def _start(
    folder: Path, env: dict[str, str], upstream_port: int, redis_url: str, database_url: str, prefix: str
) -> Process:
    folder.mkdir(parents=True)
    (folder / "policies").mkdir()
    (folder / "policies" / "bench.yaml").write_text(POLICY)
    port = free_port()
    config = folder / "gateway.yaml"
    config.write_text(gateway_config(port, 1, upstream_port, redis_url, database_url, prefix))
    valgrind = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={folder}/cg.out"]
    command = [
        *valgrind,
        sys.executable,
        "-m",
        "gateway",
        "serve",
        "--config",
        str(config),
        "--port",
        str(port),
    ]
    process = start("gateway", command, cwd=folder, log=folder / "gateway.log", port=port, cpus="0", env=env)
    # Under valgrind start-up takes a minute or more: loading the tokenizers alone is slow.
    deadline = time.monotonic() + 600
    while _chat_requests(process) is None:
        if process.popen.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the gateway did not start under valgrind; see {process.log}")
        time.sleep(1)
    return process


def _count(
    name: str, gateway: Process, folder: Path, files: dict[str, Path], args: argparse.Namespace
) -> list[Window]:
    url = f"http://127.0.0.1:{gateway.port}"
    path = "/v1/chat/completions"

    def load(connections: int, seconds: int) -> None:
        # The body sent; the connections are set per window.
        body = files[workload.Scenario(args.mode, args.size, 1).name]
        wrk.run(url, path, body, files["keys"], connections=connections, seconds=seconds, cpus="1")

    load(1, args.seconds)  # warm-up, not counted: first requests fill caches
    _callgrind(gateway, "-i", "on")
    windows: list[Window] = []
    for connections in args.connections:
        before = _chat_requests(gateway) or 0
        _callgrind(gateway, "-z")
        load(connections, args.seconds)
        time.sleep(1)  # requests still in flight when wrk stopped end (as 499s) inside the window
        dumped = set(folder.glob("cg.out*"))
        _callgrind(gateway, "-d")
        instructions = _dumped_instructions(folder, dumped)
        requests = (_chat_requests(gateway) or 0) - before
        windows.append(Window(name, connections, requests, instructions))
    return windows


def _callgrind(gateway: Process, *options: str) -> None:
    subprocess.run(
        ["callgrind_control", *options, str(gateway.pid)], capture_output=True, check=True, timeout=120
    )


def _dumped_instructions(folder: Path, before: set[Path]) -> int:
    """The `totals:` of the dump callgrind_control just asked for (it writes a new file)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for dump in set(folder.glob("cg.out*")) - before:
            totals = re.search(r"^totals: (\d+)", dump.read_text(errors="replace"), re.M)
            if totals:
                return int(totals.group(1))
        time.sleep(0.5)
    raise RuntimeError(f"callgrind wrote no dump in {folder}")


def _chat_requests(gateway: Process) -> int | None:
    """Chat requests the gateway answered so far, by its own count; None until it answers."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{gateway.port}/metrics", timeout=30) as response:
            text = response.read().decode()
    except (urllib.error.URLError, OSError):
        return None
    return round(sum(float(value) for value in CHAT_REQUESTS.findall(text)))


def _print(windows: list[Window]) -> None:
    first = {window.connections: window.per_request for window in windows if window.target == "gateway"}
    print(
        f"{'target':<22} {'connections':>11} {'requests':>9} {'instructions/request':>21} {'vs gateway':>10}"
    )
    for window in windows:
        ratio = window.per_request / first[window.connections] if first.get(window.connections) else 0.0
        print(
            f"{window.target:<22} {window.connections:>11} {window.requests:>9,} "
            f"{window.per_request:>21,.0f} {ratio:>10.3f}"
        )


if __name__ == "__main__":
    sys.exit(main())
