"""Shared by the benchmark scripts: the commit their figures belong to."""

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _git(*args: str) -> str:
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def commit() -> str:
    """Short commit id, "+dirty" when tracked files differ from it. MATPAC_COMMIT, when set, wins: a remote runner's
    copy of the tree may have no .git, or a stale one (seen on the GPU machine: HEAD three commits behind)."""
    if os.environ.get("MATPAC_COMMIT"):
        return os.environ["MATPAC_COMMIT"]
    sha = _git("rev-parse", "--short", "HEAD")
    if not sha:
        return "unknown"
    return sha + ("+dirty" if _git("status", "--porcelain", "--untracked-files=no") else "")
