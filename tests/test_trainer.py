"""Trainer acceptance: 2-process gloo run, resume after SIGTERM / SIGKILL, compiled step vs eager, CLI errors."""

import contextlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from matpac_fast.train_config import resolve
from matpac_fast.trainer import main

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
# A very small model and data set: the point is the mechanics, not the learning.
TINY = ["--recipe", "tiny", "--shards", "synthetic:64", "--batch-size", "8", "--workers", "0", "--log-every", "1",
        "--progress", "false", "--model", "depth=1", "--model", "pred_depth=1", "--deterministic", "true"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _run(out, *extra):
    return [PY, str(ROOT / "train.py"), *TINY, "--out", str(out), *extra]


def _trace(out) -> dict[int, float]:
    rows = [json.loads(line) for line in (Path(out) / "history.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}  # later rows win: steps redone after a kill replace earlier ones


def _final_weights(out):
    last = sorted((Path(out) / "checkpoints").glob("step_*"))[-1]
    return last.name, load_file(str(last / "model.safetensors"))


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """Uninterrupted 12-step run (crosses an epoch boundary: 8 batches per epoch)."""
    out = tmp_path_factory.mktemp("ref")
    subprocess.run(_run(out, "--max-steps", "12"), check=True, env=ENV, capture_output=True)
    return out


def _assert_same_run(out, ref):
    a, b = _trace(out), _trace(ref)
    assert sorted(a) == list(range(1, 13)) == sorted(b)
    assert [a[s] for s in sorted(a)] == [b[s] for s in sorted(b)]
    name_a, wa = _final_weights(out)
    name_b, wb = _final_weights(ref)
    assert name_a == name_b == "step_00000012"
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert any(k.startswith("teacher_encoder") for k in wa) and "center" in wa


def test_resume_after_max_steps_matches_uninterrupted(tmp_path, reference_run):
    subprocess.run(_run(tmp_path, "--max-steps", "6"), check=True, env=ENV, capture_output=True)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_00000006"]
    res = subprocess.run(_run(tmp_path, "--max-steps", "12", "--resume", "auto"), check=True, env=ENV,
                         capture_output=True, text=True)
    assert "at step 6 (changed: --max-steps 6 -> 12); epoch 0's first 6 batches are passed over first" in res.stderr
    _assert_same_run(tmp_path, reference_run)


def test_the_teacher_emas_rounding_residual_is_checkpointed(tmp_path):
    """The EMA's Kahan terms are trainer state: in the checkpoint by teacher parameter name (safetensors), restored on
    resume (test_resume_after_max_steps_matches_uninterrupted fails without them). A checkpoint from before they
    were kept resumes from zeros; a damaged file is the checkpoint's one-line error."""
    import shutil

    run = tmp_path / "run"
    subprocess.run(_run(run, "--max-steps", "3"), check=True, env=ENV, capture_output=True)
    ck = run / "checkpoints" / "step_00000003"
    res, model = load_file(str(ck / "ema_residual.safetensors")), load_file(str(ck / "model.safetensors"))
    assert set(res) == {k for k in model if k.startswith(("teacher_encoder.", "teacher_head."))} and res
    assert all(res[k].shape == model[k].shape and res[k].dtype == torch.float32 for k in res)
    assert any(v.abs().max() > 0 for v in res.values())  # what fp32 rounding took from the teacher
    older = tmp_path / "older"
    shutil.copytree(run, older)
    (older / "checkpoints" / "step_00000003" / "ema_residual.safetensors").unlink()
    subprocess.run(_run(older, "--max-steps", "4", "--resume", "auto"), check=True, env=ENV, capture_output=True)
    assert _final_weights(older)[0] == "step_00000004"
    (ck / "ema_residual.safetensors").write_bytes(b"not a safetensors file")
    res = subprocess.run(_run(run, "--max-steps", "4", "--resume", "auto"), env=ENV, capture_output=True, text=True)
    assert res.returncode == 2 and "Traceback" not in res.stderr  # the status of the trainer's other bad inputs
    # found by the check before anything is loaded, as a damaged model file is
    assert f"{ck / 'ema_residual.safetensors'} is damaged (" in res.stderr.strip().splitlines()[-1]


def _signalled(out, name, at_step, *extra):
    """The training command, but the process signals itself at optimizer step `at_step` (tests/helpers)."""
    cmd = _run(out, *extra)
    cmd[1] = str(ROOT / "tests" / "helpers" / "signal_train.py")
    env = {**ENV, "SIGNAL_NAME": name, "SIGNAL_AT_STEP": str(at_step)}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def test_sigterm_checkpoints_and_exits_zero_then_resumes(tmp_path, reference_run):
    res = _signalled(tmp_path, "TERM", 5, "--max-steps", "12")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "stopped by signal" in res.stdout
    assert _final_weights(tmp_path)[0] == "step_00000005"  # finished the step in flight, then checkpointed
    subprocess.run(_run(tmp_path, "--max-steps", "12", "--resume", "auto"), check=True, env=ENV, capture_output=True)
    _assert_same_run(tmp_path, reference_run)


def _stalled(out, mode, at, *extra, timeout=120):
    """The training command with tests/helpers/stall_train.py: at micro-batch `at` the data wait gets a signal and
    stalls for a minute (`term`, `int`), or a loader worker dies (`die`), or SIGINT comes during start-up."""
    cmd = _run(out, *extra)
    cmd[1] = str(ROOT / "tests" / "helpers" / "stall_train.py")
    env = {**ENV, "STALL_MODE": mode, "STALL_AT": str(at)}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("mode", ["term", "int"])
def test_a_signal_during_a_stalled_data_wait_stops_at_once_then_resumes(tmp_path, reference_run, mode):
    # Before, the handler only set a flag read after the next step: a stalled read held the stop back for as long as
    # it stalled (98 s with a slow pipe: fetch), past Slurm's grace period.
    import time

    t0 = time.monotonic()
    res = _stalled(tmp_path, mode, 6, "--max-steps", "12")  # batch 6 stalls: steps 1-5 are done
    assert time.monotonic() - t0 < 45, "the 60-s stall was waited out"
    # a Ctrl-C's stop has a Ctrl-C's status (trainer.main: 130, and the process then ends by SIGINT); SIGTERM's is 0
    assert res.returncode == (130 if mode == "int" else 0), res.stderr[-2000:]
    assert "stopped by signal" in res.stdout
    again = "; Ctrl-C again quits at once, without one" if mode == "int" else ""
    assert f"train: stop requested: finishing the step, then a checkpoint{again}\n" in res.stderr
    assert "Traceback" not in res.stderr
    assert _final_weights(tmp_path)[0] == "step_00000005"
    subprocess.run(_run(tmp_path, "--max-steps", "12", "--resume", "auto"), check=True, env=ENV, capture_output=True)
    _assert_same_run(tmp_path, reference_run)


def test_a_stop_inside_a_gradient_accumulation_rewinds_to_the_last_step(tmp_path):
    # --grad-accum 2, the stall at micro-batch 6: steps 1-2 used batches 1-4, batch 5 was half of step 3. The
    # checkpoint is step 2 and its data position batch 4, so the resume reads batch 5 again; the result must be
    # the uninterrupted run's.
    ref = tmp_path / "ref"
    subprocess.run(_run(ref, "--max-steps", "4", "--grad-accum", "2"), check=True, env=ENV, capture_output=True)
    out = tmp_path / "run"
    res = _stalled(out, "term", 6, "--max-steps", "4", "--grad-accum", "2")
    assert res.returncode == 0, res.stderr[-2000:]
    state = json.loads((out / "checkpoints" / "step_00000002" / "trainer_state.json").read_text())
    assert (state["step"], state["batch_in_epoch"]) == (2, 4)
    res = subprocess.run(_run(out, "--max-steps", "4", "--grad-accum", "2", "--resume", "auto"), check=True,
                         env=ENV, capture_output=True, text=True)
    # the pass over is said up front: on a large set it can take a while, with a still progress bar
    assert (f"resumed from {out / 'checkpoints' / 'step_00000002'} at step 2; epoch 0's first 4 batches are passed "
            "over first, to go on with the data of an uninterrupted run\n") in res.stderr
    (na, wa), (nb, wb) = _final_weights(out), _final_weights(ref)
    assert na == nb == "step_00000004"
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_a_loader_worker_that_dies_is_one_line_after_a_checkpoint(tmp_path, reference_run):
    # Before: torch's 55-line traceback, exit 1 and no checkpoint, although the weights were intact.
    res = _stalled(tmp_path, "die", 6, "--max-steps", "12")
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1] == (
        "error: DataLoader worker (pid 4242) is killed by signal: Killed.: a data-loader worker died (often the "
        "out-of-memory killer); checkpoint at step 5: resume with --resume auto (with the same --workers, which "
        "split the epoch; if memory ran out, free some first)")
    # Dying again before a step of the resumed run: its checkpoint is kept as it is (it was rewritten, with this
    # run's settings, by a delete-then-rename that a SIGKILL could cut)
    state = tmp_path / "checkpoints" / "step_00000005" / "trainer_state.json"
    before = state.read_bytes()
    res = _stalled(tmp_path, "die", 1, "--max-steps", "12", "--resume", "auto", "--lr", "5e-4")
    assert res.returncode == 2 and "checkpoint at step 5" in res.stderr.strip().splitlines()[-1]
    assert state.read_bytes() == before
    subprocess.run(_run(tmp_path, "--max-steps", "12", "--resume", "auto"), check=True, env=ENV, capture_output=True)
    _assert_same_run(tmp_path, reference_run)


def test_resumed_from_another_folder_a_stop_writes_the_checkpoint_into_out(tmp_path):
    # --resume PATH into a new --out (what check_out advises): the resumed checkpoint counted as saved, so a worker
    # death or a stop before the first step left no checkpoint in --out, and the advice given lost the run.
    subprocess.run(_run(tmp_path / "a", "--max-steps", "3"), check=True, env=ENV, capture_output=True)
    src = tmp_path / "a" / "checkpoints" / "step_00000003"
    for mode, out in (("die", tmp_path / "b"), ("term", tmp_path / "c")):
        res = _stalled(out, mode, 1, "--max-steps", "12", "--resume", str(src))
        assert (out / "checkpoints" / "step_00000003" / "trainer_state.json").exists(), (mode, res.stderr[-2000:])


def test_a_stop_asked_while_computing_does_not_start_the_next_read(tmp_path):
    # --grad-accum 2, SIGTERM during micro-batch 5 (half of step 3), and the read of batch 6 stalls for a minute:
    # it used to be started and waited out (33.5 s for a 30-s stall).
    import time

    t0 = time.monotonic()
    res = _stalled(tmp_path, "term_compute", 5, "--max-steps", "12", "--grad-accum", "2")
    assert time.monotonic() - t0 < 45, "the 60-s stall was waited out"
    assert res.returncode == 0 and "done: step 2 (stopped by signal" in res.stdout, res.stderr[-2000:]
    state = json.loads((tmp_path / "checkpoints" / "step_00000002" / "trainer_state.json").read_text())
    assert (state["step"], state["batch_in_epoch"]) == (2, 4)


@pytest.mark.parametrize("at, steps", [(8, [5, 7]), (9, [5, 8])])
def test_a_stop_in_a_data_wait_logs_the_steps_since_the_last_row(tmp_path, at, steps):
    # --log-every 5, stopped while waiting for batch 8: steps 6-7 were in no row before, nor in the resumed run's.
    # Waiting for batch 9, the first of epoch 1 (8 batches per epoch): steps 6-8 ran in epoch 0, as the row says.
    res = _stalled(tmp_path, "term", at, "--max-steps", "12", "--log-every", "5")
    assert res.returncode == 0, res.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "history.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == steps and [r["epoch"] for r in rows] == [0, 0]
    assert "(stopped by signal, checkpoint written), loss" in res.stdout and "(at step" not in res.stdout


def test_a_second_ctrl_c_quits_at_once_in_one_line(tmp_path):
    res = _stalled(tmp_path, "int2", 3, "--max-steps", "12")
    assert res.returncode == 130
    assert "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1] == (
        "train: interrupted again: quit at once, without a checkpoint of this step; no checkpoint was written yet "
        "(--ckpt-every): nothing to resume; start again in a new --out (or delete its history.jsonl and tb/ first)")
    res = _stalled(tmp_path / "b", "int2", 5, "--max-steps", "12", "--ckpt-every", "2")  # one at step 4 exists
    assert res.returncode == 130 and res.stderr.strip().splitlines()[-1] == (
        "train: interrupted again: quit at once, without a checkpoint of this step; the last checkpoint "
        "(step_00000004) is kept: --resume auto continues from it")


def test_ctrl_c_during_start_up_is_one_line(tmp_path):
    res = _stalled(tmp_path, "startup", 0, "--max-steps", "2")
    assert res.returncode == 130
    assert "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1] == "train: interrupted while starting: nothing was trained"
    assert not (tmp_path / "checkpoints").exists()


@contextlib.contextmanager
def _trainer_signal_handlers(tmp_path):
    """A tiny Trainer with its SIGINT/SIGTERM handlers installed: yields (trainer, its handler, the handlers it
    replaced); the process's own handlers are back afterwards, whatever the test did."""
    import signal

    from matpac_fast.trainer import Trainer

    trainer = Trainer(resolve([*TINY, "--out", str(tmp_path / "run"), "--max-steps", "1"])[0])
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        trainer._install_signal_handlers()
        yield trainer, signal.getsignal(signal.SIGTERM), saved
    finally:
        for s, h in saved.items():
            signal.signal(s, h)


def test_a_second_sigint_is_the_callers_sigterm_stays_graceful(tmp_path):
    import signal

    with _trainer_signal_handlers(tmp_path) as (trainer, handler, saved):
        handler(signal.SIGTERM, None)
        handler(signal.SIGTERM, None)  # a launcher and Slurm may both send it: still graceful
        assert trainer._stop_requested and signal.getsignal(signal.SIGTERM) is handler
        assert signal.getsignal(signal.SIGINT) is handler
        handler(signal.SIGINT, None)
        # the next Ctrl-C is the caller's: a KeyboardInterrupt (main says so in one line; a notebook keeps its kernel)
        assert signal.getsignal(signal.SIGINT) is saved[signal.SIGINT]


def test_a_run_that_ignores_ctrl_c_from_the_start_keeps_ignoring_it(tmp_path):
    # `train.py &` in a script: the shell starts it with SIGINT ignored, so that the terminal's Ctrl-C stops the
    # script, not the background run. The trainer's handler replaced that, and the Ctrl-C stopped the run too.
    import signal

    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with _trainer_signal_handlers(tmp_path) as (trainer, handler, saved):
            assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) is handler  # SIGTERM still stops it gracefully
            handler(signal.SIGTERM, None)
            assert trainer._stop_requested and signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, old)


