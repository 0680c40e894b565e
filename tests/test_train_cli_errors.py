"""`matpac-train` user errors and stops: one line that says what to do, nothing lost, no traceback.

Signals to the whole process group (with a loader worker), --out reuse, resume with other settings, damaged
checkpoints, bad model / optimizer values, unusable shard sets, non-finite weights, the stop step's log row.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from matpac_fast import trainer as T
from matpac_fast.data_fixtures import clip, write_shard_set
from matpac_fast.train_config import resolve

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--recipe", "tiny", "--batch-size", "8", "--workers", "0", "--log-every", "1", "--progress", "false",
        "--model", "depth=1", "--model", "pred_depth=1"]
SYN = ["--shards", "synthetic:64"]


def _main(capsys, *argv) -> tuple[int, str, str]:
    rc = T.main([*TINY, *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err[-3000:]
    return lines[0]


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]


def _snapshot(out: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(out)): (p.stat().st_size, p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def run2(tmp_path_factory):
    """A finished 2-step run (one checkpoint, step_00000002); tests copy it before changing anything."""
    out = tmp_path_factory.mktemp("run2") / "run"
    assert T.main([*TINY, *SYN, "--out", str(out), "--max-steps", "2"]) == 0
    return out


def _copy(run2, tmp_path) -> tuple[Path, Path]:
    out = tmp_path / "run"
    shutil.copytree(run2, out)
    return out, out / "checkpoints" / "step_00000002"


# ----------------------------------------------------------------------------------- 1, 8: stops and signals
def _live_in_group(pgid: int) -> list[int]:
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            pids.append(int(stat.parent.name))
    return pids


def _long_run_then(out: Path, act, shards: str = "synthetic:64") -> subprocess.Popen:
    """A long tiny run with one loader worker, in its own process group: `act(proc)` once two rows are logged;
    then wait for the end (killed, with its group, if it outlives the test). Returns the finished process, with
    `proc.out` / `proc.err` its output."""
    cmd = [sys.executable, str(ROOT / "train.py"), *TINY, "--shards", shards, "--workers", "1", "--epochs", "1000",
           "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        deadline = time.time() + 120
        while not ((out / "history.jsonl").exists() and len(_rows(out)) >= 2):
            assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.1)
        act(proc)
        proc.out, proc.err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return proc


@pytest.mark.skipif(not Path("/proc/self/stat").exists() or not hasattr(os, "killpg"), reason="needs Linux /proc")
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_signal_to_process_group_with_loader_worker_checkpoints_and_exits(tmp_path, sig):
    # As `timeout`, Slurm or `kill -TERM -- -PGID` do: the loader worker gets the signal too. SIGTERM: status 0; a
    # Ctrl-C: after the checkpoint the process ends by SIGINT (130 in a shell), so a script running it stops too.
    out = tmp_path / "run"
    proc = _long_run_then(out, lambda proc: os.killpg(proc.pid, getattr(signal, sig)))
    stdout, stderr = proc.out, proc.err
    assert proc.returncode == (0 if sig == "SIGTERM" else -signal.SIGINT), stderr[-3000:]
    assert "Traceback" not in stderr
    line = stdout.strip().splitlines()[-1]
    assert "stopped by signal, checkpoint written" in line
    step = int(line.split("done: step ")[1].split()[0])
    assert [p.name for p in (out / "checkpoints").iterdir()] == [f"step_{step:08d}"]
    assert _rows(out)[-1]["step"] == step and (out / "encoder.pt").exists()
    for _ in range(100):  # the worker leaves with the main process
        if not _live_in_group(proc.pid):
            break
        time.sleep(0.1)
    assert not _live_in_group(proc.pid)


@pytest.mark.skipif(not Path("/proc/self/stat").exists() or not hasattr(os, "killpg"), reason="needs Linux /proc")
def test_a_loader_worker_killed_for_real_is_one_line(tmp_path):
    # As the out-of-memory killer does. torch's SIGCHLD handler raises its RuntimeError wherever the main thread is
    # (usually mid-step, in backward): a 50-line traceback and exit 1 before.
    def kill_the_workers(proc):
        for _ in range(100):  # between two epochs a worker may be on its way out and the next not yet started
            workers = [p for p in _live_in_group(proc.pid) if p != proc.pid]
            if workers:
                break
            time.sleep(0.02)
        assert workers
        for pid in workers:
            os.kill(pid, signal.SIGKILL)

    out = tmp_path / "run"
    proc = _long_run_then(out, kill_the_workers, shards="synthetic:640")  # 80-batch epochs: few epoch changes
    stderr = proc.err
    assert proc.returncode == 2, stderr[-3000:]
    assert "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert re.fullmatch(r"error: DataLoader worker \(pid\(?s?\)? [\d, ]+\) .*: a data-loader worker died \(often the "
                        r"out-of-memory killer\).*", last), last
    # The advice fits what exists: met mid-step (usually) no checkpoint is written, and --recipe tiny writes none
    # before the end; met in a data wait, one of the last finished step is. Only a resume must keep --workers.
    if (out / "checkpoints").is_dir():
        assert "resume with --resume auto" in last
        assert last.endswith("(with the same --workers, which split the epoch; if memory ran out, free some first)")
    else:
        assert last.endswith("no checkpoint was written yet (--ckpt-every): nothing to resume; start again in a new "
                             "--out (or delete its history.jsonl and tb/ first); if memory ran out, free some first "
                             "(or use fewer --workers)"), last


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_an_exception_out_of_train_stops_the_loader_workers_at_once(tmp_path, monkeypatch):
    # A second Ctrl-C in a notebook: the KeyboardInterrupt comes out of a step, and the notebook keeps its
    # traceback, which kept the epoch's generator and so its loader workers (and pipe: commands) alive.
    inner = T.Trainer.micro_step

    def micro_step(self, lms):
        result = inner(self, lms)
        if self.step >= 3:
            raise KeyboardInterrupt
        return result

    def children() -> set[int]:  # live children of this process (an earlier test's, e.g. compile workers, too)
        found = set()
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == os.getpid() and fields[0] != "Z":
                found.add(int(stat.parent.name))
        return found

    monkeypatch.setattr(T.Trainer, "micro_step", micro_step)
    cfg, _ = resolve([*TINY, *SYN, "--workers", "1", "--out", str(tmp_path / "run"), "--max-steps", "20"])
    before = children()
    with pytest.raises(KeyboardInterrupt) as kept:  # held, as IPython holds sys.last_traceback
        T.Trainer(cfg).train()
    assert children() - before == set()
    del kept


def test_stop_step_gets_a_log_row_and_the_final_line_its_loss(tmp_path, capsys, monkeypatch):
    inner = T.Trainer.micro_step

    def micro_step(self, lms):  # as a signal at step 3 would
        result = inner(self, lms)
        self._stop_requested = self._stop_requested or self.step >= 3
        return result

    monkeypatch.setattr(T.Trainer, "micro_step", micro_step)
    rc, out, _ = _main(capsys, *SYN, "--out", str(tmp_path / "run"), "--max-steps", "20", "--log-every", "10")
    assert rc == 0
    last = _rows(tmp_path / "run")[-1]
    assert last["step"] == 3
    assert f"done: step 3 (stopped by signal, checkpoint written), loss {last['loss']:.4f};" in out


# ------------------------------------------------------------------------------------------- 2: --out reuse
def test_reusing_out_without_resume_is_refused_and_touches_nothing(run2, tmp_path, capsys):
    out, ckpt = _copy(run2, tmp_path)
    before = _snapshot(out)
    rc, _, err = _main(capsys, *SYN, "--out", str(out), "--max-steps", "4")
    assert rc == 2
    assert "already holds a run" in _one_line(err) and "--resume auto" in err
    # A checkpoint of another run resumed into it would be pruned against its checkpoints: refused too.
    other, _ = _copy(run2, tmp_path / "other")
    rc, _, err = _main(capsys, *SYN, "--out", str(out), "--resume", str(other / "checkpoints" / ckpt.name))
    assert rc == 2 and "holds checkpoints of another run" in _one_line(err)
    assert _snapshot(out) == before


def test_run_without_a_checkpoint_says_how_to_start_over_not_to_resume(run2, tmp_path, capsys):
    # A --recipe tiny run (--ckpt-every 0) SIGKILLed before its end leaves history.jsonl and tb/ but no checkpoint:
    # suggesting --resume auto (which then refuses) was a dead end; the line names the files to delete instead.
    out, _ = _copy(run2, tmp_path)
    shutil.rmtree(out / "checkpoints")
    (out / "encoder.pt").unlink()
    before = _snapshot(out)
    expected = (f"error: --out {out} holds a run (history.jsonl) but no checkpoint to continue it from: to start over "
                f"in it, delete {out / 'history.jsonl'} and {out / 'tb'}; or choose a new or empty --out")
    for resume in ([], ["--resume", "auto"]):
        rc, _, err = _main(capsys, *SYN, "--out", str(out), "--max-steps", "4", *resume)
        assert rc == 2 and _one_line(err) == expected
    assert _snapshot(out) == before  # nothing deleted for the user
    (out / "history.jsonl").unlink()
    shutil.rmtree(out / "tb")
    rc, _, err = _main(capsys, *SYN, "--out", str(out), "--max-steps", "1")  # as the line says: starts over
    assert rc == 0, err


def test_resume_auto_on_an_out_without_any_run_says_it_starts_a_new_one(tmp_path, capsys):
    # A typo'd --out used to start a fresh run silently.
    rc, _, err = _main(capsys, *SYN, "--out", str(tmp_path / "run"), "--max-steps", "1", "--resume", "auto")
    assert rc == 0
    assert err.strip().splitlines() == [f"note: --resume auto: no checkpoint in --out {tmp_path / 'run'}, starting a "
                                        "new run"]


def test_resume_auto_never_starts_over_on_a_run_without_a_usable_checkpoint(run2, tmp_path, capsys):
    # A run's files but no checkpoint: --resume auto would otherwise start afresh and append to its history.
    out, ckpt = _copy(run2, tmp_path)
    shutil.rmtree(out / "checkpoints")
    before = _snapshot(out)
    rc, _, err = _main(capsys, *SYN, "--out", str(out), "--max-steps", "4", "--resume", "auto")
    assert rc == 2 and "no checkpoint to continue it from" in _one_line(err)
    assert _snapshot(out) == before
    # The latest checkpoint damaged (no state file): named, with the earlier one to use, never silently skipped.
    out, ckpt = _copy(run2, tmp_path / "b")
    shutil.copytree(ckpt, ckpt.with_name("step_00000004"))
    (ckpt.with_name("step_00000004") / "trainer_state.json").unlink()
    rc, _, err = _main(capsys, *SYN, "--out", str(out), "--max-steps", "6", "--resume", "auto")
    line = _one_line(err)
    assert rc == 2 and "step_00000004 is damaged" in line and f"resume from {ckpt}" in line


# --------------------------------------------------------------------------------- 3: resume with new settings
@pytest.mark.parametrize(
    "change, expected",
    [
        (["--batch-size", "4"], "--batch-size 8 -> 4"),
        (["--seed", "1", "--epochs", "5"], "--epochs 10.0 -> 5.0"),
        (["--preset", "matpac"], "--preset tiny -> matpac"),
        (["--model", "dim=128"], "--model dim 64 -> 128"),
        (["--workers", "2"], "--workers 0 -> 2"),
        (["--shards", "synthetic:72"], "--shards synthetic:64 -> synthetic:72"),
    ],
)
def test_resume_with_settings_that_change_the_run_is_refused(run2, capsys, change, expected):
    before = _snapshot(run2)
    argv = [*SYN, "--out", str(run2), "--max-steps", "4", "--resume", "auto", *change]
    rc, _, err = _main(capsys, *argv)
    assert rc == 2
    line = _one_line(err)
    assert expected in line and "--resume" in line and "new --out" in line
    assert _snapshot(run2) == before


def test_resume_may_change_cadence_and_stop_step(run2, tmp_path, capsys):
    out, _ = _copy(run2, tmp_path)
    rc, _, err = _main(capsys, *SYN, "--out", str(out), "--resume", "auto", "--max-steps", "3", "--log-every", "2",
                       "--keep-last", "1", "--workers", "1")  # 0 and 1 workers read an epoch alike
    assert rc == 0, err
    assert "changed: --keep-last 3 -> 1, --log-every 1 -> 2, --max-steps 2 -> 3" in err
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_00000003"]


def test_resume_may_lower_lr_and_clip_to_recover_from_a_divergence(run2, tmp_path, capsys):
    out, _ = _copy(run2, tmp_path)
    rc, _, err = _main(capsys, *SYN, "--out", str(out), "--resume", "auto", "--max-steps", "3", "--lr", "1e-05",
                       "--clip-grad", "1.0")
    assert rc == 0, err
    changed = re.search(r"changed: (.*)", err).group(1)
    assert re.search(r"--clip-grad \S+ -> 1\.0", changed) and re.search(r"--lr \S+ -> 1e-05", changed), changed
    # The new --lr is the one used, not the checkpoint's. Tiny recipe: lr 1e-3, warm-up 1 epoch = 64 clips / batch 8
    # = 8 steps, linear from 0 (METHOD.md §5); the row of step n logs the lr of update n - 1, i.e. base * (n-1) / 8.
    from matpac_fast.schedules import lr_at

    lrs = {r["step"]: r["lr"] for r in _rows(out) if "lr" in r}
    expected = {1: 0.0, 2: 1e-3 * 1 / 8, 3: 1e-5 * 2 / 8}  # steps 1-2 before the resume, step 3 after it
    assert lrs.keys() == expected.keys(), lrs
    for step, lr in expected.items():
        assert lrs[step] == pytest.approx(lr, rel=1e-6, abs=1e-12), (step, lrs)
    assert lrs[3] == pytest.approx(lr_at(2, base_lr=1e-5, warmup_steps=8, total_steps=80), rel=1e-6)


# ------------------------------------------------------------------------------ one writer per --out (a lock)
_HOLD = ("import sys, time\nfrom matpac_fast.checkpoint import OutLock\nlock = OutLock(sys.argv[1])\n"
         "assert lock.acquire() is None\nprint('locked', flush=True)\ntime.sleep(120)\n")


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")
def test_second_process_on_the_same_out_is_refused_and_a_killed_holder_leaves_no_lock(run2, tmp_path, capsys):
    # A Slurm requeue or double submit: two processes writing one --out crashed one of them and logged steps twice.
    out, _ = _copy(run2, tmp_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(out)], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = _snapshot(out)
        for resume in (["--resume", "auto"], []):  # refused before anything else is looked at or touched
            rc, _, err = _main(capsys, *SYN, "--out", str(out), "--max-steps", "3", *resume)
            assert rc == 2 and _one_line(err) == (f"error: another process (pid {holder.pid}) is writing --out {out}; "
                                                  "wait for it to end or choose another --out")
        assert _snapshot(out) == before
    finally:
        holder.kill()  # SIGKILL: no clean-up, its lock file stays behind
        holder.wait()
    assert (out / ".matpac-train.lock").exists()
    rc, _, err = _main(capsys, *SYN, "--out", str(out), "--max-steps", "3", "--resume", "auto")
    assert rc == 0, err  # the kernel dropped the dead process's lock
    assert not (out / ".matpac-train.lock").exists()  # a run removes its lock file when it ends


def test_file_system_without_locks_is_a_warning_not_a_refusal(tmp_path, capsys, monkeypatch):
    import errno
    import fcntl

    def flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", flock)
    out = tmp_path / "run"
    rc, _, err = _main(capsys, *SYN, "--out", str(out), "--max-steps", "1")
    assert rc == 0
    warned = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert warned == [f"warning: --out {out}: the file system cannot lock {out / '.matpac-train.lock'} (No locks "
                      "available); training without the lock: make sure no other process writes this --out"]


def _disk_full(kind: str) -> BaseException:
    """What a full disk raises while a checkpoint is written: Python's own write, torch's zip writer (its errno lost),
    safetensors' writer (the model file)."""
    import errno

    from safetensors import SafetensorError

    return {"oserror": OSError(errno.ENOSPC, "No space left on device"),
            "torch": RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 76800 vs 76688"),
            "safetensors": SafetensorError("Error while serializing: I/O error: No space left on device (os error "
                                           "28)")}[kind]


