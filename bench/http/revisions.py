"""Other git revisions of the gateway, measured side by side with this tree's (`--compare REV`).

Each revision is checked out with `git worktree add --detach` into the run's temp
folder and started with this venv's Python, the worktree first on PYTHONPATH, so
`python -m gateway` imports the revision's package; everything else (the installed
dependencies, the config, policies, keys, pinning) is what the `gateway` target gets.
The worktrees are removed at the end of the run, whatever happens.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

PREFIX = "gateway@"
_FULL_SHA = re.compile(r"[0-9a-f]{40}")


class StartError(RuntimeError):
    """A target could not start; the message says which and why."""


@dataclass(frozen=True)
class Revision:
    given: str  # as on the command line, e.g. 18d2232 or HEAD~3
    sha: str  # the commit it resolves to

    @property
    def short(self) -> str:
        """The name's part after gateway@: REV as given, but a full hash cut to 7 characters."""
        return self.given[:7] if _FULL_SHA.fullmatch(self.given) else self.given

    @property
    def name(self) -> str:
        return f"{PREFIX}{self.short}"

    @property
    def folder_name(self) -> str:
        return "rev-" + re.sub(r"[^A-Za-z0-9._-]", "-", self.short)


def resolve(repo: Path, given: str) -> Revision:
    """The commit `given` names in `repo`; ValueError when it names none."""
    finished = subprocess.run(
        ["git", "-C", str(repo), "rev-parse", "--verify", "--quiet", f"{given}^{{commit}}"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if finished.returncode != 0 or not given or given.startswith("-"):
        raise ValueError(f"{given!r} is not a commit of {repo}")
    return Revision(given, finished.stdout.strip())


def add_worktree(repo: Path, folder: Path, revision: Revision) -> Path:
    path = folder / revision.folder_name
    finished = subprocess.run(
        ["git", "-C", str(repo), "worktree", "add", "--detach", str(path), revision.sha],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if finished.returncode != 0:
        raise RuntimeError(
            f"{revision.name}: git worktree add failed for revision {revision.given}: "
            f"{finished.stderr.strip() or finished.stdout.strip()}"
        )
    return path


def remove_worktree(repo: Path, path: Path) -> None:
    """`git worktree remove --force`; failing that, the folder goes and git forgets it."""
    finished = subprocess.run(
        ["git", "-C", str(repo), "worktree", "remove", "--force", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if finished.returncode != 0 or path.exists():
        shutil.rmtree(path, ignore_errors=True)
        subprocess.run(["git", "-C", str(repo), "worktree", "prune"], capture_output=True, timeout=60)


def environment(worktree: Path, base: dict[str, str]) -> dict[str, str]:
    """`base` with the worktree first on PYTHONPATH."""
    path = [str(worktree), *filter(None, base.get("PYTHONPATH", "").split(os.pathsep))]
    return {**base, "PYTHONPATH": os.pathsep.join(path)}


def check_imports_from(worktree: Path, revision: Revision, env: dict[str, str], cwd: Path) -> None:
    """The `gateway` package Python imports with this env and cwd is the worktree's."""
    finished = subprocess.run(
        [sys.executable, "-c", "import gateway; print(gateway.__file__)"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    imported = Path(finished.stdout.strip()).resolve() if finished.returncode == 0 else None
    if imported is None or not imported.is_relative_to(worktree.resolve()):
        raise RuntimeError(
            f"{revision.name}: Python imports gateway from {imported or finished.stderr.strip()}, "
            f"not from the worktree of revision {revision.given} at {worktree}"
        )


def check_config(worktree: Path, revision: Revision, config: Path, env: dict[str, str], cwd: Path) -> None:
    """`gateway check` of the revision on the harness's config: a clear failure if it can't parse it."""
    finished = subprocess.run(
        [sys.executable, "-m", "gateway", "check", "--config", str(config)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = (finished.stderr.strip() or finished.stdout.strip())[-2000:]
    if finished.returncode != 0 and "invalid choice: 'check'" not in output:
        raise StartError(
            f"the gateway at revision {revision.given} ({revision.sha[:12]}) cannot use the config "
            f"the harness writes ({config}):\n{output}"
        )