def test_a_new_epoch_counts_the_last_ones_skipped_shards_before_its_first_batch(tmp_path):
    # The finished epoch's count was added inside the new epoch's first read: a stop landing before it checkpointed
    # (epoch + 1, batch 0) without that epoch's skipped shards.
    from types import SimpleNamespace

    from matpac_fast.trainer import Trainer

    data = Trainer(resolve([*TINY, "--out", str(tmp_path / "run"), "--max-steps", "1"])[0]).data
    data._loader = SimpleNamespace(skipped_shards=3)  # as the finished epoch's loader leaves it
    it = data.epoch(1)  # not read yet
    assert data.skipped_before_resume_point(epoch_done=False) == 3 and data.skipped_shards() == 3
    it.close()


def test_a_ctrl_c_while_the_loader_stops_its_workers_reaches_the_caller(tmp_path, monkeypatch):
    # A second Ctrl-C while the epoch's loader stopped its workers (joined in its generator's `finally`) was raised
    # in a generator finalised by the garbage collector: "Exception ignored in: <generator ...>" and a traceback, the
    # Ctrl-C lost and the run went on to its checkpoint instead of quitting at once.
    import matpac_fast.data as D
    from matpac_fast.trainer import Trainer

    class Loader:
        skipped_shards = 0

        def __iter__(self):
            try:
                yield {"lms": torch.zeros(1)}
                yield {"lms": torch.zeros(1)}
            finally:
                raise KeyboardInterrupt  # as when the second Ctrl-C lands in the workers' join

    data = Trainer(resolve([*TINY, "--out", str(tmp_path / "run"), "--max-steps", "1"])[0]).data
    monkeypatch.setattr(D, "make_loader", lambda *a, **k: Loader())
    it = data.epoch(0)
    next(it)
    with pytest.raises(KeyboardInterrupt):
        it.close()


def test_an_epoch_ending_inside_an_accumulation_leaves_its_losses_out_of_the_next_row(tmp_path, monkeypatch):
    # --grad-accum 2 and an epoch that gives 5 batches: the 5th is never stepped (drop_last at step level). Its loss
    # stayed in the running sums, so the next row (step 3) averaged 3 micro-batches, one of them never trained on.
    from matpac_fast import trainer as T

    inner_epoch, inner_step, losses = T.TrainData.epoch, T.Trainer.micro_step, []

    def epoch(self, e, skip=0):
        it = inner_epoch(self, e, skip=skip)
        return (b for i, b in enumerate(it) if e > 0 or i < 5)

    def micro_step(self, lms):
        loss, stats = inner_step(self, lms)
        losses.append(float(loss.detach()))
        return loss, stats

    monkeypatch.setattr(T.TrainData, "epoch", epoch)
    monkeypatch.setattr(T.Trainer, "micro_step", micro_step)
    cfg, _ = resolve([*TINY, "--out", str(tmp_path / "run"), "--max-steps", "3", "--grad-accum", "2"])
    rows = {r["step"]: r for r in T.Trainer(cfg).train()["history"]}
    assert len(losses) == 7  # steps 1-2: 4 micro-batches, the 5th dropped, step 3: 2 more
    assert rows[3]["loss"] == pytest.approx((losses[5] + losses[6]) / 2, rel=1e-6)