@pytest.mark.parametrize("kind", ["oserror", "torch", "safetensors"])
def test_a_full_disk_while_checkpointing_is_one_line_and_removes_the_half_written_checkpoint(tmp_path, capsys,
                                                                                            monkeypatch, kind):
    # Found by review (a small tmpfs): torch's "unexpected pos" traceback, and the half-written step_N.tmp (GBs for
    # ViT-B) stayed, keeping the disk full, so that the --resume auto after it failed in turn.
    import accelerate

    save_state = accelerate.Accelerator.save_state

    def save_state_on_a_full_disk(self, output_dir=None, **kwargs):
        if not output_dir.endswith("step_00000004.tmp"):
            return save_state(self, output_dir, **kwargs)
        (Path(output_dir) / "model.safetensors").write_bytes(b"\0" * 1000)  # as far as it got
        raise _disk_full(kind)

    monkeypatch.setattr(accelerate.Accelerator, "save_state", save_state_on_a_full_disk)
    out = tmp_path / "run"
    rc, _, err = _main(capsys, *SYN, "--out", str(out), "--max-steps", "6", "--ckpt-every", "2")
    line = _one_line(err)
    assert rc == 2 and "the checkpoint of step 4 could not be written" in line and "the disk is full" in line, line
    assert line.endswith("its half-written step_00000004.tmp was removed; free space on that disk: the last "
                         "checkpoint (step_00000002) is kept: --resume auto continues from it"), line
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000002"]
    assert not (out / ".matpac-train.lock").exists()
    monkeypatch.setattr(accelerate.Accelerator, "save_state", save_state)  # space freed: the advice works
    rc, _, err = _main(capsys, *SYN, "--out", str(out), "--max-steps", "6", "--ckpt-every", "2", "--resume", "auto")
    assert rc == 0 and "resumed from" in err, err


