"""The servers under test: the floor proxy and the gateway (one worker, or two; or other revisions).

The gateway runs as in production: real Redis (a key prefix of its own per run), the
PostgreSQL ledger, request logs to a file, metrics (team labels too), prices so cost
is accounted, and a policy whose every limit applies to every request but none is
ever reached.
"""

from __future__ import annotations

import json
import os
import sys
import textwrap
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from bench.http import revisions, workload
from bench.http.processes import Process, free_port, start, wait_for_port
from bench.http.revisions import Revision, StartError
from bench.http.workload import Scenario

PROVIDER_KEY_ENV = "BENCH_PROVIDER_KEY"

# Every limit applies to every bench request; none comes within orders of magnitude.
POLICY = """\
policies:
  - name: bench-per-user
    scope: user
    limits:
      - {requests: 100000000, per: minute}
      - {tokens: 1000000000000, per: minute}
  - name: bench-per-team
    scope: team
    limits:
      - {tokens: 1000000000000000, per: day}
      - {cost_usd: 1000000000, per: month}
  - name: bench-per-key
    scope: key
    limits:
      - {concurrent: 100000}
"""


@dataclass
class Target:
    name: str
    description: str
    process: Process
    cpus: str | None  # the cores it is pinned to; None: unpinned
    is_gateway: bool
    revision: Revision | None = None  # a gateway@REV target: the revision it runs

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.process.port}"

    def path(self, scenario: Scenario) -> str:
        """The gateway routes by model; the floor forwards paths, so it gets nginx's path."""
        if self.is_gateway:
            return "/v1/chat/completions"
        return f"{scenario.upstream_path}/chat/completions"


def start_floor(folder: Path, upstream_port: int, cpus: str | None) -> Target:
    port = free_port()
    command = [sys.executable, "-m", "bench.http.floor", "--port", str(port)]
    command += ["--upstream", f"http://127.0.0.1:{upstream_port}"]
    process = start("floor", command, cwd=Path.cwd(), log=folder / "floor.log", port=port, cpus=cpus)
    wait_for_port(process)
    where = f"core {cpus}" if cpus else "unpinned"
    return Target("floor", f"bare aiohttp pass-through proxy, uvloop ({where})", process, cpus, False)


def gateway_config(
    port: int, workers: int, upstream_port: int, redis_url: str, database_url: str, key_prefix: str
) -> str:
    providers, models = [], []
    for scenario in workload.scenarios():
        if scenario.connections != workload.CONNECTIONS[0]:
            continue
        base_url = f"http://127.0.0.1:{upstream_port}{scenario.upstream_path}"
        providers.append(
            f'  {scenario.model}: {{type: openai, base_url: "{base_url}", api_key_env: {PROVIDER_KEY_ENV}}}'
        )
        models.append(
            f"  {scenario.model}: {{provider: {scenario.model}, upstream_model: {workload.UPSTREAM_MODEL}, "
            "price: {input: 0.15, output: 0.6}}"
        )
    keys = [
        f"  - {{id: {key.key_id}, sha256: {key.sha256}, user: {key.user}, team: {key.team}}}"
        for key in workload.bench_keys()
    ]
    header = textwrap.dedent(
        f"""\
        server:
          host: 127.0.0.1
          port: {port}
          workers: {workers}
          log_level: info
          log_json: true
        backends:
          redis: {{url: "{redis_url}", key_prefix: "{key_prefix}"}}
          postgres: {{dsn: "{database_url}"}}
        quota:
          policies: policies/*.yaml
        metrics:
          team_labels: true
        """
    )
    sections = ["providers:", *providers, "models:", *models, "keys:", *keys]
    return header + "\n".join(sections) + "\n"


def start_gateway(
    name: str,
    folder: Path,
    *,
    workers: int,
    upstream_port: int,
    redis_url: str,
    database_url: str,
    key_prefix: str,
    cpus: str | None,
    revision: Revision | None = None,
    worktree: Path | None = None,
) -> Target:
    """`python -m gateway serve` in a folder of its own; returns once it is ready and counts exactly.

    With a revision and its worktree, the worktree's gateway package runs instead of this
    tree's: first on PYTHONPATH, and the cwd (the target's folder) holds no package.
    """
    folder.mkdir(parents=True)
    (folder / "policies").mkdir()
    (folder / "policies" / "bench.yaml").write_text(POLICY)
    port = free_port()
    config = folder / "gateway.yaml"
    config.write_text(gateway_config(port, workers, upstream_port, redis_url, database_url, key_prefix))
    env = {**os.environ, PROVIDER_KEY_ENV: "sk-bench-provider-key"}
    if revision is not None and worktree is not None:
        env = revisions.environment(worktree, env)
        revisions.check_imports_from(worktree, revision, env, cwd=folder)
        revisions.check_config(worktree, revision, config, env, cwd=folder)
    command = [sys.executable, "-m", "gateway", "serve", "--config", str(config), "--port", str(port)]
    # stderr carries the request log: it goes to a file, as it would under systemd.
    process = start(name, command, cwd=folder, log=folder / "gateway.log", port=port, cpus=cpus, env=env)
    try:
        wait_for_port(process)
        _wait_ready(process)
    except RuntimeError as exc:
        if revision is None:
            raise
        tail = "\n".join(process.log.read_text(errors="replace").splitlines()[-15:])
        raise StartError(
            f"the gateway at revision {revision.given} ({revision.sha[:12]}) did not start: {exc}\n{tail}"
        ) from exc
    where = f"core {cpus}" if cpus else "unpinned"
    workers_text = "1 worker" if workers == 1 else f"server.workers: {workers}"
    what = "gateway" if revision is None else f"gateway at {revision.given} ({revision.sha[:12]})"
    target = Target(name, f"{what}, {workers_text} ({where})", process, cpus, True, revision)
    for scenario in workload.scenarios():
        _check_count(target, scenario)
    return target


def _wait_ready(process: Process, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    url = f"http://127.0.0.1:{process.port}/health/ready"
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if process.popen.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{process.name} is not ready; see {process.log}")
        time.sleep(0.1)


def _check_count(target: Target, scenario: Scenario) -> None:
    """The gateway's own pre-flight count of the bench body must be exact and as intended."""
    key = workload.bench_keys()[0].key
    request = urllib.request.Request(
        f"{target.url}/v1/tokens/count",
        data=workload.request_body(scenario),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        count = json.load(response)
    expected = workload.PROMPT_SIZES[scenario.size]
    if (count["prompt_tokens"], count["exact"], count["tokenizer"]) != (expected, True, workload.ENCODING):
        raise RuntimeError(f"{target.name} counts {scenario.model} as {count}, expected {expected} exact")