def test_resume_past_max_steps_keeps_the_checkpoint_and_says_so(tmp_path):
    # Before: silent, and the checkpoint was rewritten with the new --max-steps in its config.
    subprocess.run(_run(tmp_path, "--max-steps", "3"), check=True, env=ENV, capture_output=True)
    state = tmp_path / "checkpoints" / "step_00000003" / "trainer_state.json"
    before = state.read_bytes()
    res = subprocess.run(_run(tmp_path, "--max-steps", "2", "--resume", "auto"), env=ENV, capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    assert ("note: the checkpoint is at step 3 and this run ends at step 2 (--max-steps / --epochs): nothing to "
            "train; the checkpoint is kept as it is and encoder.pt is written again") in res.stderr
    assert state.read_bytes() == before
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_00000003"]


def _tensorboard_steps(out, tag="train/loss") -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(Path(out) / "tb"))
    acc.Reload()
    return [e.step for e in acc.Scalars(tag)]


def test_sigkill_after_checkpoint_then_resume(tmp_path, reference_run):
    args = ("--max-steps", "12", "--ckpt-every", "3", "--keep-last", "2", "--resume", "auto")
    res = _signalled(tmp_path, "KILL", 8, *args)  # checkpoints at 3 and 6, killed during step 8's bookkeeping
    assert res.returncode == -9
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000003", "step_00000006"]
    assert max(_trace(tmp_path)) == 7  # the trace so far: step 7 logged after the last checkpoint, step 8 never
    subprocess.run(_run(tmp_path, *args), check=True, env=ENV, capture_output=True)  # the same command again
    _assert_same_run(tmp_path, reference_run)
    assert len(list((tmp_path / "checkpoints").iterdir())) <= 2  # keep-last pruned the rest
    # Step 7 was redone: history.jsonl and TensorBoard hold each step once (the killed run's step 7 is gone).
    steps = [json.loads(line)["step"] for line in (tmp_path / "history.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 13))
    assert _tensorboard_steps(tmp_path) == list(range(1, 13))


def _two_processes(out, port, *extra, **env):
    """tests/helpers/dist_train_worker.py under torchrun, 2 gloo processes; returns both ranks' dumps."""
    torchrun = Path(PY).parent / "torchrun"
    cmd = [str(torchrun), "--nproc_per_node", "2", "--master_port", str(port),
           str(ROOT / "tests" / "helpers" / "dist_train_worker.py"), *TINY, "--cpu", "true", "--out", str(out), *extra]
    res = subprocess.run(cmd, env={**ENV, **env}, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    r0, r1 = (torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["world"] == r1["world"] == 2
    return r0, r1


def _assert_same_weights(r0, r1):
    assert r0["state"].keys() == r1["state"].keys()
    for k in r0["state"]:
        assert torch.equal(r0["state"][k], r1["state"][k]), k


def test_grad_accum_that_does_not_divide_an_epoch_trains_whole_epochs(tmp_path):
    # 8 batches per epoch, --grad-accum 3: 2 steps per epoch from batches 1-6, batches 7-8 dropped (before the fix they
    # were carried into the next epoch's first step, and 3 epochs' 6 steps ended two batches into the third epoch).
    from matpac_fast.checkpoint import read_state

    args = ("--grad-accum", "3", "--epochs", "3", "--ckpt-every", "2", "--keep-last", "5")
    ref, out = tmp_path / "ref", tmp_path / "resumed"
    subprocess.run(_run(ref, *args), check=True, env=ENV, capture_output=True)
    rows = [json.loads(line) for line in (ref / "history.jsonl").read_text().splitlines()]
    assert [(r["step"], r["epoch"]) for r in rows] == [(1, 0), (2, 0), (3, 1), (4, 1), (5, 2), (6, 2)]
    states = [read_state(p) for p in sorted((ref / "checkpoints").iterdir())]
    assert [(s["step"], s["epoch"], s["batch_in_epoch"]) for s in states] == [(2, 0, 6), (4, 1, 6), (6, 2, 6)]
    # Resumed from the checkpoint at the end of epoch 0, the run goes on with epoch 1 (not epoch 0's dropped batches).
    subprocess.run(_run(out, *args, "--max-steps", "2"), check=True, env=ENV, capture_output=True)
    res = subprocess.run(_run(out, *args, "--resume", "auto"), check=True, env=ENV, capture_output=True, text=True)
    assert "at step 2 (changed: --max-steps 2 -> 0)\n" in res.stderr  # at an epoch's end nothing is read again
    assert _trace(out) == _trace(ref)
    (name_a, wa), (name_b, wb) = _final_weights(out), _final_weights(ref)
    assert name_a == name_b == "step_00000006"
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_two_process_gloo_run_keeps_ranks_identical(tmp_path):
    r0, r1 = _two_processes(tmp_path, 29517, "--max-steps", "3", SKIPPED_SHARDS_RANK="1")
    _assert_same_weights(r0, r1)
    # The authors' probability centre starts at 0 and moves by 0.1 x (the global batch's mean probability row), which
    # sums to 1: after 3 steps it sums to 1 - 0.9^3. A sum over ranks instead of the mean would give twice that.
    assert r0["state"]["center"].sum().item() == pytest.approx(1 - 0.9**3, abs=1e-5)
    assert torch.isfinite(r0["losses"]).all() and torch.isfinite(r1["losses"]).all()
    # The logged loss is the global batch's mean (METHOD.md §4.8), not rank 0's: with one micro-batch per step and a
    # row per step, the mean of the two ranks' own losses (on every rank; rank 0's alone before the fix).
    assert len(r0["local"]) == len(r1["local"]) == 3
    torch.testing.assert_close(r0["losses"], (r0["local"] + r1["local"]) / 2, rtol=1e-6, atol=0)
    assert torch.equal(r0["losses"], r1["losses"])
    assert r0["skipped_shards"] == r1["skipped_shards"] == [1, 1, 1]  # rank 1's skipped shard counts (a sum)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_00000003"]
    # every rank's RNG state landed in the published checkpoint (no rank still writing into step_X.tmp)
    rng = sorted(p.name for p in (tmp_path / "checkpoints" / "step_00000003").glob("random_states_*.pkl"))
    assert rng == ["random_states_0.pkl", "random_states_1.pkl"]


def test_two_process_resume_matches_the_uninterrupted_run(tmp_path):
    """A 2-process run stopped after 2 of 4 optimizer steps (grad-accum 2) and resumed with --resume auto ends with
    the weights, teacher and centre of the 2-process run that was never stopped, bit for bit, and logs the same
    losses for the steps after the resume (the exact-resume tests above run one process)."""
    ref, out = tmp_path / "ref", tmp_path / "resumed"
    r0, _ = _two_processes(ref, 29531, "--grad-accum", "2", "--max-steps", "4")
    _two_processes(out, 29532, "--grad-accum", "2", "--max-steps", "2")
    s0, s1 = _two_processes(out, 29533, "--grad-accum", "2", "--max-steps", "4", "--resume", "auto")
    assert s0["steps"] == [3, 4] and r0["steps"] == [1, 2, 3, 4]
    assert torch.equal(s0["losses"], r0["losses"][2:])
    _assert_same_weights(s0, r0)
    _assert_same_weights(s1, r0)


def _resume_check_worker(rank: int, steps: tuple[int, int], init: str, result: Path) -> None:
    import torch.distributed as dist

    from matpac_fast.trainer import _check_same_resume

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        _check_same_resume(steps[rank], Path("runs/x"), torch.device("cpu"))
        result.write_text("ok")
    except ValueError as e:
        result.write_text(str(e))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("steps, expect", [
    ((4, 4), "ok"), ((-1, -1), "ok"),
    ((4, -1), "the processes found different checkpoints to resume (no checkpoint, step 4) in --out runs/x: --out "
              "must be one folder every machine reads and writes (a shared file system), not a local path on each"),
    ((6, 4), "the processes found different checkpoints to resume (step 4, step 6) in --out runs/x: "),
])
def test_processes_that_would_resume_from_different_checkpoints_all_stop_in_one_line(tmp_path, steps, expect):
    """Each rank reads --resume auto in its own view of --out: with a local --out per machine, a rank that saw no
    checkpoint started over beside ranks that resumed, trained on without a word and hung at a collective (found by
    review). Every rank now compares its step with the others' at start and all stop with the same line."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    init = f"file://{tmp_path / 'rendezvous'}"
    procs = [ctx.Process(target=_resume_check_worker, args=(r, steps, init, tmp_path / f"r{r}.txt")) for r in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    got = [(tmp_path / f"r{r}.txt").read_text() for r in (0, 1)]
    assert got[0] == got[1] and got[0].startswith(expect), got


def test_one_rank_non_finite_loss_is_skipped_by_every_rank(tmp_path):
    # Rank 1's loss is +inf in optimizer step 2 (0-based 1) while the all-reduced gradients stay finite: the skip is
    # decided from the global loss, so both ranks skip it (before the fix only rank 1 did and the weights parted).
    r0, r1 = _two_processes(tmp_path, 29518, "--max-steps", "3", INF_RANK="1", INF_STEP="1")
    _assert_same_weights(r0, r1)
    assert r0["nonfinite_total"] == r1["nonfinite_total"] == 1.0
    assert r0["skipped_steps"] == r1["skipped_steps"] == [0, 1, 1]
    assert r0["steps"] == [1, 2, 3] and not torch.isfinite(r0["losses"][1]) and torch.isfinite(r0["losses"][2])


def test_compiled_step_matches_eager():
    from matpac_fast.config import get_model_config
    from matpac_fast.masking import make_masks
    from matpac_fast.model import MATPAC, StepState

    cfg = get_model_config("tiny", depth=1, pred_depth=1)
    torch.manual_seed(0)
    model = MATPAC(cfg)
    lms = torch.randn(4, 1, 80, 608) * 4 - 7
    vis, mask = make_masks(4, cfg.n_patches, cfg.n_visible, generator=torch.Generator().manual_seed(1))
    batch = {"lms": lms, "vis_idx": vis, "mask_idx": mask}
    step = StepState(tau_t=torch.tensor(0.05), mcl_temperature=torch.tensor(0.1))

    def loss_and_grads(m):
        for p in model.parameters():
            p.grad = None
        loss, _ = m(batch, step)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.student_parameters()]

    eager_loss, eager_grads = loss_and_grads(model)
    comp_loss, comp_grads = loss_and_grads(torch.compile(model))
    torch.testing.assert_close(comp_loss, eager_loss, rtol=1e-5, atol=1e-6)
    for a, b in zip(comp_grads, eager_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_nonfinite_losses_abort_with_clear_message(tmp_path, capsys):
    # An absurd learning rate makes the loss non-finite within a few steps; each such step is skipped and counted.
    rc = main([*TINY, "--out", str(tmp_path), "--max-steps", "40", "--lr", "1e30", "--max-nonfinite", "2",
               "--clip-grad", "0"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "consecutive non-finite losses" in err and "--lr" in err
    # history.jsonl stays strict JSON (jq, JavaScript): the skipped steps' losses are null, not a bare NaN.
    def refuse(name):
        raise AssertionError(f"history.jsonl holds {name}")

    rows = [json.loads(line, parse_constant=refuse) for line in (tmp_path / "history.jsonl").read_text().splitlines()]
    skipped = [r for r in rows if r["loss"] is None]
    assert skipped and all(r["skipped_steps"] >= 1 for r in skipped)
    assert all(isinstance(r["lr"], float) for r in rows)


@pytest.mark.parametrize("ckpt_every", ["0", "1"])
def test_nonfinite_abort_advice_fits_what_exists_and_what_was_used(tmp_path, capsys, ckpt_every):
    # The line said "resume from an earlier checkpoint ... or start a new run with --precision bf16" with no
    # checkpoint in --out and with --precision no already (the tiny recipe).
    rc = main([*TINY, "--out", str(tmp_path), "--max-steps", "40", "--lr", "1e30", "--max-nonfinite", "2",
               "--clip-grad", "0", "--ckpt-every", ckpt_every])
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2 and line.startswith("error: 2 consecutive non-finite losses at step ")
    assert "--precision" not in line and "--clip-grad > 0" in line
    if ckpt_every == "0":
        assert "there is no checkpoint to resume: start a new run with a lower --lr" in line
        assert f"delete {tmp_path / 'history.jsonl'} and {tmp_path / 'tb'}" in line and "--resume" not in line
    else:
        assert "resume with a lower --lr" in line and "--resume auto --lr X continues from step_" in line


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "--shards is required"),
        (["--shards", "/nonexistent/shards"], "--shards /nonexistent/shards: no such directory"),
        (["--shards", "synthetic:64", "--batch-size", "0"], "--batch-size must be > 0"),
        (["--shards", "synthetic:64", "--model", "nope=1"], "--model nope: unknown model field"),
        (["--shards", "synthetic:64", "--model", "alpha"], "expected KEY=VALUE"),
        (["--shards", "synthetic:64", "--warmup-epochs", "400"], "--warmup-epochs"),
        # its table of virtual shards was built first: a MemoryError traceback (found by review)
        (["--shards", "synthetic:1000000000000", "--recipe", "tiny"],
         "'synthetic:1000000000000': at most synthetic:1000000000 clips"),
    ],
)
def test_bad_options_are_one_line_errors(argv, message, capsys, tmp_path):
    assert main([*argv, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_recipes_resolve():
    cfg, _ = resolve(["--shards", "synthetic:64"])
    assert (cfg.optim.lr, cfg.optim.beta2, cfg.optim.weight_decay, cfg.optim.clip_grad) == (3e-4, 0.95, 0.05, 3.0)
    assert cfg.schedule.epochs == 300 and cfg.optim.warmup_epochs == 20 and cfg.run.precision == "bf16"
    tiny, _ = resolve(["--recipe", "tiny", "--shards", "synthetic:64", "--model", "alpha=1.0"])
    assert tiny.run.preset == "tiny" and tiny.model["alpha"] == 1.0 and tiny.model["ema_start"] == 0.99


def test_compile_mode_is_an_option_and_checked():
    from matpac_fast.train_config import validate

    cfg, _ = resolve(["--shards", "synthetic:64", "--compile", "step", "--compile-mode", "reduce-overhead"])
    assert (cfg.run.compile, cfg.run.compile_mode) == ("step", "reduce-overhead")
    cfg.run.compile_mode = "fastest"  # as a program building a TrainConfig might
    with pytest.raises(ValueError, match="--compile-mode 'fastest': choose one of default, reduce-overhead"):
        validate(cfg)


@pytest.mark.parametrize("scope", ["step", "block"])
@pytest.mark.parametrize("mode, expect", [
    ("default", {}),
    ("reduce-overhead", {"mode": "reduce-overhead"}),
    ("gemm-autotune", {"options": {"max_autotune_gemm": True, "coordinate_descent_tuning": False,
                                   "triton.cudagraphs": True}}),
])
def test_compile_mode_reaches_torch_compile(tmp_path, monkeypatch, scope, mode, expect):
    """Each --compile-mode becomes torch.compile's arguments, for the whole step or each block; "gemm-autotune" is
    inductor options (torch.compile takes a mode or options, not both), the others its own modes."""
    from torch import nn

    from matpac_fast.trainer import Trainer

    calls = []
    monkeypatch.setattr(torch, "compile", lambda model, **kw: calls.append(kw) or model)
    monkeypatch.setattr(nn.Module, "compile", lambda self, **kw: calls.append(kw))
    argv = [*TINY, "--out", str(tmp_path / "run"), "--max-steps", "1", "--compile", scope, "--compile-mode", mode]
    Trainer(resolve(argv)[0])
    assert calls and all(kw == expect for kw in calls), calls
    assert len(calls) == (1 if scope == "step" else 3)  # depth=1, pred_depth=1: student, teacher, predictor block


def test_a_compiled_run_compiles_the_teacher_ema_too(tmp_path, monkeypatch):
    """--compile block or step also compiles the teacher's compensated EMA (one pass over the weights, not six:
    benchmarks/ema.py); --compile off keeps it eager. torch.compile is stubbed out: this is the wiring."""
    from torch import nn

    from matpac_fast import ema
    from matpac_fast.trainer import Trainer

    seen, real = [], ema.ema_update
    monkeypatch.setattr(torch, "compile", lambda model, **kw: model)
    monkeypatch.setattr(nn.Module, "compile", lambda self, **kw: None)
    monkeypatch.setattr(ema, "ema_update", lambda *a, compiled=False, **kw: seen.append(compiled) or real(*a, **kw))
    for scope in ("off", "block", "step"):
        Trainer(resolve([*TINY, "--out", str(tmp_path / scope), "--max-steps", "1", "--compile", scope])[0]).train()
    # two calls a step (encoder, head) with a residual each
    assert seen == [False, False, True, True, True, True], seen


def test_every_compile_mode_is_one_torch_compile_accepts():
    """torch.compile checks mode names and inductor option names when it is called (a misspelled option is a
    RuntimeError), so each mapping is checked against torch itself, not only against the table it came from."""
    from torch import nn

    from matpac_fast.train_config import COMPILE_MODES, compile_kwargs

    for mode in COMPILE_MODES:
        torch.compile(nn.Linear(2, 2), **compile_kwargs(mode))
    with pytest.raises(RuntimeError):  # the check this relies on
        torch.compile(nn.Linear(2, 2), options={"max_autotune_gemmz": True})
    with pytest.raises(ValueError, match="compile mode 'fastest': use one of default, reduce-overhead"):
        compile_kwargs("fastest")


def test_inductor_options_are_read_as_their_types_and_join_the_compile_mode():
    """--inductor KEY=VALUE: each value read as the option's declared type (bool | None read "off" as the string
    "off", i.e. true, and str | None "90" as the int 90, before); a torch mode given with them becomes the options
    it stands for, which torch.compile then takes (it takes a mode or options, not both)."""
    from torch import nn

    from matpac_fast.train_config import check_inductor_options, compile_kwargs, inductor_text, parse_inductor_options

    opts = parse_inductor_options(["keep_addmm_fused_for_half_dtypes=False", "triton.cudagraphs=true",
                                   " max_autotune_gemm_backends = ATEN,TRITON", "autotune_remote_cache=none"])
    assert opts == {"keep_addmm_fused_for_half_dtypes": False, "triton.cudagraphs": True,
                    "max_autotune_gemm_backends": "ATEN,TRITON", "autotune_remote_cache": None}
    typed = parse_inductor_options(["fx_graph_remote_cache=off", "cuda.arch=90", "autotune_num_choices_displayed=none",
                                    "cpp.simdlen=8", "max_autotune_gemm_search_space=EXHAUSTIVE", "memory_pool=none"])
    assert typed == {"fx_graph_remote_cache": False, "cuda.arch": "90", "autotune_num_choices_displayed": None,
                     "cpp.simdlen": 8, "max_autotune_gemm_search_space": "EXHAUSTIVE", "memory_pool": "none"}
    assert [type(v) for v in typed.values()] == [bool, str, type(None), int, str, str]
    check_inductor_options({**opts, **typed})  # what the flag reads passes torch.compile's own check (no re-check)
    assert inductor_text({"a": False, "b.c": 3}) == ["a=False", "b.c=3"]
    assert parse_inductor_options([]) == {}
    cd = {"coordinate_descent_tuning": True}
    assert compile_kwargs("reduce-overhead", cd) == {"options": {"triton.cudagraphs": True, **cd}}
    assert compile_kwargs("default", cd) == {"options": cd}
    assert compile_kwargs("gemm-autotune", {"max_autotune_gemm": False}) == {"options": {
        "max_autotune_gemm": False, "coordinate_descent_tuning": False, "triton.cudagraphs": True}}  # given wins
    assert compile_kwargs("max-autotune-no-cudagraphs", cd)["options"]["max_autotune"] is True
    assert compile_kwargs("reduce-overhead", {}) == {"mode": "reduce-overhead"}  # unchanged without options
    for mode in ("default", "reduce-overhead", "max-autotune-no-cudagraphs", "gemm-autotune"):
        torch.compile(nn.Linear(2, 2), **compile_kwargs(mode, {"keep_addmm_fused_for_half_dtypes": False}))


@pytest.mark.parametrize("items, message", [
    (["coordinate_descent_tuning"], "--inductor 'coordinate_descent_tuning': expected KEY=VALUE"),
    (["keep_addmm_fused=false"], "--inductor keep_addmm_fused: not an Inductor option of torch "),
    (["coordinate_descent_tuning=maybe"], "--inductor coordinate_descent_tuning=maybe: expected true or false"),
    (["inductor_default_autotune_rep=1.5"], "--inductor inductor_default_autotune_rep=1.5: expected an integer"),
    (["cpp.simdlen=wide"], "--inductor cpp.simdlen=wide: expected an integer"),
    (["max_autotune_gemm_search_space=fast"], "--inductor max_autotune_gemm_search_space=fast: choose one of "
                                              "DEFAULT, EXHAUSTIVE"),
    (["post_grad_fusion_options={}"], "--inductor post_grad_fusion_options: its type is dict, which this flag "),
])
def test_inductor_option_errors_are_one_line(items, message):
    from matpac_fast.train_config import parse_inductor_options

    with pytest.raises(ValueError) as e:
        parse_inductor_options(items)
    assert str(e.value).startswith(message) and "\n" not in str(e.value), str(e.value)
    if "keep_addmm_fused=" in items[0]:
        assert str(e.value).endswith("(did you mean keep_addmm_fused_for_half_dtypes?)")


def test_inductor_options_built_in_code_are_checked_by_torchs_own_rule():
    """A TrainConfig built in code skips the command line's reading of values: validate() runs torch.compile's own
    option check (a misspelled name or a wrong type), as one line."""
    from matpac_fast.train_config import validate

    cfg, _ = resolve(["--shards", "synthetic:64", "--inductor", "coordinate_descent_tuning=true"])
    assert cfg.inductor == {"coordinate_descent_tuning": True} and cfg.to_dict()["inductor"] == cfg.inductor
    cfg.inductor = {"coordinate_descent_tuning": 1}
    with pytest.raises(ValueError, match="^--inductor: Unexpected type of attr coordinate_descent_tuning, got int"):
        validate(cfg)
    cfg.inductor = {"coordinate_descent_tunin": True}
    with pytest.raises(ValueError, match="^--inductor coordinate_descent_tunin: not an Inductor option"):
        validate(cfg)


@pytest.mark.parametrize("scope", ["step", "block"])
def test_inductor_options_reach_torch_compile(tmp_path, monkeypatch, scope):
    from torch import nn

    from matpac_fast import train_config
    from matpac_fast.trainer import Trainer

    calls = []

    def fake_compile(model, **kw):  # the options' check calls it on train_config._identity (compiling nothing)
        if model is not train_config._identity:
            calls.append(kw)
        return model

    monkeypatch.setattr(torch, "compile", fake_compile)
    monkeypatch.setattr(nn.Module, "compile", lambda self, **kw: calls.append(kw))
    argv = [*TINY, "--out", str(tmp_path / "run"), "--max-steps", "1", "--compile", scope, "--compile-mode",
            "reduce-overhead", "--inductor", "keep_addmm_fused_for_half_dtypes=false"]
    Trainer(resolve(argv)[0])
    expect = {"options": {"triton.cudagraphs": True, "keep_addmm_fused_for_half_dtypes": False}}
    assert calls and all(kw == expect for kw in calls), calls


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_step_masks_reach_the_gpu_without_waiting_for_its_queue(tmp_path, fresh_accelerate):
    """Each step's masks are drawn on the host and copied to the GPU; the call must return while a long kernel still
    runs (no host sync per step), with the host generator's masks, as on CPU. On an H200 (cb5dc27) this passed with
    the masks copied from pageable or from pinned memory, and failed with a torch.cuda.synchronize() planted in
    Trainer._masks."""
    from matpac_fast.masking import make_masks
    from matpac_fast.trainer import Trainer

    tr = Trainer(resolve([*TINY, "--out", str(tmp_path / "run"), "--cpu", "false"])[0])
    assert tr.device.type == "cuda"
    tr._masks(8, 0)  # first-call costs (allocations), outside the timed part
    torch.cuda.synchronize()
    torch.cuda._sleep(2_000_000_000)  # ~1 s of GPU time queued ahead of the copies
    vis, mask = tr._masks(8, 0)
    still_busy = not torch.cuda.current_stream().query()
    torch.cuda.synchronize()
    assert still_busy, "the mask copies waited for the GPU's queue"
    m = tr.model_cfg
    g = torch.Generator().manual_seed(hash((tr.cfg.run.seed, tr.step, 0, 0)) & 0x7FFFFFFF)
    ref_vis, ref_mask = make_masks(8, m.n_patches, m.n_visible, generator=g)
    assert vis.device.type == "cuda" and torch.equal(vis.cpu(), ref_vis) and torch.equal(mask.cpu(), ref_mask)


def test_model_input_shape_error_names_the_setting_to_change():
    from matpac_fast.config import get_model_config
    from matpac_fast.masking import make_masks
    from matpac_fast.model import MATPAC

    cfg = get_model_config("tiny", n_mels=64, depth=1, pred_depth=1)
    model = MATPAC(cfg)
    vis, mask = make_masks(2, cfg.n_patches, cfg.n_visible)
    with pytest.raises(ValueError) as e:
        model._check_batch(torch.zeros(2, 1, 80, cfg.crop_frames), vis, mask)
    assert "80 mel bins" in str(e.value) and "n_mels=64" in str(e.value) and "--model n_mels" in str(e.value)
    with pytest.raises(ValueError) as e:
        model._check_batch(torch.zeros(2, 1, 64, cfg.crop_frames - 16), vis, mask)
    assert f"crop_frames={cfg.crop_frames}" in str(e.value) and "--model crop_frames=" in str(e.value)
    assert "\n" not in str(e.value)


def test_ema_after_step_n_uses_the_decay_of_update_n_plus_1(tmp_path):
    # The authors' EMA runs in forward at update n+1 with decay(n+1) (schedules.py); ours runs after optimizer step n
    # and must use the same index (with decay(n) this test fails: the tiny recipe's schedule moves fast).
    from matpac_fast.trainer import Trainer

    cfg, _ = resolve([*TINY, "--out", str(tmp_path / "run"), "--max-steps", "3"])
    trainer = Trainer(cfg)
    (t_enc, s_enc), _ = trainer.raw_model.ema_pairs()
    before = [t.detach().clone() for t in t_enc]
    lms = torch.randn(8, 1, 80, 608) * 4 - 7
    trainer.micro_step(lms)
    assert trainer.step == 1
    d1, d0 = trainer.sched["ema"][1], trainer.sched["ema"][0]
    assert d1 != d0
    for t0, t, s in zip(before, t_enc, s_enc):
        torch.testing.assert_close(t, d1 * t0 + (1 - d1) * s.detach(), rtol=0, atol=1e-6)


# The tiny recipe's numbers, written out for the hand references below: --shards synthetic:64 at --batch-size 8 is 8
# optimizer steps per epoch; --epochs 10 gives 80 steps; --warmup-epochs 1 is 8 warm-up steps at --lr 1e-3;
# --tau-t-warmup-epochs 2 is 16 steps; AdamW betas (0.9, 0.95), eps 1e-6, weight decay 0.05 and clip 3.0 are the
# paper's (METHOD.md §5); EMA end-points 0.99 -> 0.999 (encoder) and 0.99 -> 1.0 (head), --ema-reference-batch 0.
TRAINED = ("cls_token", "patch_embed.", "student_encoder.", "predictor.", "student_head.")  # METHOD.md §3: θ, υ, ψ


def _tiny_lms(n: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(8, 1, 80, 608, generator=g) * 4 - 7 for _ in range(n)]


def _hand_lr(k: int) -> float:
    """The tiny recipe's lr at (0-based) step k: linear warm-up from 0 over 8 steps, then cosine to 0 at step 80."""
    return 1e-3 * k / 8 if k < 8 else 0.5 * 1e-3 * (1 + math.cos(math.pi * (k - 8) / (80 - 8)))


def test_optimizer_steps_are_a_clip_then_adamw_written_out(tmp_path):
    """Ten real optimizer steps (warm-up from lr 0 and the first cosine step; the clip at 3.0 binds in steps 0-5)
    against AdamW written out by hand on the gradients the backward left: clip by the global norm (torch's
    3 / (norm + 1e-6)), m and v with betas (0.9, 0.95), bias corrections 1 - beta^t, eps 1e-6 added to sqrt(v_hat)
    (torch's AdamW), weight decay 0.05 decoupled (p <- p (1 - lr wd)) on every trained parameter: METHOD.md §5 and
    OptimConfig exclude none, biases, LayerNorm gains, the CLS and mask tokens and the weight-norm gains included.
    Each step is applied by hand to the weights the trainer had before it, with m and v carried in float64."""
    from matpac_fast.trainer import Trainer

    trainer = Trainer(resolve([*TINY, "--out", str(tmp_path / "run"), "--max-steps", "10"])[0])
    model = trainer.raw_model
    named = [(n, p) for n, p in model.named_parameters() if n.startswith(TRAINED)]
    opt_params = [p for g in trainer.inner_optimizer.param_groups for p in g["params"]]
    assert sorted(map(id, opt_params)) == sorted(id(p) for _, p in named)  # the student's, no teacher weight
    assert any(p.ndim == 1 for _, p in named) and "predictor.mask_token" in dict(named)
    raw, seen = {}, []
    hooks = [p.register_post_accumulate_grad_hook(lambda p, n=n: raw.__setitem__(n, p.grad.detach().double().clone()))
             for n, p in named]
    hooks.append(trainer.inner_optimizer.register_step_pre_hook(
        lambda opt, args, kwargs: seen.append({n: p.grad.detach().double().clone() for n, p in named})))
    b1, b2, eps, wd, clip = 0.9, 0.95, 1e-6, 0.05, 3.0
    m = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in named}
    v = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in named}
    clipped_steps = 0
    try:
        for k, lms in enumerate(_tiny_lms(10)):
            before = {n: p.detach().double().clone() for n, p in named}
            raw.clear()
            seen.clear()
            trainer.micro_step(lms)
            assert trainer.step == k + 1 and len(raw) == len(named) and len(seen) == 1
            lr, t = _hand_lr(k), k + 1
            norm = math.sqrt(sum(float((g**2).sum()) for g in raw.values()))
            coef = min(1.0, clip / (norm + 1e-6))
            clipped_steps += coef < 1
            for n, p in named:
                g = raw[n] * coef
                torch.testing.assert_close(seen[0][n], g, rtol=1e-5, atol=1e-9, msg=f"step {k}: clipped grad of {n}")
                m[n] = b1 * m[n] + (1 - b1) * g
                v[n] = b2 * v[n] + (1 - b2) * g * g
                m_hat, v_hat = m[n] / (1 - b1**t), v[n] / (1 - b2**t)
                expected = before[n] * (1 - lr * wd) - lr * m_hat / (v_hat.sqrt() + eps)
                if k == 0:  # the warm-up starts at lr 0: the first update leaves every weight as it was
                    assert lr == 0.0 and torch.equal(p.detach().double(), before[n]), n
                # about 1 float32 ulp apart; dropping the decay of a LayerNorm gain (1.0) moves it by lr * wd >= 6e-6
                torch.testing.assert_close(p.detach().double(), expected, rtol=3e-7, atol=2e-8,
                                           msg=lambda s, n=n, k=k: f"step {k}, {n}: {s}")
    finally:
        for h in hooks:
            h.remove()
    assert clipped_steps >= 3  # the clip was exercised (the tiny model's first grad norms are about 5)