def test_a_full_disk_met_by_the_lock_or_a_run_file_is_one_line(run2, tmp_path, capsys, monkeypatch):
    # The --resume auto after a full disk: OSError tracebacks from OutLock.acquire (the holder's pid), or from the
    # first write of the run (config.json, a history row)
    import errno

    from matpac_fast import checkpoint as ckpt
    from matpac_fast import locks

    out, _ = _copy(run2, tmp_path)
    before = _snapshot(out)
    write = os.write

    def write_on_a_full_disk(fd, data):
        if fd in locks._held:
            raise OSError(errno.ENOSPC, "No space left on device")
        return write(fd, data)

    monkeypatch.setattr(os, "write", write_on_a_full_disk)
    rc, _, err = _main(capsys, *SYN, "--out", str(out), "--max-steps", "3", "--resume", "auto")
    assert rc == 2 and _one_line(err) == (f"error: --out {out}: cannot write {out / ckpt.LOCK_FILE}: the disk is full "
                                          "(No space left on device); free space on that disk, then run again")
    assert _snapshot(out) == before  # nor an empty lock file left behind
    monkeypatch.setattr(os, "write", write)

    def write_atomic(path, data, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(T, "write_atomic", write_atomic)  # the history's truncation on resume, then config.json
    rc, _, err = _main(capsys, *SYN, "--out", str(out), "--max-steps", "3", "--resume", "auto")
    assert rc == 2 and "Traceback" not in err, err  # after the line saying that it resumed
    assert err.strip().splitlines()[-1] == (f"error: the disk is full writing {out / 'history.jsonl'} (No space left "
                                            "on device); free space on that disk: the last checkpoint (step_00000002) "
                                            "is kept: --resume auto continues from it")


def test_a_full_disk_while_writing_encoder_pt_is_one_line(tmp_path, capsys, monkeypatch):
    import torch

    save = torch.save

    def save_on_a_full_disk(obj, f, *args, **kwargs):
        if not isinstance(f, (str, os.PathLike)):  # encoder.pt, through atomic_write's file object
            raise _disk_full("torch")
        return save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_on_a_full_disk)
    out = tmp_path / "run"
    rc, _, err = _main(capsys, *SYN, "--out", str(out), "--max-steps", "2")
    line = _one_line(err)
    assert rc == 2 and line.startswith(f"error: {out / 'encoder.pt'} could not be written: the disk is full"), line
    assert line.endswith("the checkpoint of step 2 is kept: free space on that disk, then --resume auto writes "
                         "encoder.pt from it"), line
    assert not (out / "encoder.pt").exists() and not (out / "encoder.pt.tmp").exists()
    monkeypatch.setattr(torch, "save", save)
    rc, _, err = _main(capsys, *SYN, "--out", str(out), "--max-steps", "2", "--resume", "auto")
    assert rc == 0 and (out / "encoder.pt").exists(), err


# ------------------------------------------------------------------------------------- 4: damaged checkpoints
def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize(
    "damage, name, expected",
    [
        (lambda c: _truncate(c / "model.safetensors"), "model.safetensors", "is damaged"),
        (lambda c: _truncate(c / "optimizer.bin"), "optimizer.bin", "is damaged"),
        (lambda c: (c / "model.safetensors").unlink(), "model.safetensors", "is missing"),
        (lambda c: (c / "trainer_state.json").write_text("{}"), "trainer_state.json", "lacks a whole-number step"),
        (lambda c: (c / "trainer_state.json").write_text('{"step": 2,'), "trainer_state.json", "not valid JSON"),
    ],
    ids=["truncated-model", "truncated-optimizer", "missing-model", "empty-state", "bad-json"],
)
def test_damaged_checkpoint_is_one_line_naming_the_file(run2, tmp_path, capsys, damage, name, expected):
    out, ckpt = _copy(run2, tmp_path)
    damage(ckpt)
    rc, _, err = _main(capsys, *SYN, "--out", str(out), "--max-steps", "4", "--resume", "auto")
    assert rc == 2
    line = _one_line(err)
    assert str(ckpt / name) in line and expected in line and "--resume PATH" in line
    fresh = tmp_path / "fresh"  # a failed resume into a new folder leaves no folder behind
    rc, _, err = _main(capsys, *SYN, "--out", str(fresh), "--max-steps", "4", "--resume", str(ckpt))
    assert rc == 2 and str(ckpt / name) in _one_line(err)
    assert not fresh.exists()


@pytest.mark.parametrize("edit, field, shown, kind", [
    (lambda s: s.update(config=[1]), "config", "[1]", "an object"),
    (lambda s: s.update(model_config="x"), "model_config", '"x"', "an object"),
    (lambda s: s.update(nonfinite_total="0"), "nonfinite_total", '"0"', "a finite number of 0 or more"),
    (lambda s: s.update(data_reader=["indexed"]), "data_reader", '["indexed"]', "a text or null"),
    (lambda s: s.update(world_size="1"), "world_size", '"1"', "a whole number of 1 or more"),
    (lambda s: s.update(total_steps="80"), "total_steps", '"80"', "a whole number of 0 or more"),
    (lambda s: s.update(skipped_shards=float("nan")), "skipped_shards", "NaN", "a whole number of 0 or more"),
    (lambda s: s["config"].update(data=[]), "config.data", "[]", "an object"),
    (lambda s: s["config"]["data"].update(batch_size="8"), "config.data.batch_size", '"8"', "a number (this run: 8)"),
    (lambda s: s["config"]["data"].update(workers="abc"), "config.data.workers", '"abc"', "a number (this run: 0)"),
    (lambda s: s["model_config"].update(dim="64"), "model_config.dim", '"64"', "a number (this run: 64)"),
], ids=["config", "model_config", "nonfinite_total", "data_reader", "world_size", "total_steps", "skipped_shards",
        "config.data", "batch_size", "workers", "dim"])
def test_a_trainer_state_field_of_another_kind_is_one_line_naming_the_file_and_field(run2, tmp_path, capsys, edit,
                                                                                    field, shown, kind):
    # Found by review: hand-edited or damaged fields were tracebacks (config a list: TypeError; model_config a text:
    # AttributeError; nonfinite_total a text: torch's TypeError; data_reader a list: unhashable), bare lines
    # ("invalid literal for int()") or nonsense ("written by 1 processes, this run has 1", "schedules 80 steps, this
    # run 80", "--batch-size 8 -> 8"), while the resume error sends the user to this very file.
    out, ckpt = _copy(run2, tmp_path)
    f = ckpt / "trainer_state.json"
    state = json.loads(f.read_text())
    edit(state)
    f.write_text(json.dumps(state))
    rc, _, err = _main(capsys, *SYN, "--out", str(out), "--max-steps", "4", "--resume", "auto")
    assert rc == 2 and _one_line(err) == (f"error: {f}: {field} is {shown}, not {kind}: the file is damaged or was "
                                          "edited; pick an earlier checkpoint with --resume PATH")


# ------------------------------------------------------------------------------ 5, 7: model and optimizer values
@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "heads=0"], "--model heads=0 must be a positive integer"),
        (["--model", "n_prototypes=0"], "--model n_prototypes=0 must be a positive integer"),
        (["--model", "depth=0"], "--model depth=0 must be a positive integer"),
        (["--model", "tau_s=0"], "--model tau_s=0.0 must be > 0"),
        (["--eps", "0"], "--eps must be > 0"),
        (["--beta2", "1"], "--beta2 must be in [0, 1)"),
        (["--weight-decay", "nan"], "--weight-decay must be a finite number"),
        (["--epochs", "0"], "--epochs must be > 0 (got 0)"),
        # from the eleventh session's audit: a traceback, a hang or a run that could never be resumed
        (["--tau-t-warmup-epochs", "1e308"], "--tau-t-warmup-epochs must be within [0, 100000] (got 1e+308)"),
        (["--epochs", "1e12"], "--epochs must be <= 100000 (got 1e+12)"),
        (["--model", "mlp_ratio=0.001"], "mlp_ratio=0.001 gives an MLP of 0 units: raise it"),
        (["--model", "norm_std=inf"], "norm_std=inf must be > 0 and finite"),
        (["--model", "mcl_t_min=inf"], "mcl_t_min=inf must be >= 0 and finite"),
        (["--model", "attn_impl=efficient"], "--model attn_impl=efficient needs a CUDA GPU (that SDPA backend has no "
                                             "CPU kernel): on the CPU use sdpa, flash or math"),
        (["--model", "attn_impl=cudnn"], "--model attn_impl=cudnn needs a CUDA GPU"),
    ],
)
def test_bad_model_and_optimizer_values_are_one_line_errors(tmp_path, capsys, argv, message):
    rc, _, err = _main(capsys, *SYN, "--out", str(tmp_path / "run"), "--max-steps", "2", *argv)
    assert rc == 2 and message in _one_line(err)
    assert not (tmp_path / "run").exists()


