"""argparse types, progress-bar settings and a value check shared by the command lines (make-shards, verify-shards,
matpac-eval, matpac-train)."""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path


def usable_cpus() -> int:
    """The CPUs this process may run on: a SLURM job or `taskset` allots fewer than the machine has, and
    os.cpu_count() counts the machine (a default of "all cores" started 128 worker processes, each importing torch,
    in an 8-CPU job on a 128-core node)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # no sched_getaffinity (macOS)
        return os.cpu_count() or 1


def path_arg(text: str) -> Path:
    """A path argument: an empty one (an unset shell variable, say) is an error, never the current folder, which
    `Path("")` is: `--out ""` used to write a shard set or an evaluation's results into wherever the command ran."""
    if not text.strip():
        raise argparse.ArgumentTypeError("empty path: give a folder or file (is a shell variable unset?)")
    return Path(text)


def nonempty_arg(text: str) -> str:
    """As `path_arg` for an argument kept as text (a path or a keyword such as 'logmel')."""
    path_arg(text)
    return text


# A bar written to a file or pipe (a batch job's log) refreshes this often at most, in seconds.
LOG_REFRESH_S = 60.0


def bar_settings(stream=None) -> dict:
    """tqdm keyword arguments for a long-running bar on `stream` (default stderr). On a terminal, tqdm's own. Into a
    file or a pipe, one refresh a minute: each refresh is the whole bar again after a carriage return on the same
    line of the log, and at tqdm's up to 10 a second a 46-hour training run's log would grow by ~1 KB/s as one
    line (a reviewer's 32 steps: 37 copies). TQDM_MININTERVAL, when set, is the user's choice and is left to tqdm."""
    stream = sys.stderr if stream is None else stream
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        tty = False
    if tty or "TQDM_MININTERVAL" in os.environ:
        return {}
    return {"mininterval": LOG_REFRESH_S}


def finite_number(v) -> bool:
    """A JSON number (int or float, not bool) that is finite. An integer past float's range (10**400, which JSON
    reads as an int) made math.isfinite raise OverflowError: a traceback where a one-line error was due."""
    if isinstance(v, bool) or not isinstance(v, int | float):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:
        return False