@pytest.mark.parametrize("ref_batch, kappa", [("0", 1), ("4", 2)])
def test_ema_teacher_encoder_and_head_follow_the_linear_decays_by_hand(tmp_path, ref_batch, kappa):
    """After optimizer step k (0-based) the teacher encoder and the teacher head are d*teacher + (1 - d)*student,
    the student being the one after that step and d the decay of update k + 1 (schedules.py), linear over all 80
    updates (METHOD.md §4.9): encoder 0.99 -> 0.999, head 0.99 -> 1.0, each raised to the power
    kappa = global batch / --ema-reference-batch (METHOD.md §5; 8 / 4 = 2). Matched by parameter name
    (teacher_encoder.X <- student_encoder.X, teacher_head.X <- student_head.X); the patch embedding, CLS and predictor
    have no teacher (the teacher reuses the student's embedding, METHOD.md §2)."""
    from matpac_fast.trainer import Trainer

    trainer = Trainer(resolve([*TINY, "--out", str(tmp_path / "run"), "--max-steps", "3",
                               "--ema-reference-batch", ref_batch])[0])
    model = trainer.raw_model
    teacher_names = {n.split(".")[0] for n, _ in model.named_parameters() if not n.startswith(TRAINED)}
    assert teacher_names == {"teacher_encoder", "teacher_head"}
    pairs = {"encoder": (model.teacher_encoder, model.student_encoder, 0.99, 0.999),
             "head": (model.teacher_head, model.student_head, 0.99, 1.0)}
    for k, lms in enumerate(_tiny_lms(3)):
        t0 = {key: {n: p.detach().double().clone() for n, p in t.named_parameters()} for key, (t, *_) in pairs.items()}
        trainer.micro_step(lms)
        for key, (teacher, student, start, end) in pairs.items():
            d = (start + (end - start) * (k + 1) / 80) ** kappa
            s1 = dict(student.named_parameters())
            num = den = 0.0
            for n, t in teacher.named_parameters():
                s = s1[n].detach().double()
                torch.testing.assert_close(t.detach().double(), d * t0[key][n] + (1 - d) * s, rtol=3e-7, atol=1e-9,
                                           msg=lambda msg, n=n, key=key, k=k: f"step {k}, teacher {key} {n}: {msg}")
                num += float(((t.detach().double() - s) * (t0[key][n] - s)).sum())
                den += float(((t0[key][n] - s) ** 2).sum())
            # the decay the update used, fitted over the whole module: a clear figure when it is the wrong one
            assert num / den == pytest.approx(d, abs=1e-7), (key, k)


