"""The live policy set, reloaded from policies/*.yaml when the files change."""

from __future__ import annotations

import asyncio
import logging
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

    def _find_files(self) -> tuple[Path, ...]:
        return tuple(sorted(self._base_dir.glob(self._glob)))

    def reload_if_changed(self, force: bool = False) -> bool:
        """Reload when any policy file was added, removed or edited (or when forced)."""
        files = self._find_files()
        stamp = _fingerprint(files)
        if stamp == self._stamp and not force:
            return False
        self._stamp = stamp
        try:
            self.current = load_policies(files)
        except ConfigError as exc:
            self.last_error = str(exc)
            if self._metrics is not None:
                self._metrics.policy_reloads.labels("failed").inc()
            log.error("policy reload failed, keeping the previous policies: %s", exc)
            return False
        self._files = files
        self.last_error = None
        self.reloads += 1
        if self._metrics is not None:
            self._metrics.policy_reloads.labels("ok").inc()
        log.info("policies reloaded: %d policies from %d files", len(self.current.policies), len(files))
        return True

    async def watch(self, interval_seconds: float = 2.0) -> None:
        while True:
            await asyncio.sleep(interval_seconds)
            self.reload_if_changed()
