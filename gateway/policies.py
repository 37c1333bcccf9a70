"""The live policy set, reloaded from policies/*.yaml when the files change."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from gateway.metrics import Metrics
from gateway.quota.policy import PolicySet, load_policies
from gateway.yamlnode import ConfigError

log = logging.getLogger("gateway.policies")


def _fingerprint(files: tuple[Path, ...]) -> tuple[tuple[str, int, int], ...]:
    stamps = []
    for path in files:
        try:
            stat = path.stat()
        except OSError:
            continue
        stamps.append((str(path), stat.st_mtime_ns, stat.st_size))
    return tuple(stamps)


class PolicyHolder:
    """Holds the current PolicySet; a broken edit is logged and the old set kept."""

    def __init__(self, base_dir: Path, glob: str, metrics: Metrics | None = None) -> None:
        self._metrics = metrics
        self._base_dir = base_dir
        self._glob = glob
        self._files = self._find_files()
        self.current: PolicySet = load_policies(self._files)
        self._stamp = _fingerprint(self._files)
        self.reloads = 0
        self.last_error: str | None = None
        self.loaded_at = datetime.now(UTC)
        # The last reload tried (a file changed, SIGHUP, the console), and whether it took.
        self.last_reload_at: datetime | None = None
        self.last_reload_ok: bool | None = None

    def _find_files(self) -> tuple[Path, ...]:
        return tuple(sorted(self._base_dir.glob(self._glob)))

    def reload_if_changed(self, force: bool = False) -> bool:
        """Reload when any policy file was added, removed or edited (or when forced)."""
        files = self._find_files()
        stamp = _fingerprint(files)
        if stamp == self._stamp and not force:
            return False
        self._stamp = stamp
        self.last_reload_at = datetime.now(UTC)
        try:
            self.current = load_policies(files)
        except ConfigError as exc:
            self.last_error = str(exc)
            self.last_reload_ok = False
            if self._metrics is not None:
                self._metrics.policy_reloads.labels("failed").inc()
            log.error("policy reload failed, keeping the previous policies: %s", exc)
            return False
        self._files = files
        self.last_error = None
        self.last_reload_ok = True
        self.reloads += 1
        if self._metrics is not None:
            self._metrics.policy_reloads.labels("ok").inc()
        log.info("policies reloaded: %d policies from %d files", len(self.current.policies), len(files))
        return True

    async def watch(self, interval_seconds: float = 2.0) -> None:
        while True:
            await asyncio.sleep(interval_seconds)
            self.reload_if_changed()


@dataclass(frozen=True)
class PolicyFileCheck:
    """One policy file validated on its own: how many policies it holds, or what is wrong."""

    path: Path
    policies: int
    error: str | None = None


def check_policy_files(files: Sequence[Path]) -> list[PolicyFileCheck]:
    """Each file read alone, and a policy name defined in an earlier file too is an error
    (what `gateway policy check` prints and the console's Policies page shows)."""
    checks: list[PolicyFileCheck] = []
    names: set[str] = set()
    for path in files:
        try:
            policies = load_policies((path,))
        except ConfigError as exc:
            checks.append(PolicyFileCheck(path, 0, str(exc)))
            continue
        found = {policy.name for policy in policies.policies}
        clashes = names & found
        names |= found
        if clashes:
            error = f"{path}: policy names defined in another file too: {', '.join(sorted(clashes))}"
            checks.append(PolicyFileCheck(path, len(policies.policies), error))
            continue
        checks.append(PolicyFileCheck(path, len(policies.policies)))
    return checks