def test_the_teacher_temperature_reaching_the_loss_is_the_warm_up_by_hand(tmp_path, monkeypatch):
    """The tau_t that the loss receives in each of 18 steps of a real training loop (two epoch boundaries): linear
    0.04 -> 0.07 over the first 2 epochs (16 steps), then 0.07 (METHOD.md §4.5); the forward of step k (0-based) uses
    the value of k, as the authors' forward at num_updates = k. tau_s stays 0.1. Captured at the loss function the
    model calls (a spy), not read from the schedule."""
    import matpac_fast.model as M
    from matpac_fast.trainer import Trainer

    real, taus = M.centered_softmax_xent_reference, []

    def spy(student_MK, teacher_MK, center_K, tau_s, tau_t, center_mode="prob"):
        taus.append((float(tau_s), float(tau_t)))
        return real(student_MK, teacher_MK, center_K, tau_s, tau_t, center_mode=center_mode)

    monkeypatch.setattr(M, "centered_softmax_xent_reference", spy)
    trainer = Trainer(resolve([*TINY, "--out", str(tmp_path / "run"), "--max-steps", "18", "--log-every", "100"])[0])
    assert trainer.train()["step"] == 18
    hand = [0.04 + (0.07 - 0.04) * k / 16 for k in range(16)] + [0.07, 0.07]
    assert len(taus) == 18
    assert [s for s, _ in taus] == [pytest.approx(0.1)] * 18
    assert [t for _, t in taus] == pytest.approx(hand, rel=1e-6, abs=0)