_BAD_OPTIONS = [
    # a boolean field: argparse's ArgumentTypeError escaped as a traceback (exit 1)
    (["--model", "use_kernels=maybe"], "error: --model use_kernels=maybe: expected true/false"),
    (["--model", "target_standardize=2"], "error: --model target_standardize=2: expected true/false"),
    # the option named was --model, the text get_model_config's
    (["--preset", "foo"], "error: --preset 'foo': choose one of m2d, matpac, matpac_plusplus, tiny"),
    (["--model", "name=foo"], "error: --model name=foo: the model's name is its preset: use --preset with one of "
                              "m2d, matpac, matpac_plusplus, tiny"),
    # numpy's text, no option named
    (["--seed", "-3"], "error: --seed must be between 0 and 4294967295 (2**32 - 1), got -3"),
    (["--seed", "4294967296"], "error: --seed must be between 0 and 4294967295 (2**32 - 1), got 4294967296"),
]


@pytest.mark.parametrize("argv, line", _BAD_OPTIONS)
def test_bad_option_names_the_option(tmp_path, capsys, argv, line):
    rc, _, err = _main(capsys, *SYN, "--out", str(tmp_path / "run"), "--max-steps", "1", *argv)
    assert rc == 2 and _one_line(err) == line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("argv, line", [
    *_BAD_OPTIONS,
    (["--model", "depth=-1"], "error: --model depth=-1 must be a positive integer"),
    (["--model", "alpha=nan"], "error: --model alpha=nan must be in [0, 1]"),
    (["--model", "center_mode=foo"], "error: --model center_mode='foo': use 'prob' or 'logit'"),
])
def test_print_config_checks_the_options_as_a_run_does(capsys, argv, line):
    # It printed JSON and exited 0 for values the run then refused.
    rc, out, err = _main(capsys, *SYN, "--print-config", *argv)
    assert rc == 2 and out == "" and _one_line(err) == line


def test_print_config_meets_what_a_run_meets_before_its_first_step(tmp_path, run2, capsys):
    # Each of these printed JSON and exited 0, while the run itself then refused it.
    cases = [
        (["--batch-size", "300"], "error: the shard set gives 0 batches per process per epoch"),
        (["--grad-accum", "9"],
         "error: the shard set gives 8 batches per process per epoch, fewer than --grad-accum 9"),
        (["--resume", str(tmp_path / "nowhere")], f"error: --resume {tmp_path / 'nowhere'}"),
        (["--out", ""], "error: --out is empty"),
        (["--out", str(run2)], f"error: --out {run2} already holds a run"),
    ]
    for argv, start in cases:
        rc, out, err = _main(capsys, *SYN, "--out", str(tmp_path / "fresh"), "--print-config", *argv)
        assert rc == 2 and out == "" and _one_line(err).startswith(start), (argv, err)
    assert not (tmp_path / "fresh").exists()  # nothing written


def test_an_epoch_without_a_step_shows_the_arithmetic_of_the_batch(tmp_path, capsys):
    # --batch-size is per process: the line shows clips, the per-process batch, processes and --grad-accum, where
    # a global batch taken for a per-process one shows (before: "0 batches per rank per epoch" and no figures).
    rc, _, err = _main(capsys, "--shards", "synthetic:24", "--batch-size", "16", "--grad-accum", "2", "--out",
                       str(tmp_path / "run"))
    assert rc == 2 and _one_line(err) == (
        "error: the shard set gives 1 batches per process per epoch, fewer than --grad-accum 2: its 24 clips / (16 "
        "per process x 1 process) = 1; --batch-size is per process, the global batch is 16 x 1 process x "
        "--grad-accum 2 = 32: lower --batch-size or use more data")


def test_print_config_notes_a_gpu_only_setting_on_a_cpu(tmp_path, capsys, fresh_accelerate):
    # A note, not a refusal: a config for GPU nodes is checked on a CPU login node (the run itself refuses it).
    rc, out, err = _main(capsys, *SYN, "--out", str(tmp_path / "fresh"), "--print-config", "--precision", "fp16",
                         "--cpu", "true")
    assert rc == 0, err
    assert json.loads(out)["run"]["precision"] == "fp16"
    assert err == ("note: --precision fp16 needs a CUDA GPU, which this run would not have here: start it on a GPU "
                   "node\n")


def test_sets_that_disagree_on_short_are_refused_before_anything_is_written(tmp_path, capsys):
    # The loader refused them only when the first epoch started, after --out, config.json and tb/ were written.
    rng = np.random.default_rng(0)
    for name, short in (("a", "drop"), ("b", "pad")):
        write_shard_set(tmp_path / name, ((f"{name}{i:03d}", clip(rng, 640), []) for i in range(16)), per_shard=8,
                        short=short)
    shards = f"{tmp_path}/{{a,b}}"
    for extra in ([], ["--print-config"]):
        rc, out, err = _main(capsys, "--shards", shards, "--out", str(tmp_path / "run"), "--max-steps", "1", *extra)
        assert rc == 2 and out == "" and _one_line(err).startswith(
            "error: the shard sets disagree on stats.json 'short'"), err
        assert not (tmp_path / "run").exists()


def test_model_name_of_the_preset_itself_is_accepted(capsys):
    # `--model name=<the preset's name>` was refused on the command line while a config file saying the same passed.
    rc, out, err = _main(capsys, *SYN, "--print-config", "--model", "name=tiny")
    assert rc == 0 and err == "" and json.loads(out)["model"]["name"] == "tiny"
    rc, out, err = _main(capsys, *SYN, "--print-config", "--model", "name=matpac")
    assert rc == 2 and out == "" and _one_line(err) == (
        "error: --model name=matpac: the model's name is its preset: use --preset matpac")


def test_print_config_shows_the_model_config_the_run_uses(run2, capsys):
    # Every ModelConfig field, as the run resolved it (its config.json), not only the --model overrides.
    rc, out, err = _main(capsys, *SYN, "--out", str(run2), "--max-steps", "2", "--resume", "auto", "--print-config")
    assert rc == 0 and err == ""
    printed = json.loads(out)
    assert printed["model"] == json.loads((run2 / "config.json").read_text())["model"]
    assert printed["run"]["preset"] == printed["model"]["name"] == "tiny"
    from matpac_fast.train_config import TrainConfig, model_config

    assert model_config(TrainConfig.from_dict(printed)).to_dict() == printed["model"]  # it reads back
    # A remote set is not fetched: an M2D front end's normalisation then comes from its stats.json at run time.
    rc, out, err = _main(capsys, "--shards", "https://example.invalid/s-{000000..000001}.tar", "--frontend", "m2d",
                         "--print-config")
    assert rc == 0 and json.loads(out)["model"]["norm_mean"] == -7.1
    assert err.startswith("note: --print-config does not fetch --shards") and len(err.splitlines()) == 1


def test_m2d_refuses_a_zero_dataset_std_and_matpac_does_not_use_it():
    """M2D normalises by the shard set's std: 0 (a set of constant clips, which the loader accepts) would divide by
    zero; MATPAC's fixed pair ignores it."""
    from matpac_fast.train_config import TrainConfig, model_config

    stats = {"mean": -5.0, "std": 0.0}
    with pytest.raises(ValueError, match="stats.json has std 0.0: M2D's normalisation divides by it"):
        model_config(TrainConfig.from_dict({"run": {"preset": "tiny", "frontend": "m2d"}}), stats)
    assert model_config(TrainConfig.from_dict({"run": {"preset": "tiny", "frontend": "m2d"}}),
                        {"mean": -5.0, "std": 2.0}).norm_std == 2.0
    assert model_config(TrainConfig.from_dict({"run": {"preset": "tiny"}}), stats).norm_std == pytest.approx(4.193,
                                                                                                           abs=1e-3)


def test_m2d_prints_no_collapse_warning_and_print_config_notes_what_the_run_would_refuse(tmp_path, capsys):
    """alpha=1 (M2D) builds no heads: its teacher entropy is a placeholder 0, and every log row said "teacher entropy
    0.000 is near 0 ... collapsing". --print-config passed a CUDA-only attention backend and a --compile-mode without
    --compile silently, where --help promises a note."""
    rc, _, err = _main(capsys, *SYN, "--out", str(tmp_path / "m2d"), "--max-steps", "2", "--log-every", "1",
                       "--model", "alpha=1")
    assert rc == 0 and "teacher entropy" not in err, err
    rc, out, err = _main(capsys, *SYN, "--out", str(tmp_path / "p"), "--print-config", "--model",
                         "attn_impl=efficient", "--compile-mode", "gemm-autotune")
    assert rc == 0 and json.loads(out)["model"]["attn_impl"] == "efficient"
    assert err.splitlines() == [
        "note: --compile-mode gemm-autotune has no effect with --compile off: add --compile block or step",
        "note: --model attn_impl=efficient needs a CUDA GPU (that SDPA backend has no CPU kernel), which this run "
        "would not have here: start it on a GPU node, or use sdpa, flash or math"], err


