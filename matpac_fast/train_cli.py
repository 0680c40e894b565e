"""`matpac-train` and `python train.py`: one entry point. The trainer module imports torch and accelerate (seconds);
that import runs inside this guard, so a Ctrl-C during it is the trainer's own one line, not a traceback. Importing
this module imports nothing heavy (`matpac_fast` loads its top-level names on first use)."""

from __future__ import annotations

import sys
from typing import NoReturn

from matpac_fast.interrupts import INTERRUPTED, held_ctrl_c, run_main  # light: signal, threading
from matpac_fast.lifetime import die_with_launcher  # light: os, ctypes


def main(argv: list[str] | None = None) -> int:
    die_with_launcher()  # before the seconds of imports below, during which a killed launcher went unnoticed
    try:
        with held_ctrl_c():  # a Ctrl-C half-way through torch's import could abort the process: handled after it
            from matpac_fast.trainer import main as train_main
    except KeyboardInterrupt:
        print("\ntrain: interrupted while starting: nothing was trained", file=sys.stderr, flush=True)
        return INTERRUPTED
    return train_main(argv)


def command() -> NoReturn:
    """The `matpac-train` console script and `python train.py`: main(), then the process ends as
    interrupts.run_main says (after a Ctrl-C, by SIGINT, so that a shell script running it stops too)."""
    run_main(main)


if __name__ == "__main__":
    command()
