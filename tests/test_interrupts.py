"""Ctrl-C in the commands (matpac_fast.interrupts): held over torch's import (held_ctrl_c), and the process ended by
SIGINT after the command's one line (run_main), so that the shell script running it stops too."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from matpac_fast.interrupts import Terminated, held_ctrl_c, sigterm_as_interrupt, sigterm_is_interrupt

ROOT = Path(__file__).resolve().parents[1]


def test_sigterm_as_interrupt_raises_terminated_only_over_the_default():
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    with pytest.raises(Terminated), sigterm_as_interrupt():  # a KeyboardInterrupt, so Ctrl-C clean-ups run for it
        assert sigterm_is_interrupt()
        signal.raise_signal(signal.SIGTERM)
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL and issubclass(Terminated, KeyboardInterrupt)
    seen = []
    old = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
    try:
        with sigterm_as_interrupt():  # a caller's own handler is theirs
            assert not sigterm_is_interrupt()
            signal.raise_signal(signal.SIGTERM)
        assert seen == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, old)


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


def _python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)


def test_run_main_ends_an_interrupted_command_by_sigint_without_a_traceback():
    p = _python("from matpac_fast.interrupts import run_main; print('main ran', flush=True); run_main(lambda: 130)")
    assert (p.returncode, p.stdout, p.stderr) == (-signal.SIGINT, "main ran\n", "")


@pytest.mark.parametrize("main, code, err", [
    ("lambda: 0", 0, ""),
    ("lambda: None", 0, ""),
    ("lambda: 3", 3, ""),
    ("lambda *a: sys.exit(130 if a == (7,) else 5)", -signal.SIGINT, ""),  # SystemExit(130) too; args passed on
    ("lambda: sys.exit('cmd: error: a message')", 1, "cmd: error: a message\n"),
])  # fmt: skip
def test_run_main_exits_as_sys_exit_would_otherwise(main, code, err):
    args = ", 7" if "*a" in main else ""
    p = _python(f"import sys; from matpac_fast.interrupts import run_main; run_main({main}{args})")
    assert (p.returncode, p.stderr) == (code, err)


def _closed_stdout(argv: list[str]) -> subprocess.CompletedProcess:
    """Run `argv` with stdout a pipe whose reader is gone before it starts (`cmd | true`, `cmd | head` once head has
    read its lines): every write fails with EPIPE."""
    r, w = os.pipe()
    os.close(r)
    try:
        return subprocess.run(argv, stdout=w, stderr=subprocess.PIPE, text=True, timeout=120,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    finally:
        os.close(w)


def test_a_command_whose_stdout_reader_left_ends_quietly_as_sigpipe_would(tmp_path):
    """`make-shards ... | head -1` or `... | true`: every command ended with a BrokenPipeError traceback (two: the
    write's and Python's flush at exit), status 1 (found by review). Now status 141 (128 + SIGPIPE, what a shell
    shows for a tool that SIGPIPE ends) and nothing on stderr. A broken pipe not stdout's keeps its traceback."""
    p = _closed_stdout([sys.executable, "-m", "shard_tools", "synthetic", "--n", "4", "--out", str(tmp_path / "s"),
                        "--workers", "0", "--no-progress", "--short", "pad"])
    assert (p.returncode, p.stderr) == (128 + signal.SIGPIPE, ""), p.stderr  # at its summary: the set is made
    assert (tmp_path / "s" / "stats.json").is_file()
    p = _closed_stdout([sys.executable, "-c", "from matpac_fast.interrupts import run_main\n"
                        "run_main(lambda: print('a line' * 1000))"])
    assert (p.returncode, p.stderr) == (128 + signal.SIGPIPE, ""), p.stderr
    p = _python("from matpac_fast.interrupts import run_main\n"  # stdout fine: the pipe was another one
                "def main():\n    raise BrokenPipeError(32, 'a worker pipe')\nrun_main(main)")
    assert p.returncode == 1 and "BrokenPipeError: [Errno 32] a worker pipe" in p.stderr, p.stderr


@pytest.mark.parametrize("status", [0, 1])
def test_a_ctrl_c_after_the_command_is_done_ends_it_with_its_own_status(status):
    """A Ctrl-C while the interpreter cleans up after a finished command (exit handlers, then torch's C++ teardown:
    up to a second) ended a complete make-shards run by SIGINT, status 130, without a line: `make-shards ... &&
    train.py ...` then stopped. Now it ends the process at once with the command's status, also while an exit
    handler hangs (here 20 s), and a process started by an exit handler inherits no ignored signal."""
    code = ("import atexit, subprocess, time; from matpac_fast.interrupts import run_main\n"
            "def hang():\n"
            "    sig = subprocess.run(['grep', 'SigIgn', '/proc/self/status'], capture_output=True, text=True).stdout\n"
            "    print('cleaning up', sig.split()[-1], flush=True)\n"
            "    time.sleep(20)\n"
            "atexit.register(hang)\n"
            f"run_main(lambda: (print('done', flush=True), {status})[1])\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout.readline() == "done\n"
    line = proc.stdout.readline().split()
    ignored = int(line[2], 16)  # the child's SigIgn mask: bit n - 1 for signal n
    assert line[:2] == ["cleaning", "up"] and ignored & (1 << (signal.SIGINT - 1) | 1 << (signal.SIGTERM - 1)) == 0
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=10)  # not the 20-s exit handler
    assert (proc.returncode, out, err) == (status, "", "")


