"""The quick start as a reader runs it: a copy of the project folder (the shipped
gateway.yaml and policies, and .venv) and the gateway scripts/serve starts in it."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import free_port

REPO = Path(__file__).resolve().parents[1]
# The keys the shipped gateway.yaml holds for the quick start (README, "Point a client at it").
DEMO_KEY = "gw-demo-key-change-me"
ADMIN_KEY = "gw-admin-key-change-me"


def project_copy(directory: Path) -> Path:
    """A folder shaped like the project for the README's commands: gateway.yaml and
    policies/ copied as shipped (the SQLite ledger, var/gateway.db, lands in the copy),
    and .venv, the environment running these tests, whose bin/ has `gateway`."""
    shutil.copy(REPO / "gateway.yaml", directory / "gateway.yaml")
    shutil.copytree(REPO / "policies", directory / "policies")
    venv = Path(sys.prefix)
    assert (venv / "bin" / "gateway").exists(), f"run the tests from the project's .venv, not {venv}"
    (directory / ".venv").symlink_to(venv, target_is_directory=True)
    return directory


@dataclass(frozen=True)
class ShippedGateway:
    folder: Path
    port: int
    # The environment of the gateway, for commands that read the same gateway.yaml.
    env: dict[str, str]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log(self) -> str:
        return (self.folder / "gateway.log").read_text()


@contextmanager
def shipped_gateway(folder: Path) -> Iterator[ShippedGateway]:
    """What scripts/serve runs (`.venv/bin/gateway serve --config gateway.yaml`), in a
    project copy, on a free port given as the config asks for it (GATEWAY_PORT); stopped
    with SIGTERM, which must end it cleanly."""
    port = free_port()
    env = {**os.environ, "GATEWAY_PORT": str(port)}
    process = subprocess.Popen(
        [str(folder / ".venv" / "bin" / "gateway"), "serve", "--config", "gateway.yaml"],
        cwd=folder,
        env=env,
        # Request log lines would fill an unread pipe and block the gateway: a file it is.
        stderr=(folder / "gateway.log").open("w"),
    )
    running = ShippedGateway(folder, port, env)
    try:
        _wait_healthy(running, process)
        yield running
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
    assert process.returncode == 0, running.log


def _wait_healthy(gateway: ShippedGateway, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(f"{gateway.url}/health", timeout=5) as answer:
                if answer.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError):
            pass
        assert process.poll() is None, f"the gateway stopped:\n{gateway.log}"
        assert time.monotonic() < deadline, f"no answer on {gateway.url} within 30 s:\n{gateway.log}"
        time.sleep(0.1)
