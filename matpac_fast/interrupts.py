"""Ctrl-C held over a stretch of code that must not be cut half-way, then handled as if it came at the end.

`import torch` is the case in point: seconds of C++ start-up that runs Python through pybind11. A KeyboardInterrupt
raised in there aborted the process ("terminate called after throwing an instance of 'pybind11::error_already_set'",
SIGABRT), left numpy half-imported (a RecursionError traceback), or, caught and turned into a CLI's one line, was
followed by the process dying of SIGINT anyway. Measured on this project's CLIs, 2026-11-29: 5 of 60 Ctrl-Cs sent
0.2-1.8 s into make-shards and 1 of 40 sent 0.2-6 s into train.py, before the commands held it. Importing this
module imports nothing heavy."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


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
