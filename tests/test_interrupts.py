"""A Ctrl-C held over torch's import (matpac_fast.interrupts.held_ctrl_c) and the commands that use it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from matpac_fast.interrupts import held_ctrl_c

ROOT = Path(__file__).resolve().parents[1]


def test_a_ctrl_c_in_the_block_is_raised_once_it_ends():
    done = []
    with pytest.raises(KeyboardInterrupt):
        with held_ctrl_c():
            signal.raise_signal(signal.SIGINT)
            done.append("after the signal")  # not cut here
    assert done == ["after the signal"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_nothing_held_changes_nothing():
    with held_ctrl_c():
        pass
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_the_callers_handler_is_called_once_after_the_block():
    calls, inside = [], []
    old = signal.signal(signal.SIGINT, lambda signum, frame: calls.append(signum))
    try:
        with held_ctrl_c():
            signal.raise_signal(signal.SIGINT)
            signal.raise_signal(signal.SIGINT)  # two Ctrl-Cs in the block: handled as one, as Python's flag does
            inside.append(list(calls))
        assert inside == [[]] and calls == [signal.SIGINT]
    finally:
        signal.signal(signal.SIGINT, old)


def test_an_ignored_ctrl_c_stays_ignored():
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with held_ctrl_c():
            signal.raise_signal(signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, old)


def test_a_ctrl_c_wins_over_the_blocks_own_error():
    with pytest.raises(KeyboardInterrupt) as e:
        with held_ctrl_c():
            signal.raise_signal(signal.SIGINT)
            raise ValueError("the block's error")
    assert isinstance(e.value.__context__, ValueError)


def test_outside_the_main_thread_it_changes_no_handler():
    seen = []

    def body():
        with held_ctrl_c():
            seen.append(signal.getsignal(signal.SIGINT))

    t = threading.Thread(target=body)
    t.start()
    t.join()
    assert seen == [signal.default_int_handler]


# Sends this process SIGINT when torch's import reaches its first Python submodule after its C++ core (torch._C):
# half-way through `import torch`, where a KeyboardInterrupt left torch unimported (it is dropped from sys.modules)
# and, at other moments, aborted the process. Then runs the command's main and says whether torch got imported.
_CTRL_C_IN_TORCH_IMPORT = """
import importlib, os, signal, sys

class CtrlC:
    def find_spec(self, name, path=None, target=None):
        if name.startswith("torch.") and "torch._C" in sys.modules:
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGINT)
        return None

sys.meta_path.insert(0, CtrlC())
try:
    code = importlib.import_module(sys.argv[1]).main(sys.argv[2:])
except SystemExit as e:
    code = e.code
print("torch imported:", "torch" in sys.modules and hasattr(sys.modules["torch"], "ones"))
sys.exit(code)
"""


@pytest.mark.parametrize("module, args, line", [
    ("shard_tools.cli", ["synthetic", "--n", "4", "--out", "{tmp}/shards", "--no-progress"],
     "make-shards: interrupted; run the same command again to finish the job"),
    ("matpac_fast.train_cli", ["--recipe", "tiny", "--shards", "synthetic:64", "--out", "{tmp}/run"],
     "train: interrupted while starting: nothing was trained"),
    ("matpac_fast.evaluation.entry", ["--checkpoint", "logmel", "--data", "{tmp}", "--out", "{tmp}/eval"],
     "matpac-eval: interrupted while starting: nothing was done"),
    ("matpac_fast.demo", ["--out", "{tmp}/demo"],
     "demo: interrupted: no table; run the same command again to start over (finished shards are kept; "
     "pre-training starts afresh)"),
], ids=["make-shards", "train", "matpac-eval", "demo"])  # fmt: skip
def test_a_ctrl_c_during_torchs_import_ends_the_command_in_one_line_after_it(module, args, line, tmp_path):
    args = [a.format(tmp=tmp_path) for a in args]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-c", _CTRL_C_IN_TORCH_IMPORT, module, *args], env=env, capture_output=True,
                       text=True, timeout=120)
    assert (p.returncode, p.stderr.strip(), p.stdout) == (130, line, "torch imported: True\n")
    assert sorted(os.listdir(tmp_path)) == []  # nothing was started
