"""Progress bars into a log file: a refresh a minute, not tqdm's up to 10 a second (each a copy of the bar after a
carriage return, all on one line of the log)."""

import io
import os
import subprocess
import sys
from pathlib import Path

from matpac_fast.cli_args import LOG_REFRESH_S, bar_settings

ROOT = Path(__file__).resolve().parents[1]


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_bar_settings_slow_a_bar_down_only_off_a_terminal(monkeypatch):
    monkeypatch.delenv("TQDM_MININTERVAL", raising=False)
    assert bar_settings(_Terminal()) == {}
    assert bar_settings(io.StringIO()) == {"mininterval": LOG_REFRESH_S}
    closed = io.StringIO()
    closed.close()
    assert bar_settings(closed) == {"mininterval": LOG_REFRESH_S}  # isatty() on a closed stream raises
    monkeypatch.setenv("TQDM_MININTERVAL", "5")  # the user's own choice, which tqdm reads
    assert bar_settings(io.StringIO()) == {}


def test_make_shards_and_the_trainer_write_few_bar_refreshes_into_a_log(tmp_path):
    """make-shards' bar into a pipe: its first and last states, not one per file (9 here before); the trainer's the
    same over its steps (a reviewer's log: 37 in 32 steps)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("TQDM_MININTERVAL", None)
    r = subprocess.run([sys.executable, "-m", "shard_tools", "synthetic", "--n", "48", "--out", str(tmp_path / "s"),
                        "--workers", "0", "--shard-size", "16"], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert 2 <= r.stderr.count("%|") <= 3, r.stderr[-2000:]  # each state of a bar shows "NN%|"; 9 before
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), "--recipe", "tiny", "--shards", "synthetic:64",
                        "--batch-size", "8", "--workers", "0", "--model", "depth=1", "--model", "pred_depth=1",
                        "--max-steps", "12", "--log-every", "4", "--out", str(tmp_path / "run")],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert 2 <= r.stderr.count("%|") <= 4, r.stderr[-2000:]
