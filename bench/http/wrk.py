"""One wrk run: the command line, and the figures parsed from its `--latency` report."""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

SCRIPT = Path(__file__).with_name("chat.lua")
_UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}
_PERCENTILE = re.compile(r"^\s+(50|75|90|99)%\s+([\d.]+)(us|ms|s|m)\s*$", re.MULTILINE)
_TOTAL = re.compile(r"(\d+) requests in ([\d.]+)(us|ms|s|m)")
_RATE = re.compile(r"Requests/sec:\s+([\d.]+)")
_NON_2XX = re.compile(r"Non-2xx or 3xx responses: (\d+)")
_SOCKET_ERRORS = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")


@dataclass(frozen=True)
class WrkResult:
    requests: int
    duration_seconds: float
    requests_per_second: float
    latency_ms: dict[str, float]  # "p50", "p75", "p90", "p99"
    non_2xx: int
    socket_errors: dict[str, int]  # connect, read, write, timeout

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def parse(output: str) -> WrkResult:
    total = _TOTAL.search(output)
    rate = _RATE.search(output)
    if total is None or rate is None:
        raise ValueError(f"not a wrk report:\n{output}")
    latency = {f"p{p}": float(value) * _UNIT_MS[unit] for p, value, unit in _PERCENTILE.findall(output)}
    non_2xx = _NON_2XX.search(output)
    errors = _SOCKET_ERRORS.search(output)
    return WrkResult(
        requests=int(total.group(1)),
        duration_seconds=float(total.group(2)) * _UNIT_MS[total.group(3)] / 1000,
        requests_per_second=float(rate.group(1)),
        latency_ms=latency,
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
        socket_errors=dict(
            zip(("connect", "read", "write", "timeout"), map(int, errors.groups()), strict=True)
        )
        if errors
        else {"connect": 0, "read": 0, "write": 0, "timeout": 0},
    )


def run(
    url: str,
    path: str,
    body_file: Path,
    keys_file: Path,
    *,
    connections: int,
    seconds: int,
    cpus: str | None,
) -> tuple[WrkResult, str]:
    """wrk with one thread (enough for 32 connections on one core), and its report as text."""
    command = [
        "wrk",
        "--latency",
        "--threads",
        "1",
        "--connections",
        str(connections),
        "--duration",
        f"{seconds}s",
        "--timeout",
        "10s",
        "--script",
        str(SCRIPT),
        url + path,
        "--",
        path,
        str(body_file),
        str(keys_file),
    ]
    if cpus is not None and shutil.which("taskset"):
        command = ["taskset", "-c", cpus, *command]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60)
    if finished.returncode != 0:
        raise RuntimeError(f"wrk failed ({finished.returncode}): {finished.stderr or finished.stdout}")
    return parse(finished.stdout), finished.stdout
