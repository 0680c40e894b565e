"""Shared by the benchmark scripts: the commit their figures belong to, checks of their output paths, and their
process entry."""

import csv
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DROP_CACHES = "/proc/sys/vm/drop_caches"


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


def output_problem(path: Path, flag: str) -> str | None:
    """Why results cannot be written to `path` (one line), or None. Checked before anything is measured: a wrong
    path must not cost a finished run its figures. Missing parent folders are fine (the writers create them)."""
    if path.is_dir():
        return f"{flag} {path} is a folder; give a file path"
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return f"{flag} {path}: {parent} is a file, not a folder"
    target = path if path.exists() else parent
    if not os.access(target, os.W_OK):
        return f"{flag} {path}: {target} is not writable; give another path"
    try:  # os.access says yes to root almost everywhere (e.g. under /proc): a real open is the test
        if path.exists():
            with open(path, "a"):  # nothing written: the file is unchanged
                pass
        else:
            with tempfile.TemporaryFile(dir=parent):
                pass
    except OSError as e:
        return f"{flag} {path}: cannot write there ({e.strerror or e}); give another path"
    return None


def csv_header(path: Path, flag: str) -> list[str]:
    """The first row of an existing, non-empty CSV; ValueError (one line naming the file) for one that cannot be
    read as text."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            return next(csv.reader(f), [])
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ValueError(f"{flag} {path} cannot be read as a CSV ({type(e).__name__}); give a new path") from None


def csv_output_problem(path: Path, flag: str, fields: list[str]) -> str | None:
    """Why rows with `fields` cannot be appended to the CSV at `path` (one line), or None: a bad path, a file that is
    not text, or another header (an empty or absent file is fine: it gets the header)."""
    problem = output_problem(path, flag)
    if problem or not path.exists() or path.stat().st_size == 0:
        return problem
    try:
        header = csv_header(path, flag)
    except ValueError as e:
        return str(e)
    if header != fields:
        return f"{flag} {path} has other columns than this script writes; give a new {flag} path"
    return None


def can_drop_caches() -> bool:
    """Whether `drop_caches` may run here (root on Linux): opening the file for writing is the check."""
    try:
        with open(DROP_CACHES, "w"):  # nothing written: opening alone drops nothing
            return True
    except OSError:
        return False


def drop_caches() -> None:
    """Empty the whole machine's page cache (after writing dirty pages out): the next reads come from the device."""
    os.sync()
    with open(DROP_CACHES, "w") as f:
        f.write("1\n")


def command(main) -> None:
    """A benchmark's process entry: the process ends with main()'s status; after a Ctrl-C, with one line instead of a
    traceback, by SIGINT as the project's tools end (matpac_fast.interrupts.run_main: a script or loop running the
    benchmark stops too). Whatever main cleans up in `finally` / `with` (temporary folders, worker processes) still is.
    """
    from matpac_fast.interrupts import INTERRUPTED, run_main

    def guarded():
        try:
            return main()
        except KeyboardInterrupt:
            print(f"\n{Path(sys.argv[0]).name}: interrupted before its RESULT line", file=sys.stderr, flush=True)
            return INTERRUPTED

    run_main(guarded)