def _steps_on_fixed_clips(out, batch_size: int, grad_accum: int, steps: int = 3) -> dict[str, torch.Tensor]:
    """The weights after `steps` optimizer steps of a global batch of 16 fixed clips with fixed masks, given as
    micro-batches of `batch_size` (--grad-accum `grad_accum`)."""
    from accelerate.state import AcceleratorState, GradientState

    from matpac_fast.masking import make_masks
    from matpac_fast.trainer import Trainer

    AcceleratorState._reset_state(reset_partial_state=True)  # one Accelerator per process: this one's grad-accum
    GradientState._reset_state()
    trainer = Trainer(resolve([*TINY, "--out", str(out), "--batch-size", str(batch_size), "--grad-accum",
                               str(grad_accum)])[0])
    m = trainer.model_cfg
    clips = [torch.cat(_tiny_lms(2, seed=s)) for s in range(steps)]  # 16 clips a step
    masks = [make_masks(16, m.n_patches, m.n_visible, generator=torch.Generator().manual_seed(s)) for s in range(steps)]

    def rows(micro: int) -> slice:
        return slice(micro * batch_size, (micro + 1) * batch_size)

    trainer._masks = lambda b, micro: tuple(x[rows(micro)] for x in masks[trainer.step])  # the whole batch's rows
    for s in range(steps):
        for micro in range(grad_accum):
            trainer.micro_step(clips[s][rows(micro)])
    assert trainer.step == steps
    return {k: v.detach().clone() for k, v in trainer.raw_model.state_dict().items()}