def test_print_config_shows_inductor_options_and_notes_them_without_compile(tmp_path, capsys):
    """--inductor options are part of the resolved config; with --compile off nothing applies them: a note, as
    for --compile-mode."""
    argv = [*SYN, "--out", str(tmp_path / "p"), "--print-config", "--inductor", "coordinate_descent_tuning=true"]
    rc, out, err = _main(capsys, *argv)
    assert rc == 0 and json.loads(out)["inductor"] == {"coordinate_descent_tuning": True}
    assert err.splitlines() == ["note: --inductor coordinate_descent_tuning=True has no effect with --compile off: "
                                "add --compile block or step"], err
    rc, out, err = _main(capsys, *argv, "--compile", "block")
    assert rc == 0 and err == "", err
    rc, _, err = _main(capsys, *argv[:-1], "coordinate_descent_tunin=true")
    assert rc == 2 and err.strip().endswith("(did you mean coordinate_descent_tuning?)"), err


def test_a_run_notes_compile_settings_that_do_nothing_without_compile(tmp_path, capsys):
    # Only --print-config said so: a run given --compile-mode reduce-overhead (or --inductor) alone trained
    # uncompiled without a word.
    rc, _, err = _main(capsys, *SYN, "--out", str(tmp_path / "r"), "--max-steps", "1", "--compile-mode",
                       "reduce-overhead", "--inductor", "coordinate_descent_tuning=true")
    assert rc == 0, err
    assert err.splitlines()[:2] == [
        "note: --compile-mode reduce-overhead has no effect with --compile off: add --compile block or step",
        "note: --inductor coordinate_descent_tuning=True has no effect with --compile off: add --compile block or "
        "step"], err


def test_help_names_the_program_and_the_recipe_default(monkeypatch):
    from matpac_fast.train_config import build_parser

    for argv0, prog in (("/venv/bin/matpac-train", "matpac-train"), ("train.py", "train.py")):
        monkeypatch.setattr(sys, "argv", [argv0])
        text = build_parser().format_help()
        assert text.startswith(f"usage: {prog} "), text[:80]
    recipe = re.search(r"--recipe \{paper,tiny\}\s+(.*?)\n  --", text, re.S).group(1)
    assert "(default: paper)" in " ".join(recipe.split())


def test_paper_recipe_without_a_gpu_gets_one_note(tmp_path, capsys, monkeypatch):
    import torch

    out = tmp_path / "run"
    out.mkdir()
    (out / "history.jsonl").write_text("")  # refused after the note: nothing as big as the paper's model is built
    note = "note: no CUDA GPU: the paper recipe (preset matpac, batch 256 per device) is meant for GPUs"
    for cuda, recipe, expected in ((False, [], 1), (False, ["--recipe", "tiny"], 0), (True, [], 0)):
        monkeypatch.setattr(torch.cuda, "is_available", lambda cuda=cuda: cuda)
        rc = T.main([*recipe, *SYN, "--out", str(out)])
        err = capsys.readouterr().err
        assert rc == 2 and sum(line.startswith(note) for line in err.splitlines()) == expected, err
        assert "--recipe tiny is the CPU-sized one" in err or not expected


def test_accelerate_launch_of_several_processes_that_starts_one_says_so(tmp_path, capsys, monkeypatch):
    # `accelerate launch --cpu --num_processes 2 train.py` starts one process (accelerate 1.15): it trained alone
    # without a word, and resuming a 2-process checkpoint was refused for "this run has 1" with no reason given.
    # So does `accelerate launch --num_processes 2 train.py` without --multi_gpu on a machine with fewer than 2 GPUs
    # (its simple launcher, ACCELERATE_USE_CPU=False): that one still trained alone without a word.
    out = tmp_path / "run"
    out.mkdir()
    (out / "history.jsonl").write_text("")  # refused after the warning
    cpu = "warning: accelerate launch --cpu started 1 process, not the 2 of --num_processes (its CPU launcher runs one)"
    plain = ("warning: accelerate launch started 1 process, not the 2 of --num_processes (without --multi_gpu it "
             "runs one on a machine with fewer than 2 GPUs)")
    for env, launcher, warning in (
        ("True", ["accelerate", "launch", "--num_processes", "2", "--cpu", "train.py"], cpu),
        ("True", ["accelerate", "launch", "--cpu", "--num-processes=2", "train.py"], cpu),
        ("True", ["accelerate", "launch", "--cpu", "train.py"], None),
        ("False", ["accelerate", "launch", "--num_processes", "2", "train.py"], plain),
        ("False", ["accelerate", "launch", "train.py"], None),
        (None, ["bash", "run.sh", "--num_processes", "2"], None),  # not started by accelerate launch
    ):
        if env is None:
            monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
        else:
            monkeypatch.setenv("ACCELERATE_USE_CPU", env)
        monkeypatch.setattr(T, "_launcher_argv", lambda launcher=launcher: launcher, raising=False)
        rc = T.main([*TINY, *SYN, "--out", str(out)])
        err = capsys.readouterr().err
        warned = [line for line in err.splitlines() if line.startswith("warning: accelerate launch")]
        assert rc == 2 and [w[: len(warning)] for w in warned] == ([warning] if warning else []), err
        assert "torchrun --nproc_per_node 2" in err or not warning


def _shards(tmp_path, n_frames: int = 640, n: int = 16) -> Path:
    rng = np.random.default_rng(0)
    d = tmp_path / "shards"
    write_shard_set(d, ((f"k{i:03d}", clip(rng, n_frames), []) for i in range(n)), per_shard=8)
    stats = json.loads((d / "stats.json").read_text())
    (d / "stats.json").write_text(json.dumps({**stats, "min_clip_frames": n_frames}))  # as make-shards writes
    return d


def test_shards_given_as_the_folder_above_the_set_names_the_set(tmp_path, capsys):
    # --shards runs/demo (make demo's run folder) for runs/demo/shards said "cannot read runs/demo/sizes.json"
    shards = _shards(tmp_path / "demo")
    for extra in (["--print-config"], ["--out", str(tmp_path / "run")]):
        rc, _, err = _main(capsys, "--shards", str(tmp_path / "demo"), *extra)
        assert rc == 2 and _one_line(err) == (f"error: {tmp_path / 'demo'} is not a shard set, but its subfolder "
                                              f"{shards} is one: pass {shards}")
    assert not (tmp_path / "run").exists()


def test_a_stalled_shard_read_ends_the_run_after_data_timeout(tmp_path, capsys):
    """A pipe: command that stops sending held the run forever, without a word (with several processes, the others
    waited in a collective until its 30-min timeout, then a gloo traceback). Now --data-timeout ends it in one line."""
    import time

    shards = _shards(tmp_path)
    stall = tmp_path / "stall.sh"  # the second shard never comes (exec: the command itself sleeps, and is killed)
    stall.write_text('case "$1" in *000001.tar) exec sleep 300;; esac\nexec cat "$1"\n')
    pipe = f"pipe:sh {stall} {shards}/shards-{{000000..000001}}.tar"
    t0 = time.monotonic()
    rc, _, err = _main(capsys, "--shards", pipe, "--out", str(tmp_path / "run"), "--workers", "1",
                       "--data-timeout", "3", "--max-steps", "20")
    assert time.monotonic() - t0 < 90
    assert rc == 2, err
    line = _one_line(err)
    assert line == ("error: process 0's loader gave no batch in 3 s (--data-timeout): a stalled shard read, e.g. a "
                    "pipe: command or URL that stopped sending; nothing was trained yet: check the shards' source, "
                    "then run again"), line
    assert "Traceback" not in err
    rc, _, err = _main(capsys, "--shards", str(shards), "--out", str(tmp_path / "x"), "--data-timeout", "-1")
    assert rc == 2 and "--data-timeout must be >= 0 s, 0 = none (got -1)" in _one_line(err)


@pytest.mark.parametrize("value", ["inf", "1e7"])
def test_a_data_timeout_too_long_for_the_loader_is_one_line(tmp_path, capsys, value):
    # inf (a natural "no limit") and anything over ~24.8 days passed the check, wrote --out/config.json and tb/, then
    # raised OverflowError from multiprocessing's poll() at the first batch: a traceback.
    rc, _, err = _main(capsys, *SYN, "--out", str(tmp_path / "run"), "--workers", "1", "--data-timeout", value)
    assert rc == 2 and _one_line(err) == (f"error: --data-timeout must be at most 1e+06 s (got {float(value):g}); 0 "
                                          "means no limit"), err
    assert not (tmp_path / "run").exists()


