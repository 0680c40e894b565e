"""`train.py` whose data stalls or whose loader worker dies at micro-batch $STALL_AT (counted over the process).

$STALL_MODE:
- `term` / `int`: the process sends itself SIGTERM / SIGINT while waiting for that batch, then the read stalls for
  a minute (a slow `pipe:` fetch, a hung mount); the trainer must stop at once at the last finished step.
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
_count = 0


def epoch(self, e, skip=0):
    global _count
    for batch in _epoch(self, e, skip=skip):
        _count += 1
        if _count == AT:
            if MODE == "die":
                raise RuntimeError("DataLoader worker (pid 4242) is killed by signal: Killed. ")
            os.kill(os.getpid(), signal.SIGTERM if MODE == "term" else signal.SIGINT)
            time.sleep(60)  # stalled: only the signal handler can end this wait
        yield batch


if MODE == "startup":
    _resume = trainer.Trainer._maybe_resume

    def _maybe_resume(self):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(60)
        return _resume(self)

    trainer.Trainer._maybe_resume = _maybe_resume
trainer.TrainData.epoch = epoch
sys.exit(trainer.main(sys.argv[1:]))
