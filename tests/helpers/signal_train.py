"""`train.py` that sends itself a signal once the optimizer step counter reaches $SIGNAL_AT_STEP.

The resume tests need the signal to land mid-run at a known step; sending it from the test process by polling for
files is racy (a tiny run can finish 12 steps between two polls). $SIGNAL_NAME is TERM (graceful: the trainer finishes
the step, checkpoints and exits 0) or KILL (no chance to clean up). Under torchrun, $SIGNAL_RANK (optional) is the
only rank that sends it. $STEP_SLEEP (optional, seconds) slows every micro-step, to give steps a known least length;
of rank $SLEEP_RANK alone where that is set.
"""

import os
import signal
import sys
import time

from matpac_fast import trainer

AT = int(os.environ["SIGNAL_AT_STEP"])
SIG = getattr(signal, "SIG" + os.environ.get("SIGNAL_NAME", "TERM"))
_micro_step = trainer.Trainer.micro_step
_sent = "SIGNAL_RANK" in os.environ and os.environ["SIGNAL_RANK"] != os.environ.get("RANK", "0")  # not this rank
SLEEP = float(os.environ.get("STEP_SLEEP", "0")) * (os.environ.get("SLEEP_RANK", os.environ.get("RANK", "0"))
                                                   == os.environ.get("RANK", "0"))


def micro_step(self, lms):
    global _sent
    out = _micro_step(self, lms)
    time.sleep(SLEEP)
    if self.step >= AT and not _sent:
        _sent = True
        os.kill(os.getpid(), SIG)
    return out


trainer.Trainer.micro_step = micro_step
sys.exit(trainer.main(sys.argv[1:]))
