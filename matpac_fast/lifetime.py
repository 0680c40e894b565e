"""Tie a process's life to its parent's (Linux's PR_SET_PDEATHSIG): a process started in a session of its own (a
training process under torchrun, a `pipe:` shard command) is out of reach of the signals its parent's group gets,
and outlived a parent killed with SIGKILL, orphaned."""

from __future__ import annotations

import functools
import os
import sys

_PR_SET_PDEATHSIG = 1


@functools.cache
def _prctl():
    """libc's prctl, resolved once (a forked child then calls it without loading anything); None off Linux."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def set_parent_death_signal(sig: int) -> bool:
    """The kernel sends this process `sig` when the thread that started it ends (its parent's death). False where
    that cannot be asked for (not Linux, no libc prctl)."""
    prctl = _prctl()
    return prctl is not None and prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0


def parent_death_setter(sig: int):
    """A subprocess `preexec_fn` that sets `sig` as the child's parent-death signal, or None where it cannot. prctl
    is resolved here, in the parent: between fork and exec the child only calls it. A parent that died before the
    call cannot signal it any more: the child then ends there."""
    if _prctl() is None:
        return None
    parent = os.getpid()

    def preexec() -> None:
        if set_parent_death_signal(sig) and os.getppid() != parent:
            os._exit(1)

    return preexec


def die_with_launcher() -> None:
    """torchrun (and `accelerate launch`, through it) starts each process in a session of its own: a launcher killed
    with SIGKILL left them training, orphaned, still writing --out. Under it, the kernel now sends SIGTERM when the
    launcher dies: the trainer's graceful stop (a checkpoint within seconds). Called first thing (train.py imports
    torch after it), since a launcher that died before the call cannot be told from the reaper that adopted us."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    import signal

    parent = os.getppid()
    if set_parent_death_signal(signal.SIGTERM) and os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGTERM)
