"""Entry point: `accelerate launch train.py ...` (multi-GPU, see configs/) or `python train.py ...` (one device).

`python train.py --help` lists every option; the loop lives in matpac_fast/trainer.py.
"""

import sys

from matpac_fast.trainer import main

if __name__ == "__main__":
    sys.exit(main())
