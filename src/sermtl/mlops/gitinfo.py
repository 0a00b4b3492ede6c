"""Which source state produced a result: the git commit and whether the tree had changes.

Kept apart from mlops.tracking (which imports MLflow, seconds) so `sermtl pipeline compile` stays quick.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

PINNED_COMMIT_ENV = "SERMTL_GIT_COMMIT"  # set in images built without .git


def git(*args: str) -> str | None:
    """`git <args>` in the source checkout, else the cwd; None without git or outside a repository."""
    for where in (Path(__file__).resolve().parent, Path.cwd()):
        try:
            done = subprocess.run(
                ["git", *args], cwd=where, capture_output=True, text=True, timeout=20, check=False
            )
        except (OSError, subprocess.SubprocessError):
            continue
        if done.returncode == 0:
            return done.stdout.strip()
    return None


def pinned_commit() -> str:
    return os.environ.get(PINNED_COMMIT_ENV, "").strip()


def commit() -> str | None:
    """`$SERMTL_GIT_COMMIT`, else `git rev-parse HEAD`."""
    return pinned_commit() or git("rev-parse", "HEAD")


def changed(untracked: bool = False) -> bool | None:
    """Whether the tree differs from HEAD (tracked files; `untracked` counts new files too); None when
    unknown (a pinned commit, or no git)."""
    if pinned_commit():
        return None
    status = git("status", "--porcelain", *(() if untracked else ("--untracked-files=no",)))
    return None if status is None else bool(status)