def test_gradient_accumulation_is_the_step_of_the_whole_batch(tmp_path, fresh_accelerate):
    # The README's "8 x 256 accumulated is the paper's step": 2 micro-batches of 8 (--grad-accum 2) move the student,
    # teacher and centre as one batch of 16 does (the same clips and masks): the loss is scaled by 1/A and the
    # centre's statistic is the mean over the micro-batches (x processes), not their sum. Three steps: the first has
    # lr 0 (warm-up), the later ones move the weights.
    whole = _steps_on_fixed_clips(tmp_path / "whole", 16, 1)
    accumulated = _steps_on_fixed_clips(tmp_path / "accumulated", 8, 2)
    assert whole.keys() == accumulated.keys()
    for k in whole:
        torch.testing.assert_close(accumulated[k], whole[k], rtol=1e-4, atol=1e-6, msg=k)
    assert whole["center"].sum().item() == pytest.approx(1 - 0.9**3, abs=1e-5)


def test_dropping_a_partial_accumulation_clears_its_gradients(tmp_path):
    # Accelerate's optimizer wrapper ignores zero_grad mid-accumulation; the drop must still clear the grads, or they
    # would leak into the next epoch's first step.
    from matpac_fast.trainer import Trainer

    cfg, _ = resolve([*TINY, "--out", str(tmp_path / "run"), "--max-steps", "3", "--grad-accum", "3"])
    trainer = Trainer(cfg)
    trainer.micro_step(torch.randn(8, 1, 80, 608) * 4 - 7)
    params = trainer.raw_model.student_parameters()
    assert trainer._micro == 1 and any(p.grad is not None for p in params)
    trainer._drop_partial_accumulation()
    assert trainer._micro == 0 and all(p.grad is None for p in params)


@pytest.mark.parametrize(
    "short, lengths, expected",
    [
        # 100-frame clips padded to the tiny preset's 608-frame crop: 1 - 100/608 = 83.6 % padding, rounded down.
        ("pad", [100] * 16, "clips average 100 frames, the model's crop is 608: at least 83 % of each crop is padding; "
                            "--model crop_frames=96 fits the average clip (a multiple of the patch, 16)"),
        # Half 304, half 640 frames, dropped when shorter than 608: (608 - 472) / (608 - 304) = 44.7 %, a lower bound.
        # The shortest clip, 304 frames (19 patches), is the crop that keeps every clip: the loader's error (when no
        # clip reaches the crop) names the same figure, so the warning must name it too.
        ("drop", [304, 640] * 8, "clips average 472 frames, the model's crop is 608: at least 44 % of the clips are "
                                 "shorter and dropped; --model crop_frames=304 keeps every clip; "
                                 "--model crop_frames=464 fits"),
        ("pad", [640] * 16, None),  # clips longer than the crop: nothing padded, no warning
        ("drop", [608, 700] * 8, None),  # none shorter than the crop: nothing dropped
    ],
)
def test_clips_shorter_than_the_crop_are_a_warning_at_start(tmp_path, capsys, short, lengths, expected):
    import numpy as np

    from matpac_fast.data_fixtures import clip, write_shard_set
    from matpac_fast.trainer import Trainer

    rng = np.random.default_rng(0)
    shards = tmp_path / "shards"
    write_shard_set(shards, ((f"k{i:03d}", clip(rng, n), []) for i, n in enumerate(lengths)), per_shard=8,
                    short=short, min_frames=1)
    stats = json.loads((shards / "stats.json").read_text())
    (shards / "stats.json").write_text(json.dumps({**stats, "min_clip_frames": min(lengths)}))  # as make-shards
    argv = [*TINY, "--shards", str(shards), "--out", str(tmp_path / "run"), "--max-steps", "1"]
    Trainer(resolve(argv)[0])
    err = [line for line in capsys.readouterr().err.splitlines() if "crop" in line]
    if expected is None:
        assert err == []
    else:
        assert len(err) == 1 and err[0].startswith(f"warning: --shards {shards}: {expected}")


def test_resume_across_compile_scopes_and_of_prefixed_checkpoints(tmp_path, monkeypatch):
    """--compile is free to change on resume. The compiled wrapper's "_orig_mod." keys used to reach the checkpoint,
    so a --compile step checkpoint could not be loaded with off/block, nor an off one with step. Dynamo's eager
    backend stands in for inductor (the keys are the wrapper's either way)."""
    from safetensors.torch import save_file

    from matpac_fast.trainer import Trainer

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: real_compile(model, backend="eager"))
    out = tmp_path / "run"

    def train(*extra):
        t = Trainer(resolve([*TINY, "--out", str(out), *extra])[0])
        t.train()
        return t

    t = train("--max-steps", "2", "--compile", "step")
    assert isinstance(t.model, torch._dynamo.eval_frame.OptimizedModule)
    name, weights = _final_weights(out)
    assert name == "step_00000002" and not any(k.startswith("_orig_mod.") for k in weights)
    t = train("--max-steps", "3", "--compile", "off", "--resume", "auto")
    assert t.step == 3
    t = train("--max-steps", "4", "--compile", "step", "--resume", "auto")
    assert t.step == 4
    # a checkpoint written before the fix: every key prefixed; it loads (in place) into either scope
    last = out / "checkpoints" / "step_00000004" / "model.safetensors"
    plain = load_file(str(last))
    save_file({f"_orig_mod.{k}": v for k, v in plain.items()}, str(last))
    for scope, steps in (("off", "5"), ("step", "6")):
        resumed = Trainer(resolve([*TINY, "--out", str(tmp_path / f"from_old_{scope}"), "--max-steps", steps,
                                   "--compile", scope, "--resume", str(last.parent)])[0])  # fmt: skip
        resumed._maybe_resume()
        state = resumed.raw_model.state_dict()
        assert all(torch.equal(state[k], v) for k, v in plain.items())


def test_next_stop_check_is_about_five_seconds_ahead_within_one_and_log_every():
    from matpac_fast.trainer import _next_stop_check

    assert _next_stop_check(10, 4, 2.0, 1000) == 10 + 10  # 0.5 s a step: 10 steps
    assert _next_stop_check(10, 1, 60.0, 1000) == 11  # a slow step (start-up, a compile): the next one
    assert _next_stop_check(10, 100, 0.1, 50) == 60  # fast steps: never further apart than --log-every
    assert _next_stop_check(10, 0, 0.0, 50) == 60


def test_the_launcher_watch_is_set_before_the_heavy_imports():
    """The parent-death signal was asked for after torch, accelerate and the trainer were imported (seconds): a
    launcher killed then left the process orphaned and unaware (its parent already the reaper at both reads)."""
    code = ("import sys, matpac_fast.lifetime as L\n"
            "L.die_with_launcher = lambda: print('heavy:', sorted({'torch', 'accelerate', 'matpac_fast.trainer'} & "
            "set(sys.modules)))\n"
            "from matpac_fast.train_cli import main\n"
            "main(['--help'])\n")
    res = subprocess.run([PY, "-c", code], env=ENV, capture_output=True, text=True, timeout=120)
    assert res.stdout.startswith("heavy: []\n"), res.stdout[:300] + res.stderr[-2000:]


def test_a_stop_signal_during_the_agreement_is_kept_for_the_next_one(monkeypatch):
    """A signal handled as the stop all-reduce returns (one that arrived while a rank waited in it) was overwritten
    by the agreed value: every rank, waiting in the same call, could lose a torchrun/Slurm stop. It now stays
    requested, and the next agreement acts on it."""
    from types import SimpleNamespace

    import matpac_fast.trainer as T

    t = SimpleNamespace(accelerator=SimpleNamespace(num_processes=2), device="cpu", step=11, _stop_requested=False,
                        _stop_check_at=11, _stop_check_step=10, _stop_check_time=0.0,
                        cfg=SimpleNamespace(run=SimpleNamespace(log_every=50)))
    signalled = []

    def all_reduce(x, op=None):  # the handler runs as the call returns: after this rank's flag was sent
        if not signalled:
            signalled.append(True)
            t._stop_requested = True

    monkeypatch.setattr(T.dist, "all_reduce", all_reduce)
    assert T.Trainer._should_stop(t) is False and t._stop_requested  # not agreed yet, but not forgotten
    t.step = t._stop_check_at
    assert T.Trainer._should_stop(t) is True


def test_two_processes_agree_on_a_stop_within_seconds_not_at_the_next_log_step(tmp_path):
    # Before, the processes agreed on a stop only at log steps: with --log-every 1000, rank 1's SIGTERM at step 3 was
    # acted on at no step of the run (torchrun SIGKILLs 30 s after forwarding a stop: no checkpoint). Now they agree
    # about every 5 s of training: with steps of at least 0.25 s, within 20 steps.
    torchrun = Path(PY).parent / "torchrun"
    cmd = [str(torchrun), "--nproc_per_node", "2", "--master_port", "29519",
           str(ROOT / "tests" / "helpers" / "signal_train.py"), *TINY, "--cpu", "true", "--out", str(tmp_path),
           "--log-every", "1000", "--max-steps", "40"]
    env = {**ENV, "SIGNAL_NAME": "TERM", "SIGNAL_AT_STEP": "3", "SIGNAL_RANK": "1", "STEP_SLEEP": "0.25"}
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "stopped by signal" in res.stdout
    step = int(_final_weights(tmp_path)[0][5:])
    assert 3 <= step <= 3 + 20, step