def test_the_console_scripts_end_through_run_main():
    import re

    # pyproject.toml's [project.scripts] lines, read as text: tomllib is Python 3.11+ and the project supports 3.10
    text = (ROOT / "pyproject.toml").read_text()
    section = text.split("[project.scripts]", 1)[1].split("\n[", 1)[0]
    scripts = dict(re.findall(r'^([\w-]+)\s*=\s*"([^"]*)"', section, re.M))
    assert scripts == {"make-shards": "shard_tools.cli:command", "verify-shards": "shard_tools.verify:command",
                       "matpac-eval": "matpac_fast.evaluation.entry:command",
                       "matpac-train": "matpac_fast.train_cli:command"}
    # ... and each of those functions ends its process through run_main: run as pip's generated script runs it
    # (sys.exit(command())), with the module's main giving a Ctrl-C's status, the process ends by SIGINT. (The
    # mapping alone passed with a `command` that did sys.exit(main()), exiting 130 by itself.)
    for target in scripts.values():
        module, function = target.split(":")
        p = _python(f"import sys, {module} as m; m.main = lambda *a, **k: 130; sys.exit(m.{function}())")
        assert (p.returncode, p.stderr) == (-signal.SIGINT, ""), (target, p.returncode, p.stderr[-2000:])


# sitecustomize for the commands below: when torch's import reaches its first Python submodule after its C++ core
# (torch._C), SIGINT goes to the whole process group, as a terminal's Ctrl-C does: to the command and to the bash
# that runs it. That is half-way through `import torch`, where a KeyboardInterrupt left torch unimported (dropped
# from sys.modules) and, at other moments, aborted the process. At exit it says whether torch got imported.
_CTRL_C_IN_TORCH_IMPORT = """
import atexit, os, signal, sys

class CtrlC:
    def find_spec(self, name, path=None, target=None):
        if name.startswith("torch.") and "torch._C" in sys.modules:
            sys.meta_path.remove(self)
            os.killpg(os.getpgrp(), signal.SIGINT)
        return None

sys.meta_path.insert(0, CtrlC())
atexit.register(lambda: print("torch imported:", "torch" in sys.modules and hasattr(sys.modules["torch"], "ones")))
"""


@pytest.mark.parametrize("entry, args, line", [
    (["-m", "shard_tools"], ["synthetic", "--n", "4", "--out", "{tmp}/shards", "--no-progress"],
     "make-shards: interrupted; run the same command again to finish the job"),
    ([str(ROOT / "train.py")], ["--recipe", "tiny", "--shards", "synthetic:64", "--out", "{tmp}/run"],
     "train: interrupted while starting: nothing was trained"),
    (["-m", "matpac_fast.evaluation"], ["--checkpoint", "logmel", "--data", "{tmp}", "--out", "{tmp}/eval"],
     "matpac-eval: interrupted while starting: nothing was done"),
    (["-m", "matpac_fast.demo"], ["--out", "{tmp}/demo"],
     "demo: interrupted: no table; run the same command again to start over (finished shards are kept; "
     "pre-training starts afresh)"),
], ids=["make-shards", "train", "matpac-eval", "demo"])  # fmt: skip
def test_a_ctrl_c_during_torchs_import_ends_the_command_and_its_script(entry, args, line, tmp_path):
    # The command says so in one line once torch is imported, then ends by SIGINT, so the bash script running it
    # stops there too (before: it exited 130 by itself, and bash ran the next command).
    hook, work = tmp_path / "hook", tmp_path / "work"
    hook.mkdir()
    work.mkdir()
    (hook / "sitecustomize.py").write_text(_CTRL_C_IN_TORCH_IMPORT)
    env = {**os.environ, "PYTHONPATH": f"{hook}{os.pathsep}{ROOT}", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, *entry, *(a.format(tmp=work) for a in args)]
    p = subprocess.run(["bash", "-c", '"$@"; echo "the next command ran: $?"', "bash", *cmd], env=env,
                       capture_output=True, text=True, timeout=120, start_new_session=True)
    assert (p.returncode, p.stderr.strip(), p.stdout) == (-signal.SIGINT, line, "torch imported: True\n")
    assert sorted(os.listdir(work)) == []  # nothing was started
