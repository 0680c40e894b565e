"""`matpac-eval` and `python -m matpac_fast.evaluation`: the evaluation CLI imports torch (seconds), and that import
runs inside this guard, so a Ctrl-C during it is one line, not an abort or a traceback (matpac_fast.interrupts).
Importing this module imports nothing heavy."""

from __future__ import annotations

import sys
from typing import NoReturn

from matpac_fast.interrupts import INTERRUPTED, held_ctrl_c, run_main  # light: signal, threading


def main(argv: list[str] | None = None) -> int:
    try:
        with held_ctrl_c():
            from matpac_fast.evaluation.cli import main as eval_main
    except KeyboardInterrupt:
        print("matpac-eval: interrupted while starting: nothing was done", file=sys.stderr, flush=True)
        return INTERRUPTED
    return eval_main(argv)


def command() -> NoReturn:
    """The `matpac-eval` console script: main(), then the process ends as interrupts.run_main says (after a Ctrl-C,
    by SIGINT, so that a shell script running it stops too)."""
    run_main(main)


if __name__ == "__main__":
    command()
