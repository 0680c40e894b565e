"""Ctrl-C in the commands: held over code that must not be cut half-way (held_ctrl_c), and the way a command's
process ends after one (run_main).

`import torch` is the case in point for holding: seconds of C++ start-up that runs Python through pybind11. A
KeyboardInterrupt raised in there aborted the process ("terminate called after throwing an instance of
'pybind11::error_already_set'", SIGABRT), left numpy half-imported (a RecursionError traceback), or, caught and
turned into a CLI's one line, was followed by the process dying of SIGINT anyway. Measured on this project's CLIs,
2026-11-29: 5 of 60 Ctrl-Cs sent 0.2-1.8 s into make-shards and 1 of 40 sent 0.2-6 s into train.py, before the
commands held it. Importing this module imports nothing heavy."""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import NoReturn


@contextlib.contextmanager
def held_ctrl_c() -> Iterator[None]:
    """A SIGINT that comes inside the block is held until the block ends, then delivered to the handler that was
    there before (Python's: KeyboardInterrupt at the end of the block, replacing an exception the block raised; a
    caller's own handler: called once). Only in the main thread, where Python runs signal handlers, and only over a
    Python handler: SIG_IGN and SIG_DFL are left alone (ignored, or the process ends, as they say)."""
    old = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or not callable(old):
        yield
        return
    held: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
        if held:
            signal.raise_signal(signal.SIGINT)


INTERRUPTED = 130  # 128 + SIGINT: the status a shell shows for a command that a Ctrl-C ended
TERMINATED = 143  # 128 + SIGTERM


class Terminated(KeyboardInterrupt):
    """A SIGTERM raised as an interrupt inside `sigterm_as_interrupt` (a job scheduler's stop, `timeout`, `kill`):
    a KeyboardInterrupt, so that every clean-up written for a Ctrl-C runs for it too, and a command says in one line
    what was kept instead of dying without a word."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """A SIGTERM inside the block raises Terminated (where Python runs signal handlers: the main thread), if SIGTERM
    was at its default (ending the process at once); a caller's own handler, or SIG_IGN, is left alone."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def sigterm_is_interrupt() -> bool:
    """Whether a SIGTERM now raises Terminated (inside sigterm_as_interrupt)."""
    return signal.getsignal(signal.SIGTERM) is _raise_terminated


def run_main(main: Callable[..., int | str | None], *args) -> NoReturn:
    """A command's process entry (its console script, `python -m`, `python train.py`): main(*args), then the process
    ends with main's status, as sys.exit(main(*args)) would, except INTERRUPTED (main has printed its one line for a
    Ctrl-C). The process then ends as Python ends one on an uncaught KeyboardInterrupt: killed by SIGINT once its
    clean-up is done, without a traceback. A shell shows status 130 either way, but bash stops a script or a loop
    only for a command that SIGINT ended; after one that exits 130 by itself it takes the Ctrl-C as handled and runs
    the next command (a `for` over corpora went on to the next one at each Ctrl-C)."""
    try:
        code = main(*args)
    except SystemExit as e:
        code = e.code
    except BrokenPipeError:
        if not _stdout_is_gone():
            raise  # another pipe (a worker's): its traceback is the report
        # stdout's reader left (`make-shards ... | head`): end as a tool that SIGPIPE ends, status 141, without the
        # two tracebacks Python printed (the write's, then the flush's at exit)
        code = 128 + signal.SIGPIPE
    if code != INTERRUPTED or threading.current_thread() is not threading.main_thread():
        if threading.current_thread() is threading.main_thread() and (code is None or isinstance(code, int)):
            # at exit, not now: a caller that catches the SystemExit (IPython) goes on with its own handlers; exit
            # handlers run last registered first, so this one comes before those of torch and multiprocessing
            _done.append(0 if code is None else code)
            atexit.register(_finished)
        sys.exit(code)
    interrupt = KeyboardInterrupt()
    previous = sys.excepthook

    def quiet(kind, value, tb):  # main has said what happened in one line: no traceback
        if value is not interrupt:
            previous(kind, value, tb)

    sys.excepthook = quiet
    raise interrupt  # uncaught: Python ends the process with SIGINT after finalizing (since Python 3.8)


def _stdout_is_gone() -> bool:
    """True when stdout is a pipe without a reader (poll says POLLERR on its write end; a flush cannot tell: the
    failed write dropped what was buffered). stdout then points at /dev/null, so that Python's own flush at exit does
    not fail again."""
    import select

    try:
        fd = sys.stdout.fileno()
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        gone = any(events & select.POLLERR for _, events in poller.poll(0))
    except (OSError, ValueError, AttributeError):  # no fileno (a replaced stdout), no poll (not POSIX)
        return False
    if gone:
        with contextlib.suppress(OSError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, fd)
            os.close(devnull)
    return gone


_done: list[int] = []  # the status of a command that run_main saw finish


def _finished() -> None:
    """The command is done and has said so: a Ctrl-C (or SIGTERM) during the exit handlers that follow (torch's,
    multiprocessing's joining of child processes) ends the process at once with the command's own status. It ended
    it by SIGINT, status 130 and no line, after a complete make-shards run's summary: a script's `make-shards ... &&
    train.py ...` then stopped with the set made. A handler, not SIG_IGN: an exit handler that hangs can still be
    stopped, and a process an exit handler starts does not inherit ignored signals (they survive exec)."""

    def leave(signum, frame) -> None:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(_done[-1])

    for sig in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(sig) is not signal.SIG_IGN:
            signal.signal(sig, leave)


def _finished_last() -> None:
    """After the last exit handler (this module is imported before torch and multiprocessing, so this one, registered
    then, runs after theirs): Python resets its own signal handlers next, before the C++ teardown that follows (torch's
    takes a fraction of a second), where a Ctrl-C would kill the finished command by SIGINT (5 of 6 Ctrl-Cs sent just
    after make-shards' summary did, with a handler alone); from here the two signals are ignored."""
    if _done:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)


atexit.register(_finished_last)
