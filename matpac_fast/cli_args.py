"""argparse types shared by the command lines (make-shards, verify-shards, matpac-eval)."""

from __future__ import annotations

import argparse
import os
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
