"""The --out locks (train's OutLock, make-shards' folder lock) go with the process that took them, even when it
forked children first (DataLoader or pool workers) and then died by SIGKILL: a flock belongs to the open file
description, so a child that kept its copy of the descriptor would hold the lock until it exits."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not hasattr(os, "fork") or not hasattr(signal, "SIGKILL"),
                                reason="needs fork and POSIX signals")

# The holder takes the lock, forks a child that exits at once (its closing its copy must not drop the parent's
# lock), then a child that outlives it (a loader worker orphaned by the parent's SIGKILL), and reports both.
_HOLDER = """
import os, sys, time
from pathlib import Path
{take}
first = os.fork()
if first == 0:
    os._exit(0)
os.waitpid(first, 0)
child = os.fork()
if child == 0:
    time.sleep(30)
    os._exit(0)
print("ready", child, flush=True)
time.sleep(60)
"""

_TAKE_OUTLOCK = """
from matpac_fast.checkpoint import OutLock
assert OutLock(sys.argv[1]).acquire() is None
"""

_TAKE_SHARDS = """
from shard_tools.pipeline import _lock_out_dir
_lock_out_dir(Path(sys.argv[1]))
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # reparented to init (or a subreaper) it is reaped at once; a zombie would still answer kill(pid, 0)
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True  # no /proc: kill(pid, 0) is the best answer there is


def _holder(take: str, out: Path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER.format(take=take), str(out)], env=env,
                            stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline().split()
    assert line[:1] == ["ready"], (line, proc.poll())
    return proc, int(line[1])


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _outlock_try(out: Path) -> None:
    from matpac_fast.checkpoint import OutLock

    lock = OutLock(out)
    assert lock.acquire() is None
    lock.release()


def _shards_try(out: Path) -> None:
    from matpac_fast.locks import close_lock_fd
    from shard_tools.pipeline import _lock_out_dir

    close_lock_fd(_lock_out_dir(out))


_CASES = {
    "outlock": (_TAKE_OUTLOCK, _outlock_try, "another process (pid {pid}) is writing --out {out}; wait for it to end "
                                             "or choose another --out"),
    "make-shards": (_TAKE_SHARDS, _shards_try, "another make-shards is writing --out {out}: wait for it to end"),
}


@pytest.mark.parametrize("case", list(_CASES))
def test_a_sigkilled_holder_leaves_no_lock_even_with_a_forked_child_alive(case, tmp_path):
    take, try_lock, refusal = _CASES[case]
    out = tmp_path / "out"
    out.mkdir()
    proc, child = _holder(take, out)
    try:
        # While the holder lives, a second writer is refused (a child that came and went did not drop the lock).
        with pytest.raises(ValueError) as e:
            try_lock(out)
        assert str(e.value).startswith(refusal.format(pid=proc.pid, out=out)), str(e.value)
        proc.kill()  # SIGKILL: no clean-up, no release
        proc.wait()
        assert _alive(child)  # the forked child outlives its parent, as an orphaned loader worker does ...
        # ... yet the lock went with the process that took it. Once in a CI run on a loaded 2-core VM the lock was
        # still reported held right after wait() returned (not reproduced in 25 runs, idle or loaded): the kernel's
        # release of the dead process's files can lag. A few seconds' grace keeps the test's point: a child that
        # kept the lock would hold it for its whole 30-s sleep.
        deadline = time.monotonic() + 5
        while True:
            try:
                try_lock(out)
                break
            except ValueError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        assert _alive(child)  # (and the child was alive all the while: the lock was not freed by its exit)
    finally:
        proc.kill()
        proc.wait()
        _kill(child)


def test_a_forked_child_closes_the_lock_descriptors_and_the_parent_keeps_them(tmp_path):
    script = textwrap.dedent("""
        import os, sys
        from matpac_fast import locks
        fd = locks.open_lock_fd(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
        pid = os.fork()
        if pid == 0:
            try:
                os.fstat(fd)
            except OSError:
                os._exit(0 if not locks._held else 3)
            os._exit(2)  # still open in the child
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, status
        os.fstat(fd)  # the parent's copy is untouched
        assert fd in locks._held
        locks.close_lock_fd(fd)
        assert fd not in locks._held
        print("ok")
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-c", script, str(tmp_path / "f.lock")], env=env, capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


def test_release_unregisters_and_a_released_outlock_can_be_taken_again(tmp_path):
    from matpac_fast import locks
    from matpac_fast.checkpoint import OutLock

    lock = OutLock(tmp_path)
    assert lock.acquire() is None
    fd = lock._fd
    assert fd in locks._held
    lock.release()
    assert fd not in locks._held and not (tmp_path / ".matpac-train.lock").exists()
    again = OutLock(tmp_path)
    assert again.acquire() is None
    again.release()
