"""Entry point: `accelerate launch train.py ...` (multi-GPU, see configs/) or `python train.py ...` (one device).

`python train.py --help` lists every option; the loop lives in matpac_fast/trainer.py.
"""

import sys

if __name__ == "__main__":
    try:
        from matpac_fast.trainer import main  # imports torch: seconds, during which Ctrl-C must not print a trace
    except KeyboardInterrupt:
        print("\ntrain: interrupted while starting: nothing was trained", file=sys.stderr)
        sys.exit(130)
    sys.exit(main())