def test_resume_reading_the_shards_another_way_is_warned_about(tmp_path, capsys):
    # The same shards through pipe:cat are streamed, not indexed: other crops and order. It was resumed silently and
    # the continuation differed (step 4's loss 3.1586 against 3.15189 uninterrupted).
    shards = _shards(tmp_path)
    out = str(tmp_path / "run")
    assert _main(capsys, "--shards", str(shards), "--out", out, "--max-steps", "1")[0] == 0
    pipe = f"pipe:cat {shards}/shards-{{000000..000001}}.tar"
    rc, _, err = _main(capsys, "--shards", pipe, "--out", out, "--max-steps", "2", "--resume", "auto")
    assert rc == 0
    assert ("warning: --resume: the checkpoint's run read its shards as local files (indexed), this run reads them "
            "as a stream (URLs or pipe:): the run goes on, but its crops and order differ from an uninterrupted "
            "run's (give the shards as that run did to continue it exactly)") in err
    rc, _, err = _main(capsys, "--shards", str(shards), "--out", out, "--max-steps", "3", "--resume", "auto")
    assert rc == 0 and "crops and order differ" in err  # back to indexed: said again
    rc, _, err = _main(capsys, "--shards", str(shards), "--out", out, "--max-steps", "4", "--resume", "auto")
    assert rc == 0 and "warning" not in err  # the same way: nothing to say


def test_resume_knows_the_shards_by_their_tar_names_whatever_follows(tmp_path, capsys):
    """Shards are known by name and size: a pipe: command's words after the .tar (`aws s3 cp URL -`, `| cat`) or a
    signed URL's query are not part of the name. They were, so the same shards were refused on resume. A checkpoint
    written under that older rule still resumes."""
    import hashlib

    shards = _shards(tmp_path)
    out = tmp_path / "run"
    pipe = f"pipe:cat {shards}/shards-{{000000..000001}}.tar | cat"
    assert _main(capsys, "--shards", str(shards), "--out", str(out), "--max-steps", "1")[0] == 0
    rc, _, err = _main(capsys, "--shards", pipe, "--out", str(out), "--max-steps", "2", "--resume", "auto")
    assert rc == 0 and "other shard names or sizes" not in err and "crops and order differ" in err, err
    state = out / "checkpoints" / "step_00000002" / "trainer_state.json"
    saved = json.loads(state.read_text())
    sizes = [8, 8]
    legacy = ["shards-000000.tar | cat", "shards-000001.tar | cat"]  # all after the last '/', the older rule
    for fingerprint, ok in ((hashlib.sha256(json.dumps([legacy, sizes]).encode()).hexdigest()[:16], True),
                            ("0123456789abcdef", False)):
        state.write_text(json.dumps({**saved, "data_fingerprint": fingerprint}))
        rc, _, err = _main(capsys, "--shards", pipe, "--out", str(out), "--max-steps", "3", "--resume",
                           str(state.parent))
        assert (rc == 0) == ok and ("other shard names or sizes" in err) != ok, err
        for later in (out / "checkpoints").glob("step_00000003"):
            shutil.rmtree(later)
        (out / "history.jsonl").write_text("".join(
            line + "\n" for line in (out / "history.jsonl").read_text().splitlines() if json.loads(line)["step"] <= 2))


def test_train_gives_the_callers_signal_handlers_back(tmp_path, capsys):
    # A notebook calling Trainer.train() lost its Ctrl-C for good: the trainer's handler stayed installed.
    import signal

    def mine(signum, frame):
        pass

    saved = {sig: signal.signal(sig, mine) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        assert _main(capsys, *SYN, "--out", str(tmp_path / "run"), "--max-steps", "1")[0] == 0
        assert signal.getsignal(signal.SIGINT) is mine and signal.getsignal(signal.SIGTERM) is mine
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def test_crop_longer_than_every_clip_says_which_crop_to_use(tmp_path, capsys):
    shards = _shards(tmp_path)
    rc, _, err = _main(capsys, "--shards", str(shards), "--out", str(tmp_path / "run"), "--max-steps", "2",
                       "--model", "crop_frames=1008")
    assert rc == 2
    line = _one_line(err)
    assert "crop of 1008 frames" in line and "--model crop_frames=640" in line


# ------------------------------------------------------------------------------------ 6: unusable shard sets
@pytest.mark.parametrize("on_error, workers, expected", [("warn", "0", "every shard failed"),
                                                         ("raise", "1", "--on-error raise")])
def test_corrupt_shard_set_is_one_line_and_nonzero(tmp_path, capsys, on_error, workers, expected):
    shards = _shards(tmp_path)
    for tar in shards.glob("*.tar"):
        tar.write_bytes(b"\x00garbage" * 200)
    with warnings.catch_warnings():  # "skipping shard ..." warnings: counted, not the error
        warnings.simplefilter("ignore")
        rc, _, err = _main(capsys, "--shards", str(shards), "--out", str(tmp_path / "run"), "--max-steps", "2",
                           "--on-error", on_error, "--workers", workers)
    assert rc == 2
    assert expected in _one_line(err)


# --------------------------------------------------------------------------------------- 7: non-finite weights
def test_non_finite_weights_are_neither_checkpointed_nor_exported(tmp_path):
    import torch

    out = tmp_path / "run"
    cfg, _ = resolve([*TINY, *SYN, "--out", str(out), "--max-steps", "2"])
    trainer = T.Trainer(cfg)
    with torch.no_grad():
        trainer.raw_model.student_parameters()[0].fill_(float("nan"))
    trainer.step = trainer.last_step  # nothing left to train: straight to the final checkpoint and export
    with pytest.raises(T.TrainingAborted, match="weights are not finite"):
        trainer.train()
    assert not (out / "encoder.pt").exists() and not (out / "checkpoints").exists()


# ------------------------------------------------------------ loader warnings, model vs shards, unfinished sets
def test_loader_warnings_are_one_clean_line_each_printed_once(tmp_path):
    # A truncated shard met by 2 workers over 2 epochs and a stray .tar beside the set: one "warning:" line each.
    shards = _shards(tmp_path, n=32)
    bad = shards / "shards-000001.tar"
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    (shards / "backup.tar").write_bytes(b"")
    cmd = [sys.executable, str(ROOT / "train.py"), *TINY, "--shards", str(shards), "--workers", "2", "--max-steps",
           "8", "--out", str(tmp_path / "run")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if "W1" not in line[:2]]  # torch's own logging lines aside
    skip = [line for line in lines if "skipping shard" in line]
    stray = [line for line in lines if "backup.tar" in line]
    assert len(skip) == 1 and skip[0].startswith(f"warning: skipping shard {bad}: "), proc.stderr
    assert len(stray) == 1 and stray[0].startswith("warning: ") and "not in sizes.json" in stray[0], proc.stderr
    assert "UserWarning" not in proc.stderr and "self._fail" not in proc.stderr


def test_loader_warning_is_printed_before_the_error_line(tmp_path, capfd):
    # A stray .tar (a warning), a truncated shard read by 2 workers, then a crop no clip is long enough for (the
    # error): the error line comes last, no worker prints after it (capfd sees the workers' stderr too).
    shards = _shards(tmp_path)
    (shards / "backup.tar").write_bytes(b"")
    bad = shards / "shards-000001.tar"
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    rc = T.main([*TINY, "--shards", str(shards), "--out", str(tmp_path / "run"), "--max-steps", "2", "--workers", "2",
                 "--model", "crop_frames=1008"])
    lines = capfd.readouterr().err.strip().splitlines()
    assert rc == 2 and lines[-1].startswith("error: ") and "crop of 1008 frames" in lines[-1]
    assert lines[:-1] == [next(x for x in lines if "backup.tar" in x)] and lines[0].startswith("warning: ")


def test_model_n_mels_other_than_the_shards_is_refused_up_front(tmp_path, capsys):
    rc, _, err = _main(capsys, *SYN, "--out", str(tmp_path / "run"), "--max-steps", "2", "--model", "n_mels=64")
    line = _one_line(err)
    assert rc == 2 and "--model n_mels=64" in line and "80-mel log-mels" in line and "pass n_mels=80" in line
    assert not (tmp_path / "run").exists()


def test_unfinished_make_shards_run_is_named_as_such(tmp_path, capsys):
    shards = _shards(tmp_path)
    (shards / "sizes.json").unlink()
    (shards / "stats.json").unlink()
    (shards / ".make-shards").mkdir()
    rc, _, err = _main(capsys, "--shards", str(shards), "--out", str(tmp_path / "run"), "--max-steps", "2")
    assert rc == 2 and _one_line(err) == (f"error: {shards} is an unfinished make-shards run: run the same make-shards "
                                          "command again to finish it (verify-shards says INCOMPLETE)")


# ------------------------------------------------------------------- two processes: one line per run, not per rank
def _torchrun(tmp_path, *argv) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "train.py"), *TINY, "--cpu", "true", *argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def test_two_process_error_is_printed_once(run2, tmp_path):
    # Both processes refuse the --out; the main one says so, the other is stopped by the launcher, quietly.
    out, _ = _copy(run2, tmp_path)
    proc = _torchrun(tmp_path, *SYN, "--out", str(out), "--max-steps", "4")
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "already holds a run" in errors[0], proc.stderr[-3000:]


