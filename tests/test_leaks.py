"""Resources that runs must not leave behind or pile up: temporary files, open shard mappings, worker processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from test_eval_regressions import main_ends_by_ctrl_c

ROOT = Path(__file__).resolve().parents[1]


def test_ctrl_c_while_the_embedding_cache_is_written_leaves_no_temporary_file(tones, tmp_path, capsys, monkeypatch):
    """The entry is written to `<entry>.<pid>.tmp.npz`, then renamed. A Ctrl-C inside the write left that file in
    the cache folder for good (found with a slowed np.savez and SIGINT: one 258 KB file per interrupted run of
    300 FSDD clips, logmel), since only an OSError removed it."""
    cache = tmp_path / "cache"
    args = ["--checkpoint", "logmel", "--data", str(tones), "--out", str(tmp_path / "o"), "--quiet", "--probe",
            "logreg", "--folds", "kfold:3", "--projection", "none", "--cache-dir", str(cache)]  # fmt: skip
    real = np.savez

    def interrupted_savez(f, **arrays):
        real(f, **arrays)  # the bytes are in the temporary file...
        raise KeyboardInterrupt  # ...and Ctrl-C comes before the rename

    with monkeypatch.context() as m:
        m.setattr(np, "savez", interrupted_savez)
        main_ends_by_ctrl_c(args)
    assert "nothing was kept" in capsys.readouterr().err
    assert sorted(p.name for p in cache.iterdir()) == []  # before: ['tones-logmel-<key>.<pid>.tmp.npz']


# train.py whose first SIGINT comes at step 3 and whose second comes while the stop's checkpoint is being written
# (save_state has written its files): a second Ctrl-C quits at once, without that checkpoint.
SECOND_CTRL_C = """
import os, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal (a background job ignores SIGINT)
import accelerate
from matpac_fast import trainer
save, step = accelerate.Accelerator.save_state, trainer.Trainer.micro_step
def save_state(self, *a, **k):
    save(self, *a, **k)
    os.kill(os.getpid(), signal.SIGINT)
def micro_step(self, lms):
    out = step(self, lms)
    if self.step == 3 and not self._stop_requested:
        os.kill(os.getpid(), signal.SIGINT)
    return out
accelerate.Accelerator.save_state, trainer.Trainer.micro_step = save_state, micro_step
sys.exit(trainer.main(sys.argv[1:]))
"""


def test_a_second_ctrl_c_while_the_checkpoint_is_written_leaves_no_half_written_folder(tmp_path):
    args = ["--recipe", "tiny", "--shards", "synthetic:64", "--batch-size", "8", "--workers", "0", "--log-every", "1",
            "--progress", "false", "--model", "depth=1", "--model", "pred_depth=1", "--max-steps", "24",
            "--ckpt-every", "0", "--out", str(tmp_path)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-c", SECOND_CTRL_C, *args], env=env, capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert res.returncode == 130, res.stderr[-2000:]
    assert res.stderr.strip().splitlines()[-1].startswith("train: interrupted again: quit at once"), res.stderr
    # before: step_00000003.tmp with save_state's files in it, kept until a resumed run's next checkpoint (found with
    # a slowed save_state and two SIGINTs: 2.5 MB for the tiny model; GBs for a ViT-B)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == []
