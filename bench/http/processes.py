"""Processes the benchmark starts: each in its own process group, stopped whatever happens.

Also what /proc says about them: CPU seconds and peak RSS of a process and its
descendants (a multi-worker gateway is its supervisor plus the workers).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Process:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    port: int

    @property
    def pid(self) -> int:
        return self.popen.pid

    def tree(self) -> list[int]:
        """This process and all its descendants alive now."""
        return [self.pid, *descendants(self.pid)]


def start(
    name: str,
    command: list[str],
    *,
    cwd: Path,
    log: Path,
    port: int,
    cpus: str | None = None,
    env: dict[str, str] | None = None,
) -> Process:
    """Starts `command` in a new session (its own process group), output to `log`, pinned to `cpus`."""
    if cpus is not None and shutil.which("taskset"):
        command = ["taskset", "-c", cpus, *command]
    with log.open("ab") as output:
        # A file, never a pipe: nobody reads a pipe during the run, and a full one blocks the writer.
        popen = subprocess.Popen(
            command,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return Process(name, popen, log, port)


def stop(process: Process, timeout: float = 15.0) -> None:
    """SIGTERM to the whole group, SIGKILL after `timeout`; no member outlives this."""
    group = process.pid  # a new session's leader: its pid is the group id
    if process.popen.poll() is None:
        _signal_group(group, signal.SIGTERM)
        try:
            process.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            _signal_group(group, signal.SIGKILL)
            process.popen.wait(5)
    # Workers of a supervisor that is already gone would still be in the group.
    _signal_group(group, signal.SIGKILL)


def _signal_group(group: int, signum: signal.Signals) -> None:
    try:
        os.killpg(group, signum)
    except (ProcessLookupError, PermissionError):
        pass


def wait_for_port(process: Process, timeout: float = 30.0) -> None:
    """Until something accepts connections on the process's port; fails if it exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.popen.poll() is not None:
            raise RuntimeError(f"{process.name} exited with {process.popen.returncode}; see {process.log}")
        try:
            socket.create_connection(("127.0.0.1", process.port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{process.name} did not listen on port {process.port} within {timeout:.0f} s")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _stat_fields(pid: int) -> list[str]:
    text = Path(f"/proc/{pid}/stat").read_text()
    # The command name may hold spaces and parentheses: split after its last ')'.
    return text[text.rindex(")") + 2 :].split()


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parent = int(_stat_fields(int(entry))[1])
            except (OSError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry))
    found: list[int] = []
    pending = [pid]
    while pending:
        for child in children.get(pending.pop(), []):
            found.append(child)
            pending.append(child)
    return found


def cpu_seconds(pids: list[int]) -> dict[int, float]:
    """utime + stime of each process still alive, in seconds."""
    seconds = {}
    for pid in pids:
        try:
            fields = _stat_fields(pid)
        except OSError:
            continue
        # Fields 14 and 15 of /proc/PID/stat; the list starts at field 3 (state).
        seconds[pid] = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    return seconds


def reset_peak_rss(pids: list[int]) -> None:
    """Start each process's VmHWM again from its current RSS (Linux: clear_refs 5)."""
    for pid in pids:
        try:
            Path(f"/proc/{pid}/clear_refs").write_text("5")
        except OSError:
            continue


def peak_rss_kb(pids: list[int]) -> dict[int, int]:
    """VmHWM (peak resident set since the process started) of each process still alive."""
    peaks = {}
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                peaks[pid] = int(line.split()[1])
    return peaks