def test_two_process_run_takes_one_lock_and_finishes(tmp_path):
    # The main process alone locks --out (the other rank shares it): a normal 2-process run is not refused by itself.
    out = tmp_path / "run"
    proc = _torchrun(tmp_path, *SYN, "--out", str(out), "--max-steps", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("done: step 2") == 1 and not (out / ".matpac-train.lock").exists()


def test_two_process_shard_error_is_one_line_without_a_rank_traceback(tmp_path):
    # A stray .tar (every rank opens the set: one warning) and a truncated shard under --on-error raise, read by one
    # rank: its error once; the other rank, stopped while it waited in a collective, says so in one line at most.
    shards = _shards(tmp_path, n=32)
    (shards / "backup.tar").write_bytes(b"")
    bad = shards / "shards-000001.tar"
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    proc = _torchrun(tmp_path, "--shards", str(shards), "--out", str(tmp_path / "run"), "--max-steps", "8",
                     "--on-error", "raise")
    assert proc.returncode != 0
    lines = proc.stderr.splitlines()
    assert len([line for line in lines if "backup.tar" in line]) == 1, proc.stderr[-3000:]
    shard_errors = [line for line in lines if line.startswith("error: ") and "--on-error raise" in line]
    assert len(shard_errors) == 1 and str(bad) in shard_errors[0], proc.stderr[-3000:]
    others = [line for line in lines if line.startswith("error: ") and line not in shard_errors]
    assert len(others) <= 1 and all("another process failed" in line for line in others), proc.stderr[-3000:]
    assert not any(line.startswith("[rank") for line in lines), proc.stderr[-3000:]


def test_process_group_setup_error_is_this_processes_own_one_line(tmp_path):
    # The rendezvous port is taken: the error is this process's own (not "another process failed") and names the cause.
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        env = {**os.environ, "RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(s.getsockname()[1]), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        cmd = [sys.executable, str(ROOT / "train.py"), *TINY, *SYN, "--out", str(tmp_path / "run"), "--max-steps", "1"]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "address already in use" in errors[0] and "another process" not in errors[0], \
        proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_resuming_an_older_checkpoint_beside_later_ones_is_refused(tmp_path, capsys):
    # --resume step_2 while step_4 exists: resuming would cut history.jsonl back to step 2 while --resume auto would
    # later pick the abandoned run's step_4; refused in one line, nothing changed.
    out = tmp_path / "run"
    assert T.main([*TINY, *SYN, "--out", str(out), "--max-steps", "4", "--ckpt-every", "2"]) == 0
    capsys.readouterr()
    before = _snapshot(out)
    rc, _, err = _main(capsys, *SYN, "--out", str(out), "--max-steps", "6",
                       "--resume", str(out / "checkpoints" / "step_00000002"))
    assert rc == 2
    line = _one_line(err)
    assert "step_00000004" in line and "move them out" in line
    assert _snapshot(out) == before


def test_max_steps_beyond_the_schedule_says_so(tmp_path, capsys):
    rc, out, err = _main(capsys, "--shards", "synthetic:16", "--epochs", "1", "--max-steps", "50",
                         "--out", str(tmp_path / "run"))
    assert rc == 0 and "done: step 2" in out
    assert "schedule ends at step 2" in err and "--max-steps 50" in err


def test_skipped_shards_in_the_history_survive_a_resume(tmp_path):
    # history.jsonl's skipped_shards is a running total over epochs; the trainer kept it in memory only, so a run
    # resumed from a checkpoint logged a different count from the uninterrupted run (its losses were identical).
    shards = _shards(tmp_path, n=32)
    bad = shards / "shards-000001.tar"
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    args = [*TINY, "--shards", str(shards), "--on-error", "warn"]
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "skipping shard ...": counted, which is what is checked
        assert T.main([*args, "--out", str(ref), "--max-steps", "10"]) == 0
        rows = _rows(ref)
        per_epoch = sum(r["epoch"] == 0 for r in rows)
        assert rows[-1]["epoch"] >= 2 and rows[-1]["skipped_shards"] > rows[per_epoch - 1]["skipped_shards"] > 0
        # stopped inside an epoch, then at an epoch's end: each resume re-reads or skips that epoch as it must
        for stop in (per_epoch + 1, 2 * per_epoch):
            out = cut / str(stop)
            assert T.main([*args, "--out", str(out), "--max-steps", str(stop)]) == 0
            assert T.main([*args, "--out", str(out), "--max-steps", "10", "--resume", "auto"]) == 0
            got = {r["step"]: r["skipped_shards"] for r in _rows(out)}
            assert got == {r["step"]: r["skipped_shards"] for r in rows}, stop


@pytest.mark.parametrize("out, expected", [
    ("", "error: --out is empty: give the run's folder"),
    ("README.md/run", "README.md is a file, so no folder can be made under it"),
    ("/proc/matpac-no/run", "cannot create this folder"),
])
def test_out_that_cannot_be_a_folder_is_one_line(tmp_path, capsys, monkeypatch, out, expected):
    # They ended in a NotADirectoryError / FileNotFoundError traceback after the data and the model were set up.
    monkeypatch.chdir(ROOT if out.startswith("README") else tmp_path)
    before = sorted(p.name for p in Path.cwd().iterdir())
    rc, _, err = _main(capsys, *SYN, "--out", out, "--max-steps", "1")
    assert rc == 2 and expected in _one_line(err)
    assert sorted(p.name for p in Path.cwd().iterdir()) == before  # nothing written where the command ran


def test_fp16_without_cuda_is_refused(tmp_path, capsys):
    # Accelerate turns fp16 autocast off on the CPU: the run trained in fp32 bit for bit while config.json said fp16.
    rc, _, err = _main(capsys, *SYN, "--out", str(tmp_path / "run"), "--max-steps", "1", "--precision", "fp16")
    assert rc == 2 and "--precision fp16 needs a CUDA GPU" in _one_line(err)
    assert not (tmp_path / "run").exists()


def test_a_folder_of_audio_given_as_shards_points_to_make_shards(tmp_path, capsys):
    # The advice was "pass meta=DIR", a Python argument train.py does not have.
    audio = tmp_path / "wavs"
    audio.mkdir()
    (audio / "a.wav").write_bytes(b"RIFF")
    rc, _, err = _main(capsys, "--shards", str(audio), "--out", str(tmp_path / "run"), "--max-steps", "1")
    line = _one_line(err)
    assert rc == 2 and f"make shards of it with make-shards folder {audio} --out DIR" in line and "meta=" not in line


def test_an_existing_out_that_cannot_be_written_is_one_line(tmp_path, capsys, monkeypatch):
    """An existing read-only --out (a read-only mount; root ignores chmod, so the write itself is made to fail)
    ended in a SummaryWriter traceback, and --print-config passed it."""
    import tempfile

    out = tmp_path / "ro"
    out.mkdir()

    def refused(*a, dir=None, **k):
        if dir is not None and Path(dir) == out:
            raise PermissionError(1, "Operation not permitted")
        return real(*a, dir=dir, **k)

    real = tempfile.TemporaryFile
    monkeypatch.setattr(tempfile, "TemporaryFile", refused)
    for extra in ([], ["--print-config"]):
        rc, _, err = _main(capsys, *SYN, "--out", str(out), "--max-steps", "1", *extra)
        assert rc == 2 and _one_line(err) == f"error: --out {out}: cannot write there (Operation not permitted); " \
                                            "choose another --out"
    assert list(out.iterdir()) == []


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes into a 0o500 folder")
def test_an_existing_read_only_out_is_one_line(tmp_path, capsys):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o500)
    try:
        rc, _, err = _main(capsys, *SYN, "--out", str(out), "--max-steps", "1")
        assert rc == 2 and _one_line(err).startswith(f"error: --out {out}: cannot write there (")
    finally:
        out.chmod(0o700)


def test_a_config_json_someone_else_wrote_is_not_overwritten(tmp_path, capsys):
    out = tmp_path / "proj"
    out.mkdir()
    (out / "config.json").write_text('{"my": "settings"}')
    rc, _, err = _main(capsys, *SYN, "--out", str(out), "--max-steps", "1")
    assert rc == 2 and "holds a config.json that matpac-train did not write" in _one_line(err)
    assert (out / "config.json").read_text() == '{"my": "settings"}'


def test_resume_path_into_an_out_with_another_runs_history_is_refused(run2, tmp_path, capsys):
    """--resume PATH used to keep the rows of the killed run in --out (steps before the checkpoint's) as its own."""
    other = tmp_path / "other"
    other.mkdir()
    (other / "history.jsonl").write_text(json.dumps({"step": 1, "loss": 9.0}) + "\n")
    ck = run2 / "checkpoints" / "step_00000002"
    rc, _, err = _main(capsys, *SYN, "--out", str(other), "--max-steps", "3", "--resume", str(ck))
    assert rc == 2 and "holds another run (history.jsonl) without checkpoints" in _one_line(err)
    # rows after the checkpoint's step are this resume's own (a kill before its first save): allowed
    (other / "history.jsonl").write_text(json.dumps({"step": 3, "loss": 9.0}) + "\n")
    rc, _, err = _main(capsys, *SYN, "--out", str(other), "--max-steps", "3", "--resume", str(ck))
    assert rc == 0, err
    assert [r["step"] for r in _rows(other)] == [3]


def test_a_resume_path_that_is_no_checkpoint_says_so_in_a_folder_with_checkpoints(run2, tmp_path, capsys):
    out, _ = _copy(run2, tmp_path)
    for bad in (str(tmp_path / "nonexistent"), str(out / "checkpoints")):
        rc, _, err = _main(capsys, *SYN, "--out", str(out), "--max-steps", "3", "--resume", bad)
        assert rc == 2 and f"--resume {bad}: not a checkpoint directory" in _one_line(err)


def test_the_log_row_reports_the_tau_t_its_step_used(tmp_path, capsys):
    out = tmp_path / "run"
    rc, _, err = _main(capsys, *SYN, "--out", str(out), "--max-steps", "3")
    assert rc == 0, err
    t = T.Trainer(resolve([*TINY, *SYN, "--out", str(tmp_path / "x"), "--max-steps", "3"])[0])
    assert [r["tau_t"] for r in _rows(out)] == [t.sched["tau_t"][s - 1] for s in (1, 2, 3)]
    assert [r["lr"] for r in _rows(out)] == [t.sched["lr"][s - 1] for s in (1, 2, 3)]


def test_tau_t_warm_up_longer_than_the_run_is_a_note(tmp_path, capsys):
    rc, _, err = _main(capsys, *SYN, "--out", str(tmp_path / "run"), "--max-steps", "1", "--epochs", "1")
    assert rc == 0
    assert "note: --tau-t-warmup-epochs 2 is longer than --epochs 1: the teacher temperature rises to " in err


def test_a_global_batch_other_than_the_recipes_is_a_note(tmp_path, capsys):
    """On one GPU the paper recipe trains at global batch 256, not its 2048, with 8x the updates; only the EMA decays
    are rescaled for that, and nothing said so (README's "one GPU, the paper's recipe" was wrong)."""
    rc, _, err = _main(capsys, *SYN, "--out", str(tmp_path / "a"), "--max-steps", "1", "--ema-reference-batch", "2048")
    assert rc == 0, err
    assert ("note: global batch 8 (--batch-size 8 per device x 1 process x --grad-accum 1), not the 2048 the EMA "
            "decays are given for (--ema-reference-batch; the paper trains at 2048 = 8 GPUs x 256): the decays are "
            "rescaled to it, the learning rate ") in err
    assert err.count("note: global batch") == 1 and "--grad-accum 256 trains at 2048" in err
    for same in ("8", "0"):  # the batch the decays are for, or no reference (the tiny recipe's): no note
        rc, _, err = _main(capsys, *SYN, "--out", str(tmp_path / same), "--max-steps", "1",
                           "--ema-reference-batch", same)
        assert rc == 0 and "global batch" not in err, err


def test_matpac_train_is_the_guarded_entry_point():
    """The console script imported the trainer (torch, seconds) outside any handler: a Ctrl-C then was a traceback.
    It is now train.py's entry point, which imports the trainer inside its guard."""
    # pyproject.toml's [project.scripts] line, read as text: tomllib is Python 3.11+ and the project supports 3.10
    entry = re.findall(r'^matpac-train\s*=\s*"([^"]*)"', (ROOT / "pyproject.toml").read_text(), re.M)
    assert entry == ["matpac_fast.train_cli:command"], entry
    code = "import sys, matpac_fast.train_cli; assert 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0
    # a Ctrl-C while the trainer module imports: one line and 130 (a meta-path hook raises it at that import)
    code = ("import sys\n"
            "class Hook:\n"
            "    def find_spec(self, name, path, target=None):\n"
            "        if name == 'matpac_fast.trainer':\n"
            "            raise KeyboardInterrupt\n"
            "sys.meta_path.insert(0, Hook())\n"
            "from matpac_fast.train_cli import main\n"
            "sys.exit(main())\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 130 and r.stderr.strip() == "train: interrupted while starting: nothing was trained", r


def test_a_run_rolled_back_within_its_own_out_may_resume(run2, tmp_path, capsys):
    """Its checkpoints moved out of checkpoints/ (the trainer's own advice for abandoning later ones), the run's
    rows and encoder.pt are its own: the same settings in config.json tell it from another run."""
    out, _ = _copy(run2, tmp_path)
    (out / "checkpoints").rename(out / "old")
    rc, _, err = _main(capsys, *SYN, "--out", str(out), "--max-steps", "3", "--resume",
                       str(out / "old" / "step_00000002"))  # fmt: skip
    assert rc == 0, err
    assert [r["step"] for r in _rows(out)] == [1, 2, 3]


def test_advice_without_a_checkpoint_names_only_what_exists(tmp_path):
    # "delete its history.jsonl and tb/" was said of a run stopped before its first row (neither existed)
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text('{"train": {}, "model": {}}')  # a run's, as the trainer writes it
    assert T._resume_advice(out).endswith("nothing to resume; the same command starts over")
    # tb/ is made at the loop's start, before the first row: a run stopped then (a peer process's bad shard) was
    # told to start again in a new --out or delete tb/, yet the same --out takes a new run as it is (check_out)
    (out / "tb").mkdir()
    T.ckpt.check_out(out, "")
    assert T._resume_advice(out).endswith("nothing to resume; the same command starts over")
    (out / "tb").rmdir()
    (out / "history.jsonl").write_text("")
    assert T._resume_advice(out).endswith("start again in a new --out (or delete its history.jsonl first)")
    (out / "tb").mkdir()
    assert T._resume_advice(out).endswith("(or delete its history.jsonl and tb/ first)")


@pytest.mark.parametrize("launcher, rc", [
    ([], 130),
    (["/venv/bin/python", "/venv/bin/accelerate", "launch", "--cpu", "train.py"], 0),
    (["/venv/bin/python", "/venv/bin/accelerate-launch", "train.py"], 0),
    (["python", "-m", "accelerate.commands.launch", "train.py"], 0),
    (["python", "some_accelerate_tool.py", "launch"], 130),
])  # fmt: skip
def test_a_ctrl_c_stop_under_accelerate_launch_exits_zero(tmp_path, capsys, monkeypatch, launcher, rc):
    # `accelerate launch` of one process (no torchrun) waits for the trainer and raises CalledProcessError, a
    # traceback and status 1, for a trainer that SIGINT ended: `kill -INT` of the trainer alone (the terminal's
    # Ctrl-C reaches accelerate too, which then ends by SIGINT itself). At c99fd25 that stop exited 0, quietly.
    monkeypatch.setattr(T, "_launcher_argv", lambda: launcher)
    real, sent = T.Trainer.micro_step, []

    def micro_step(self, lms):
        if not sent:  # in the first step: the stop comes after it
            sent.append(signal.SIGINT)
            signal.raise_signal(signal.SIGINT)
        return real(self, lms)

    monkeypatch.setattr(T.Trainer, "micro_step", micro_step)
    assert T.main([*TINY, *SYN, "--out", str(tmp_path / "run"), "--max-steps", "5"]) == rc
    assert "stopped by signal, checkpoint written" in capsys.readouterr().out


def test_a_clip_holding_nan_is_named_once_and_its_steps_skipped(tmp_path, capsys):
    # make-shards never writes NaN, but a shard damaged since can hold it: the loader passes such a clip on (its
    # header is fine), its step's loss is NaN and skipped, every epoch, and nothing named the clip
    from matpac_fast.data_tar import npy_layout, walk_file

    d = _shards(tmp_path)
    tar = d / "shards-000000.tar"
    keys, refs, _ = walk_file(tar)
    off, size = refs[keys.index("k005")][:2].tolist()
    with open(tar, "r+b") as f:  # a NaN over the whole clip's third mel band, as a damaged disk block might
        raw = f.read()
        start = off + npy_layout(raw, off, size).data_offset + 3 * 640 * 2
        f.seek(start)
        f.write(np.full(640, np.nan, np.float16).tobytes())
    out = tmp_path / "run"
    rc, _, err = _main(capsys, "--shards", str(d), "--out", str(out), "--epochs", "3", "--model", "crop_frames=608")
    assert rc == 0, err
    said = [line for line in err.splitlines() if "k005" in line]
    assert said == [f"warning: clip k005 of --shards {d} holds NaN or Inf log-mel values: every step it is in is "
                    "skipped (skipped_steps); make-shards never writes such values, so its shard was damaged since: "
                    "check the set with verify-shards"], err
    rows = _rows(out)
    assert rows[-1]["skipped_steps"] == 3 and sum(r["loss"] is None for r in rows) == 3  # once per epoch