def _children(pid: int) -> list[int]:
    tasks = Path(f"/proc/{pid}/task")
    return [int(c) for t in tasks.iterdir() for c in (t / "children").read_text().split()]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")  # an orphan's zombie waits for a reaper that may never come (a container)


def _wait_gone(pids: list[int], seconds: float) -> list[int]:
    import time

    deadline = time.monotonic() + seconds
    while any(map(_alive, pids)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return [p for p in pids if _alive(p)]


def _launch_in_background(out, log, port, *extra):
    """torchrun, 2 gloo processes of train.py, in the background; returns once history.jsonl has a row (training
    under way)."""
    import time

    torchrun = Path(PY).parent / "torchrun"
    cmd = [str(torchrun), "--nproc_per_node", "2", "--master_port", str(port), str(ROOT / "train.py"), *TINY,
           "--cpu", "true", "--out", str(out), "--epochs", "1000", *extra]
    proc = subprocess.Popen(cmd, env=ENV, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while not ((out / "history.jsonl").exists() and (out / "history.jsonl").read_text()):
        assert proc.poll() is None and time.monotonic() < deadline, Path(log.name).read_text()[-3000:]
        time.sleep(0.2)
    return proc


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_launcher_killed_with_sigkill_stops_its_processes_with_a_checkpoint(tmp_path):
    # torchrun starts its processes in sessions of their own: killed with SIGKILL, it left them training, orphaned,
    # still writing --out. Now they get SIGTERM when it dies: the graceful stop, a checkpoint, exit.
    out = tmp_path / "run"
    with open(tmp_path / "log", "w") as log:
        proc = _launch_in_background(out, log, 29520)
        ranks = _children(proc.pid)
        try:
            assert len(ranks) == 2
            proc.kill()
            proc.wait()
            assert _wait_gone(ranks, 40) == [], "the processes trained on after their launcher was killed"
        finally:
            for pid in ranks:
                with contextlib.suppress(OSError):
                    os.kill(pid, 9)
    assert list((out / "checkpoints").glob("step_*")), (tmp_path / "log").read_text()[-3000:]
    assert "stopped by signal, checkpoint written" in (tmp_path / "log").read_text()


@pytest.mark.parametrize("launched", [True, False])
def test_under_torchrun_a_sigterm_after_a_sigint_is_the_second_ctrl_c(tmp_path, monkeypatch, launched):
    # torchrun passes the first Ctrl-C on as SIGINT and the second as SIGTERM: that SIGTERM quits at once, as a
    # second Ctrl-C does without a launcher (before, it was one more graceful stop). Otherwise SIGTERM stays graceful.
    import signal

    if launched:
        monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    else:
        monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    with _trainer_signal_handlers(tmp_path) as (trainer, handler, _):
        handler(signal.SIGINT, None)
        if launched:
            with pytest.raises(KeyboardInterrupt):
                handler(signal.SIGTERM, None)
        else:
            handler(signal.SIGTERM, None)
        trainer._install_signal_handlers()  # a SIGTERM first, then another: graceful, launched or not
        handler = signal.getsignal(signal.SIGTERM)
        trainer._stop_requested = False
        handler(signal.SIGTERM, None)
        handler(signal.SIGTERM, None)
        assert trainer._stop_requested


def test_a_process_killed_outright_leaves_truthful_lines(tmp_path):
    # Rank 1 is SIGKILLed (the out-of-memory killer) at step 3: it prints nothing and no checkpoint can follow. Rank 0,
    # in a slow step (3 s), gets torchrun's SIGTERM before it meets the broken connection. Before, it said "stop
    # requested: finishing the step, then a checkpoint" and "another process failed (its error is printed above)".
    torchrun = Path(PY).parent / "torchrun"
    cmd = [str(torchrun), "--nproc_per_node", "2", "--master_port", "29521",
           str(ROOT / "tests" / "helpers" / "signal_train.py"), *TINY, "--cpu", "true", "--out", str(tmp_path),
           "--max-steps", "40"]
    env = {**ENV, "SIGNAL_NAME": "KILL", "SIGNAL_AT_STEP": "3", "SIGNAL_RANK": "1", "STEP_SLEEP": "3",
           "SLEEP_RANK": "0"}
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode != 0
    lines = res.stderr.splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert errors == ["error: process 0 stopped: another process failed (see its error, if any, and the launcher's "
                      "report); no checkpoint was written yet (--ckpt-every): nothing to resume; start again in a new "
                      "--out (or delete its history.jsonl and tb/ first)"], res.stderr[-3000:]
    stops = [line for line in lines if line.startswith("train: stop requested")]
    assert stops == ["train: stop requested: finishing the step, then a checkpoint if every process is still running"]


def _as_numpy_1_wrote_it(f: Path) -> None:
    """Rewrite Accelerate's random-state file `f` as under numpy 1.x: the same states, numpy's array reconstructor
    named numpy.core.multiarray._reconstruct (numpy 2 names it numpy._core...). Legacy torch.save format: a plain
    pickle stream, whose GLOBAL names are text."""
    import io

    from matpac_fast import checkpoint as ckpt

    with torch.serialization.safe_globals(ckpt._rng_safe_globals()):
        states = torch.load(f, map_location="cpu", weights_only=True)
    buf = io.BytesIO()
    torch.save(states, buf, _use_new_zipfile_serialization=False)
    raw = buf.getvalue()
    if b"numpy._core.multiarray" in raw:
        raw = raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    else:  # this test running under numpy 1.x: the other way round
        raw = raw.replace(b"numpy.core.multiarray", b"numpy._core.multiarray")
    f.write_bytes(raw)


def test_a_checkpoint_whose_random_states_another_numpy_wrote_resumes_exactly(tmp_path, reference_run):
    """numpy 1.x pickles its arrays as numpy.core.multiarray._reconstruct, numpy 2 as numpy._core...: a weights-only
    load allows a global by that name only. A genuine checkpoint made under the other numpy (numpy>=1.24 is
    supported) was refused by checkpoint.verify as 'holds pickled Python objects ... which could run code' (and its
    advice, an earlier checkpoint, held the same names)."""
    subprocess.run(_run(tmp_path, "--max-steps", "6"), check=True, env=ENV, capture_output=True)
    _as_numpy_1_wrote_it(tmp_path / "checkpoints" / "step_00000006" / "random_states_0.pkl")
    subprocess.run(_run(tmp_path, "--max-steps", "12", "--resume", "auto"), check=True, env=ENV, capture_output=True)
    _assert_same_run(tmp_path, reference_run)


def _agree_worker(rank: int, init: str, result: Path) -> None:
    import torch.distributed as dist

    from matpac_fast.trainer import _agree_on_resume

    def read():  # rank 1 lacks the checkpoint (--resume PATH on a machine without PATH)
        if rank == 1:
            raise ValueError("--resume /local/step_00000004: not a checkpoint directory")
        return Path("/local/step_00000004"), {"step": 4}

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        _agree_on_resume(read, Path("runs/x"), torch.device("cpu"), 2)
        result.write_text("ok")
    except ValueError as e:
        result.write_text(str(e))
    finally:
        dist.destroy_process_group()


def test_a_process_that_cannot_read_its_checkpoint_does_not_leave_the_others_waiting(tmp_path):
    """A process whose read of the checkpoint raised (before the comparison of resume steps) exited, and the others
    waited in that comparison's all-reduce for the process-group timeout (30 min): e.g. --resume PATH with a local
    --out per machine, PATH on the first only. Now it takes part, then raises its own error; the others say why."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    init = f"file://{tmp_path / 'rendezvous'}"
    procs = [ctx.Process(target=_agree_worker, args=(r, init, tmp_path / f"r{r}.txt")) for r in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    assert not alive, "a process still waits for the one that could not read its checkpoint"
    got = [(tmp_path / f"r{r}.txt").read_text() for r in (0, 1)]
    assert got[0].startswith("another process could not read its checkpoint to resume in --out runs/x"), got
    assert got[1] == "--resume /local/step_00000004: not a checkpoint directory", got


def test_a_log_rows_samples_per_s_includes_the_device_time_of_its_queued_steps(tmp_path, monkeypatch):
    """micro_step never synchronises, so on a GPU the host runs steps ahead of the device. The row's clock was read
    before its statistics' transfer to the host, where the host waits for that queue: the queued steps' samples
    were counted, their device time not, and samples/s (and MFU) came out high. The transfer is simulated here by a
    `tolist` that takes 0.3 s, as a queue that drains in 0.3 s would."""
    import time

    from matpac_fast.metrics import Throughput
    from matpac_fast.trainer import Trainer

    trainer = Trainer(resolve([*TINY, "--out", str(tmp_path / "run"), "--max-steps", "1"])[0])
    tput = Throughput()
    tput.add(8, 0.0)  # one micro-batch of 8 samples, queued at once
    real_tolist = torch.Tensor.tolist

    def draining_tolist(self):
        time.sleep(0.3)
        return real_tolist(self)

    monkeypatch.setattr(torch.Tensor, "tolist", draining_tolist)
    row = trainer._log({"loss": torch.ones(())}, 1, torch.zeros(()), 0.0, tput, None, None)
    assert 0 < row["samples_per_s"] <= 8 / 0.3
    assert 0 <= row["data_wait"] < 0.1
