"""Descriptors that hold an `fcntl.flock` and must never be held by a forked child.

A flock belongs to the open file description, and `os.fork` gives the child a reference to every open one: a
DataLoader or pool worker forked after the lock was taken keeps it alive after its parent dies (even by SIGKILL),
so the next run is refused, naming the dead pid, until the orphan exits. `open_lock_fd` opens the descriptor to
lock and registers it; a fork hook closes every registered descriptor in the child (the parent's lock is untouched:
the child only drops its own reference), so the lock lives exactly as long as the process that took it.
`close_lock_fd` unregisters and closes it. Exec is already safe: `os.open` descriptors are non-inheritable (PEP 446),
so spawn and forkserver children never see them.
"""

from __future__ import annotations

import os

_held: set[int] = set()


def _after_fork_in_child() -> None:
    for fd in _held:
        try:
            os.close(fd)
        except OSError:
            pass
    _held.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


def open_lock_fd(path: str | os.PathLike, flags: int, mode: int = 0o777) -> int:
    """`os.open`, plus: a child forked from now on does not inherit the descriptor (nor a lock taken on it). Locks
    are taken at start-up, before any worker is forked; a fork from another thread in the microseconds between the
    open and the registration is not guarded against."""
    fd = os.open(path, flags, mode)
    _held.add(fd)
    return fd


def close_lock_fd(fd: int) -> None:
    """Close a descriptor from `open_lock_fd` (and its lock), unregistering it first: its number may be reused."""
    _held.discard(fd)
    os.close(fd)
