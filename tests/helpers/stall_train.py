"""`train.py` whose data stalls, whose loader worker dies, or that gets signals at micro-batch $STALL_AT (counted
over the process).

$STALL_MODE:
- `term` / `int`: the process sends itself SIGTERM / SIGINT while waiting for that batch, then the read stalls for
  a minute (a slow `pipe:` fetch); the trainer must stop at once at the last finished step.
- `term_compute`: SIGTERM arrives while that micro-batch is computed, and the read of the next one stalls for a
  minute: the trainer must not start that read.
- `int2`: two SIGINTs while that micro-batch is computed: the second quits at once.
- `die`: the wait for that batch raises torch's error for a loader worker that died (the out-of-memory killer).
- `startup`: SIGINT arrives while the trainer starts (before train() installs its handlers).
"""

import os
import signal
import sys
import time

from matpac_fast import trainer

AT = int(os.environ.get("STALL_AT", "0"))
MODE = os.environ["STALL_MODE"]
_epoch = trainer.TrainData.epoch
_micro_step = trainer.Trainer.micro_step
_count = 0


def epoch(self, e, skip=0):
    global _count
    for batch in _epoch(self, e, skip=skip):
        _count += 1
        if _count == AT and MODE == "die":
            raise RuntimeError("DataLoader worker (pid 4242) is killed by signal: Killed. ")
        if _count == AT and MODE in ("term", "int"):
            os.kill(os.getpid(), signal.SIGTERM if MODE == "term" else signal.SIGINT)
            time.sleep(60)  # stalled: only the signal handler can end this wait
        if _count == AT + 1 and MODE == "term_compute":
            time.sleep(60)  # the read after the signal stalls: it must not be started
        yield batch


def micro_step(self, lms):
    out = _micro_step(self, lms)
    if _count == AT and MODE == "term_compute":
        os.kill(os.getpid(), signal.SIGTERM)
    if _count == AT and MODE == "int2":
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(60)  # the second one must end this
    return out


if MODE == "startup":
    _resume = trainer.Trainer._maybe_resume

    def _maybe_resume(self):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(60)
        return _resume(self)

    trainer.Trainer._maybe_resume = _maybe_resume
trainer.TrainData.epoch = epoch
trainer.Trainer.micro_step = micro_step
sys.exit(trainer.main(sys.argv[1:]))
