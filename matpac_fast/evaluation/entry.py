"""`matpac-eval` and `python -m matpac_fast.evaluation`: the evaluation CLI imports torch (seconds), and that import
runs inside this guard, so a Ctrl-C during it is one line, not an abort or a traceback (matpac_fast.interrupts).
Importing this module imports nothing heavy."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from matpac_fast.interrupts import held_ctrl_c  # light: signal, threading

    try:
        with held_ctrl_c():
            from matpac_fast.evaluation.cli import main as eval_main
    except KeyboardInterrupt:
        print("matpac-eval: interrupted while starting: nothing was done", file=sys.stderr, flush=True)
        return 130
    return eval_main(argv)


if __name__ == "__main__":
    sys.exit(main())
