"""The training loop: Accelerate + torch.compile, EMA teacher, centre, schedules, checkpoints, metrics.

The trainer is the only module that touches Accelerate and the only owner of time (step, schedules, EMA, checkpoint
cadence) and hardware (device, precision, compile). The model's `forward` is pure; after each optimizer step the
trainer calls the explicit state updates in this order: optimizer step -> EMA of teacher encoder and head -> centre
update (with the all-reduced batch mean). (The authors update the EMA inside `forward`, before the optimizer step;
after the step is the DINO order and is what we do.)

No host synchronisation happens inside a step: losses and statistics are summed on the device and read once per
log step (with one all-reduce, so the logged figures are global-batch means); a non-finite step is skipped on the
device (fused AdamW's `found_inf`, the centre update masked) and counted there; the centre's all-reduce is
asynchronous and overlaps the backward pass. The accumulated loss rides in that same all-reduce, so whether a step is
skipped is decided from the global loss and grad norm: every rank takes the same decision, without another
collective.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import shutil
import signal
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from matpac_fast import checkpoint as ckpt
from matpac_fast.cli_args import bar_settings
from matpac_fast.config import CUDA_ONLY_ATTN
from matpac_fast.interrupts import INTERRUPTED
from matpac_fast.lifetime import die_with_launcher
from matpac_fast.metrics import Throughput, mfu, peak_tflops
from matpac_fast.safe_files import atomic_write, write_atomic
from matpac_fast.train_config import TrainConfig, compile_kwargs, inductor_text, model_config, resolve_args


def _json_row(row: dict) -> str:
    """One history.jsonl line in strict JSON: a non-finite figure (the loss of a skipped step) is null, as
    JavaScript and strict parsers (jq, serde) expect; Python's default writes a bare NaN they reject."""
    return json.dumps({k: v if not isinstance(v, float) or math.isfinite(v) else None for k, v in row.items()},
                      allow_nan=False)


class TrainingAborted(RuntimeError):
    """Raised for conditions the user must act on (e.g. too many non-finite losses in a row)."""


def _quiet_stop_in_data_wait(hook, unraisable) -> None:
    """sys.unraisablehook while training: the signal handler raises _StopInDataWait wherever the main thread is
    during a data wait, and that includes code whose exceptions Python swallows with "Exception ignored in ..." and
    a traceback: an at-fork hook (logging's, as the loader forks its workers at each epoch's start) or a __del__
    (the last epoch's DataLoader iterator). 4 of 12 SIGTERM stops of a tiny run with 4-batch epochs printed one.
    The stop itself is kept (its flag is set; _epoch_batches acts on it once the wait returns): no traceback."""
    if not isinstance(unraisable.exc_value, _StopInDataWait):
        hook(unraisable)


class _StopInDataWait(BaseException):
    """Raised by the signal handler while a one-process run waits for its next batch (or before it waits, once a
    stop was asked for), so that a stalled read (a slow `pipe:` or URL fetch) cannot hold back a stop past Slurm's
    grace period. (A read stuck in the kernel, e.g. a hung NFS mount read in-process, cannot be interrupted.) A
    BaseException, so that no `except Exception` on the reading path (e.g. on_error="warn") takes it for a bad
    shard."""


# With several processes a stop is agreed on about this often (seconds of training): a launcher kills its processes
# some time after forwarding a stop signal (torchrun 30 s, Slurm's default KillWait 30 s), and the stop's step and
# checkpoint must land well inside that, whatever --log-every is.
STOP_CHECK_S = 5.0


def _processes(n: int) -> str:
    return f"{n} process{'es' if n > 1 else ''}"


def _next_stop_check(step: int, steps: int, seconds: float, log_every: int, target: float = STOP_CHECK_S) -> int:
    """The step of the next stop agreement after the one at `step`: `target` seconds ahead at the pace of the span
    since the previous one (`steps` steps in `seconds`, figures every process shares), at least 1 step ahead and at
    most `log_every` (the log step's rhythm, as before)."""
    per_step = seconds / max(steps, 1)
    ahead = int(target / per_step) if per_step > 0 else log_every
    return step + max(1, min(log_every, ahead))


_READERS = {"indexed": "as local files (indexed)", "stream": "as a stream (URLs or pipe:)"}


def _resume_advice(out: str | Path) -> str:
    """What a run stopped without a checkpoint of its last step can do, from what exists in --out."""
    found = ckpt.list_checkpoints(out)
    if found:
        return f"the last checkpoint ({found[-1].name}) is kept: --resume auto continues from it"
    # Only what exists is named: a run stopped before its first row has no history.jsonl to delete. tb/ alone (made
    # at the loop's start) does not make --out a run's (ckpt.check_out): the same command takes it as it is.
    left = [n for n in ckpt.RUN_FILES if (Path(out) / n).exists()]
    left += ["tb/"] * (bool(left) and (Path(out) / "tb").is_dir())
    if not left:
        return "no checkpoint was written yet (--ckpt-every): nothing to resume; the same command starts over"
    return (f"no checkpoint was written yet (--ckpt-every): nothing to resume; start again in a new --out (or delete "
            f"its {' and '.join(left)} first)")


# A resume must keep --workers (they split the epoch, so another count reads another in-epoch position): the advice
# after a dead worker cannot be "fewer workers", which the resume would refuse.
_WORKER_DIED_ADVICE = "(with the same --workers, which split the epoch; if memory ran out, free some first)"


def _after_a_dead_worker(out: str | Path) -> str:
    """_resume_advice, plus how to resume; without a checkpoint a new run may use any --workers."""
    if ckpt.list_checkpoints(out):
        return f"{_resume_advice(out)} {_WORKER_DIED_ADVICE}"
    return f"{_resume_advice(out)}; if memory ran out, free some first (or use fewer --workers)"


class _LoaderStalled(Exception):
    """No batch from the loader workers within --data-timeout (torch's "DataLoader timed out after N seconds"),
    met while waiting for a batch, i.e. between optimizer steps."""


class _LoaderWorkerDied(Exception):
    """A DataLoader worker died (torch's RuntimeError "DataLoader worker (pid ...) ..."), met while waiting for a
    batch, i.e. between optimizer steps."""


def _schedule_arrays(cfg: TrainConfig, m, steps_per_epoch: int, total_steps: int, global_batch: int) -> dict:
    """Per-optimizer-step values of every schedule, precomputed (dinov2 style) from the pure step functions.
    End-points of EMA, tau_t and the MATPAC++ temperature come from the model config `m`."""
    from matpac_fast import schedules as S

    s, o = cfg.schedule, cfg.optim
    kappa = global_batch / s.ema_reference_batch if s.ema_reference_batch > 0 else 1.0
    warmup = int(round(o.warmup_epochs * steps_per_epoch))
    tau_warm = int(round(s.tau_t_warmup_epochs * steps_per_epoch))
    out = {"lr": [], "ema": [], "head_ema": [], "tau_t": [], "mcl_t": []}
    # MATPAC++'s temperature follows the authors' curve over the run's length (ScheduleConfig.mcl_reference_steps)
    mcl_scale = s.mcl_reference_steps / total_steps if s.mcl_reference_steps > 0 and total_steps > 0 else 1.0
    for step in range(total_steps + 1):
        out["lr"].append(S.lr_at(step, base_lr=o.lr, warmup_steps=warmup, total_steps=total_steps))
        # When the global batch differs from the recipe's by kappa, rho -> rho**kappa (METHOD.md §5).
        out["ema"].append(S.ema_decay_at(step, m.ema_start, m.ema_end, total_steps) ** kappa)
        out["head_ema"].append(S.ema_decay_at(step, m.head_ema_start, m.head_ema_end, total_steps) ** kappa)
        out["tau_t"].append(S.tau_teacher_at(step, m.tau_t_start, m.tau_t_end, tau_warm))
        out["mcl_t"].append(S.mcl_temperature_at(step * mcl_scale, m.mcl_t_start, m.mcl_t_decay, m.mcl_t_min))
    return out


def _check_same_resume(step: int, out: Path, device: torch.device) -> None:
    """Every process must resume from the same checkpoint step (-1: none). Each reads --resume auto in its own view of
    --out: on machines with local disks, one that saw no checkpoint started over with fresh weights beside ranks that
    resumed, trained on without a word, then hung at a collective (found by review, two 1-process nodes). One
    all-reduce of (step, -step) at start; on disagreement every process raises the same one-line ValueError."""
    t = torch.tensor([step, -step], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    high, low = int(t[0]), -int(t[1])
    if high != low:
        if low == _UNREADABLE:
            raise ValueError(f"another process could not read its checkpoint to resume in --out {out} (its error is "
                             "in its own output): --out must be one folder every machine reads and writes (a shared "
                             "file system), not a local path on each")
        seen = ", ".join("no checkpoint" if s < 0 else f"step {s}" for s in sorted({low, high}))
        raise ValueError(f"the processes found different checkpoints to resume ({seen}) in --out {out}: --out must "
                         "be one folder every machine reads and writes (a shared file system), not a local path on "
                         "each")


# _check_same_resume's step for a process whose read of its checkpoint raised (it raises its own error after the
# comparison; the others say that the processes disagree)
_UNREADABLE = -2


def _agree_on_resume(read, out: Path, device: torch.device, processes: int) -> tuple[Path, dict] | None:
    """`read()` (Trainer._read_resume), then, with several processes, `_check_same_resume` of its step. A process
    whose read raised still takes part in the comparison before raising its error: it left the others waiting in the
    all-reduce until the process-group timeout (30 min), e.g. --resume PATH on machines where only the first holds
    PATH."""
    try:
        resume, error = read(), None
    except ValueError as e:
        resume, error = None, e
    if processes > 1:
        step = _UNREADABLE if error else -1 if resume is None else int(resume[1].get("step", 0))
        try:
            _check_same_resume(step, out, device)
        except ValueError:
            if error is None:
                raise
    if error is not None:
        raise error
    return resume


class TrainData:
    """The trainer's view of the loader: one per rank (never passed through `accelerator.prepare`)."""

    patch = 16  # the model's patch width in frames (the trainer sets it), for the crop suggested in errors

    def __init__(self, cfg: TrainConfig, rank: int, world: int, pin: bool):
        from matpac_fast.data import DataConfig as LoaderConfig
        from matpac_fast.data import ShardSource, _check_source_for, batches_per_epoch, check_spec

        d = cfg.data
        self.rank, self.world, self.seed = rank, world, cfg.run.seed
        with warnings.catch_warnings():
            if rank != 0:  # every rank opens the same set: its warnings (a stray .tar) print from the main one only
                warnings.simplefilter("ignore")
            self.source = ShardSource.open(d.shards)
        if not d.shards.startswith("synthetic:"):
            check_spec(cfg.run.frontend, self.source.stats)
        self.cfg = LoaderConfig(
            source=d.shards,
            batch_size=d.batch_size,
            mode=d.epoch_mode,
            num_workers=d.workers,
            pin_memory=pin,
            on_error=d.on_error,
            timeout_s=d.data_timeout,
        )
        # The loader checks this when an epoch starts, after --out/config.json is written: checked here, before
        # (e.g. two sets that disagree on `short`)
        _check_source_for(self.cfg, self.source.stats)
        self.batches_per_epoch = batches_per_epoch(self.cfg, self.source.total, world)
        self.stats = self.source.stats
        # What makes the data order: shard names and sizes (not the path, so a moved copy still resumes exactly).
        from matpac_fast.data import is_local, shard_key

        # A URL's or pipe: command's name is its .tar's: a signed URL's query or the words after a pipe's .tar (`aws
        # s3 cp URL -`) are not the shard's name, and counting them refused a resume of the same shards.
        # `legacy_fingerprint` is the rule before that (all after the last '/'), which checkpoints written then hold.
        legacy = [u.rstrip("/").rsplit("/", 1)[-1] for u in self.source.urls]
        names = [shard_key(u) for u in self.source.urls]
        self.fingerprint, self.legacy_fingerprint = (
            hashlib.sha256(json.dumps([n, list(self.source.sizes)]).encode()).hexdigest()[:16] for n in (names, legacy))
        # A set re-made in place (make-shards --overwrite with another --seed or other audio) keeps its shard names
        # and sizes: its stats.json shard digests tell it apart (a moved copy keeps them). Checkpoints written before
        # this hold the names-and-sizes fingerprint, which `names_fingerprint` keeps accepting.
        # Concatenated sets were fingerprinted with the first set's digests looked up by every shard's name (before
        # `shard_digests`): checkpoints written then hold that, which `first_set_fingerprint` keeps accepting.
        recorded = self.source.stats.get("shard_sha256")
        first = [recorded.get(n) if isinstance(recorded, dict) else None for n in names]
        digests = self.source.shard_digests() if hasattr(self.source, "shard_digests") else first  # synthetic: none
        if any(isinstance(h, str) for h in digests):
            self.names_fingerprint = self.fingerprint
            self.fingerprint = hashlib.sha256(
                json.dumps([names, list(self.source.sizes), digests]).encode()).hexdigest()[:16]
        if first != digests and any(isinstance(h, str) for h in first):
            self.first_set_fingerprint = hashlib.sha256(
                json.dumps([names, list(self.source.sizes), first]).encode()).hexdigest()[:16]
        # How they are read (data._make_reader, reader "auto"): local files indexed, URLs / pipe: streamed through a
        # shuffle buffer. The same shards read the other way give other crops and order: a resume says so.
        synthetic = d.shards.startswith("synthetic:")
        self.reader = "synthetic" if synthetic else "indexed" if all(map(is_local, self.source.urls)) else "stream"
        self._skipped = 0
        self._loader = None

    def epoch(self, epoch: int, skip: int = 0):
        """Batches of one epoch for this rank; the first `skip` (consumed before a resume) are passed over by the
        loader (make_loader's skip), so the rest of the epoch is exactly what an uninterrupted run would have seen."""
        if self._loader is not None:
            # The finished epoch's count is added now, not when the new epoch's first batch is asked for: a stop
            # in between would checkpoint (epoch + 1, batch 0) without it.
            self._skipped += self._loader.skipped_shards
            self._loader = None
        return self._batches(epoch, skip)

    def _batches(self, epoch: int, skip: int):
        from matpac_fast.data import NoUsableData, ShardError, make_loader

        self._loader = make_loader(self.cfg, self.rank, self.world, epoch, self.seed, source=self.source, skip=skip)
        batches = iter(self._loader)
        try:
            yield from batches
        except (NoUsableData, ShardError) as e:  # raised in a loader worker: one line for the user, not its trace
            raise TrainingAborted(self._data_error(e)) from None
        finally:
            # Closed here, not by the garbage collector: stopping its workers takes a moment, and a second Ctrl-C
            # meanwhile must reach main() (quit at once, in one line). From a collected generator it was printed as
            # "Exception ignored in: <generator ...>" with a traceback, and the run went on to its checkpoint.
            batches.close()

    def _data_error(self, e: Exception) -> str:
        # A worker's exception comes back with its traceback in the message; the last line is the original one.
        lines = str(e).strip().splitlines() or [type(e).__name__]
        msg = lines[-1]
        for prefix in (f"{type(e).__module__}.{type(e).__qualname__}: ", f"{type(e).__name__}: "):
            msg = msg[len(prefix):] if msg.startswith(prefix) else msg
        shards, crop = self.cfg.source, self.cfg.crop_frames
        shortest = (self.stats or {}).get("min_clip_frames")
        if msg.startswith("no usable clip") and shortest and crop > shortest:
            fit = max(self.patch, shortest // self.patch * self.patch)
            return (f"--shards {shards}: no clip is as long as the model's crop of {crop} frames (the shortest has "
                    f"{shortest}): use --model crop_frames={fit} (a multiple of the patch, {self.patch}), or make "
                    f"shards of clips at least {crop} frames long")
        if "every shard failed" in msg:
            return f"--shards {shards}: {msg}; check the shard set with verify-shards"
        if type(e).__name__ == "ShardError":
            return f"{msg} (--on-error raise; --on-error warn skips and counts bad shards)"
        return f"--shards {shards}: {msg}"

    def set_crop(self, frames: int) -> None:
        import dataclasses

        self.cfg = dataclasses.replace(self.cfg, crop_frames=frames)

    def skipped_shards(self) -> int:
        """This rank's running total: for each epoch so far, the distinct shards its loader's workers skipped
        (ShardLoader.skipped_shards), summed over epochs. The log sums it over ranks: a bad shard counts once per
        epoch for each rank that met it."""
        return self._skipped + (self._loader.skipped_shards if self._loader is not None else 0)

    def skipped_before_resume_point(self, epoch_done: bool) -> int:
        """Shards this rank skipped in the epochs that a resume from a checkpoint written now does not read again:
        the finished ones, and the current one when it is complete (such a checkpoint resumes with the next epoch;
        one inside an epoch re-reads that epoch from its start, which counts its skipped shards again)."""
        return self._skipped + (self._loader.skipped_shards if epoch_done and self._loader is not None else 0)

    def restore_skipped(self, n: int) -> None:
        """A resumed run's running total starts from the checkpoint's (given to one rank: the log sums over ranks)."""
        self._skipped = n


class Trainer:
    def __init__(self, cfg: TrainConfig, device_checks: bool = True):
        """`device_checks=False` (--print-config) lets a GPU-only setting pass on a machine without one: a config
        for GPU nodes is checked on a CPU login node."""
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        self.cfg = cfg
        r = cfg.run
        self.out = Path(r.out)
        if device_checks and r.precision == "fp16" and (r.cpu or not torch.cuda.is_available()):
            # Accelerate quietly drops fp16 autocast off CUDA: the run would train in fp32 while recording fp16
            raise ValueError("--precision fp16 needs a CUDA GPU (this run is on the CPU, where fp16 autocast does "
                             "not run): use --precision bf16 or no")
        self.accelerator = Accelerator(
            mixed_precision=r.precision,
            gradient_accumulation_steps=cfg.optim.grad_accum,
            cpu=r.cpu,
        )
        acc = self.accelerator
        self.device = acc.device
        if r.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        # Same seed on every rank: identical initialisation (DDP also broadcasts rank 0's weights).
        set_seed(r.seed)
        self.data = self._open_data()
        self.model_cfg = self._model_config()
        self._check_model_fits_data()
        cpu = r.cpu or not torch.cuda.is_available()
        if device_checks and cpu and self.model_cfg.attn_impl in CUDA_ONLY_ATTN:
            # SDPA's memory-efficient and cuDNN backends have no CPU kernel: the first step raised "No viable backend"
            raise ValueError(f"--model attn_impl={self.model_cfg.attn_impl} needs a CUDA GPU (that SDPA backend has no "
                             "CPU kernel): on the CPU use sdpa, flash or math")
        if acc.is_main_process:
            self._warn_short_clips()
        self.data.set_crop(self.model_cfg.crop_frames)  # the loader's crop is the model's input length
        self.data.patch = self.model_cfg.patch
        # settings compared before the model is built; every process then compares what it found with the others'
        self._resume = _agree_on_resume(self._read_resume, self.out, self.device, acc.num_processes)
        self._build_model()
        self._verify_resume()  # files checked before main() creates --out
        self._stop_requested = False
        self._stop_signal: int | None = None
        self._in_data_wait = False  # the signal handler breaks a one-process data wait (see _StopInDataWait)
        self._wait_started: float | None = None  # when the current data wait began (the stop row's data wait)
        self._saved_step: int | None = None  # the step of the checkpoint on disk for this run (saved or resumed)
        self._residual: dict[str, torch.Tensor] | None = None  # _ema_residual
        self._input_flags: list[tuple[list[str], torch.Tensor]] = []  # _check_input
        self.step = 0  # optimizer steps done
        self.epoch = 0
        self.batch_in_epoch = 0  # micro-batches consumed in the current epoch
        self.nonfinite_total = torch.zeros((), device=self.device)
        self.nonfinite_run = torch.zeros((), device=self.device)
        self.skipped_steps_seen = 0
        # Gradient-accumulation state carried between `micro_step` calls, and the last optimizer step's figures.
        self._micro = 0
        self._center_sum = None
        self._loss_acc = torch.zeros((), device=self.device)
        self.last_gnorm, self.last_lr = torch.zeros(()), 0.0

    # ----------------------------------------------------------------------------------------------- set-up
    def _open_data(self):
        acc = self.accelerator
        return TrainData(self.cfg, acc.process_index, acc.num_processes, pin=self.device.type == "cuda")

    def _model_config(self):
        return model_config(self.cfg, self.data.stats)

    def _check_model_fits_data(self) -> None:
        _check_model_fits_shards(self.cfg, self.model_cfg, self.data.stats)

    def _warn_short_clips(self) -> None:
        """One warning line when the shards' clips average fewer frames than the model's crop: padded (short=pad),
        much of each crop is padding; dropped (short=drop), much of the set is never trained on. Neither is an error
        and the loader says nothing of it. Sets whose stats.json lacks the counts (older sets, synthetic:N) get no
        warning. The shares printed are lower bounds (stats.json has the mean and the shortest clip, not each
        length), rounded down."""
        stats = self.data.stats or {}
        n_clips, n_frames, short = stats.get("n_clips"), stats.get("n_frames"), stats.get("short")
        if not n_clips or not isinstance(n_frames, int | float) or short not in ("pad", "drop"):
            return  # short is None for a concatenation of pad and drop sets, which the loader refuses anyway
        crop, patch = self.model_cfg.crop_frames, self.model_cfg.patch
        mean = n_frames / n_clips
        fit = max(patch, int(mean) // patch * patch)
        if mean >= crop or fit >= crop:  # fit >= crop: the crop is already one patch, there is no shorter one
            return
        if short == "pad":
            # The mean padding share is the mean of max(0, 1 - T/crop): at least 1 - mean/crop (Jensen).
            share = 1 - mean / crop
            what = f"at least {math.floor(100 * share)} % of each crop is padding"
        else:
            shortest = stats.get("min_clip_frames")
            if shortest is None or shortest >= crop:
                return  # no clip is shorter than the crop: nothing is dropped
            if shortest >= mean:  # every clip is shorter than the crop: the loader's error says so, with the fix
                return
            # Markov's inequality on T - shortest >= 0: at most (mean - shortest) / (crop - shortest) of the clips
            # reach the crop, so at least the rest are dropped.
            share = (crop - mean) / (crop - shortest)
            what = f"at least {math.floor(100 * share)} % of the clips are shorter and dropped"
            # the same figure as the loader's error when no clip reaches the crop, so the two never disagree
            keep = max(patch, shortest // patch * patch)
            if keep < fit:
                what += f"; --model crop_frames={keep} keeps every clip"
        print(f"warning: --shards {self.cfg.data.shards}: clips average {int(mean)} frames, the model's crop is "
              f"{crop}: {what}; --model crop_frames={fit} fits the average clip (a multiple of the patch, {patch})",
              file=sys.stderr, flush=True)

    def _make_model(self):
        """The module to train (a hook: benchmarks/train_throughput.py swaps in the authors' loss arithmetic)."""
        from matpac_fast.model import MATPAC

        return MATPAC(self.model_cfg)

    def _build_model(self):
        cfg, acc = self.cfg, self.accelerator
        model = self._make_model()
        self.raw_model = model
        params = list(model.student_parameters())
        fused = self.device.type in ("cuda", "cpu")
        self.optimizer = torch.optim.AdamW(
            params,
            lr=cfg.optim.lr,
            betas=(cfg.optim.beta1, cfg.optim.beta2),
            eps=cfg.optim.eps,
            weight_decay=cfg.optim.weight_decay,
            fused=fused,
        )
        model = model.to(self.device)
        kwargs = compile_kwargs(cfg.run.compile_mode, cfg.inductor)
        if cfg.run.compile == "block":
            for m in model.modules():
                if type(m).__name__ == "Block":
                    m.compile(**kwargs)
        elif cfg.run.compile == "step":
            model = torch.compile(model, **kwargs)
        self.model, self.optimizer = acc.prepare(model, self.optimizer)
        # Accelerate saves and loads the module it was given; the compiled wrapper's keys are "_orig_mod.<name>", so a
        # --compile step checkpoint could not be resumed with --compile off/block nor the other way round (a setting
        # free to change on resume). It saves and loads the plain model's keys instead: the same tensors.
        if model is not self.raw_model and model in acc._models:  # (benchmarks' peer bypasses prepare: absent)
            acc._models[acc._models.index(model)] = self.raw_model
        self.inner_optimizer = getattr(self.optimizer, "optimizer", self.optimizer)
        spe = self.data.batches_per_epoch // cfg.optim.grad_accum
        if spe < 1:
            raise ValueError(self._too_few_batches())
        self.steps_per_epoch = spe
        self.total_steps = math.ceil(cfg.schedule.epochs * spe)
        self.last_step = min(self.total_steps, cfg.schedule.max_steps) if cfg.schedule.max_steps else self.total_steps
        if cfg.schedule.max_steps > self.total_steps and acc.is_main_process:
            print(f"note: the schedule ends at step {self.total_steps} ({cfg.schedule.epochs:g} epochs x {spe} "
                  f"steps); --max-steps {cfg.schedule.max_steps} stops nothing earlier (raise --epochs to train "
                  "longer)", file=sys.stderr, flush=True)
        warm = cfg.schedule.tau_t_warmup_epochs
        if warm > cfg.schedule.epochs and acc.is_main_process:  # allowed (DINO's schedule is cut the same way), said
            m = self.model_cfg
            last = m.tau_t_start + (m.tau_t_end - m.tau_t_start) * cfg.schedule.epochs / warm
            print(f"note: --tau-t-warmup-epochs {warm:g} is longer than --epochs {cfg.schedule.epochs:g}: the teacher "
                  f"temperature rises to {last:.4g}, not to tau_t_end {m.tau_t_end:g}", file=sys.stderr, flush=True)
        self.global_batch = cfg.data.batch_size * cfg.optim.grad_accum * acc.num_processes
        ref = cfg.schedule.ema_reference_batch
        if ref > 0 and self.global_batch != ref and acc.is_main_process:
            # The paper's recipe is 2048 = 8 GPUs x 256; on one GPU the defaults train at 256 with 8x the updates,
            # which only the EMA decays are adjusted for: said, so nobody takes such a run for the paper's.
            per = cfg.data.batch_size * acc.num_processes
            hint = f"; --grad-accum {ref // per} trains at {ref}" if ref % per == 0 and ref // per > 1 else ""
            print(f"note: global batch {self.global_batch} (--batch-size {cfg.data.batch_size} per device x "
                  f"{_processes(acc.num_processes)} x "
                  f"--grad-accum {cfg.optim.grad_accum}), not the {ref} the EMA decays are given for "
                  f"(--ema-reference-batch; the paper trains at 2048 = 8 GPUs x 256): the decays are rescaled to "
                  f"it, the learning rate {cfg.optim.lr:g} and the centre momentum are not{hint}",
                  file=sys.stderr, flush=True)
        self.sched = _schedule_arrays(cfg, self.model_cfg, spe, self.total_steps, self.global_batch)
        # The temperatures enter forward as 0-d device tensors (no recompiles). They are indexed out of one tensor
        # uploaded here: building a CUDA tensor from a Python float every step would be a blocking copy (a sync).
        self.sched_dev = {k: torch.tensor(self.sched[k], device=self.device) for k in ("tau_t", "mcl_t")}
        from matpac_fast.flops import flops_per_sample

        self.flops_per_sample = flops_per_sample(self.model_cfg)
        self.peak = peak_tflops(self.device, cfg.run.peak_tflops)

    def _too_few_batches(self) -> str:
        """The arithmetic of an epoch without a single optimizer step, where a per-process --batch-size taken for
        the global batch shows."""
        b, a, world = self.cfg.data.batch_size, self.cfg.optim.grad_accum, self.accelerator.num_processes
        n = self.data.batches_per_epoch
        clips = getattr(getattr(self.data, "source", None), "total", None)
        procs = _processes(world)
        split = f"its {clips} clips / ({b} per process x {procs}) = {n}; " if clips is not None else ""
        return (f"the shard set gives {n} batches per process per epoch, fewer than --grad-accum {a}: {split}"
                f"--batch-size is per process, the global batch is {b} x {procs} x --grad-accum {a} = {b * world * a}: "
                "lower --batch-size or use more data")

    # --------------------------------------------------------------------------------------------- one step
    def _masks(self, batch_size: int, micro: int):
        """Masks from a generator seeded by (seed, step, micro, rank): reproducible, and identical on resume. Drawn
        on the host (the same masks whatever the device) and copied with non_blocking: these few-KiB copies from
        pageable memory did not wait for the GPU's queue on an H200 (a GPU test checks it), and pinning them first
        changed no step time in the 455c577 A/B (benchmarks/RESULTS.md; cb5dc27's runs were too noisy to say)."""
        from matpac_fast.masking import make_masks

        m = self.model_cfg
        g = torch.Generator().manual_seed(
            hash((self.cfg.run.seed, self.step, micro, self.accelerator.process_index)) & 0x7FFFFFFF
        )
        vis, mask = make_masks(batch_size, m.n_patches, m.n_visible, generator=g)
        return vis.to(self.device, non_blocking=True), mask.to(self.device, non_blocking=True)

    def _step_state(self):
        from matpac_fast.model import StepState

        i = min(self.step, self.total_steps)
        return StepState(tau_t=self.sched_dev["tau_t"][i], mcl_temperature=self.sched_dev["mcl_t"][i])

    def _center_allreduce(self, packed):
        """Sum over ranks of [accumulated centre statistic (K), accumulated loss (1)]; async so it overlaps the
        backward. The loss rides along so that the skip decision is global (one collective, not two)."""
        if self.accelerator.num_processes > 1 and dist.is_initialized():
            return dist.all_reduce(packed, op=dist.ReduceOp.SUM, async_op=True)
        return None

    def _optimizer_step(self, packed, handle):
        """`packed` = [centre sum (K), loss sum] of this accumulation, summed over ranks once `handle` is waited on.
        Waiting is free by now: the all-reduce was queued before the backward's gradient all-reduces (on CUDA a
        stream wait, not a host one)."""
        cfg, acc = self.cfg, self.accelerator
        params = self.raw_model.student_parameters()
        if cfg.optim.clip_grad > 0:
            gnorm = acc.clip_grad_norm_(list(params), cfg.optim.clip_grad)
        else:
            gnorm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        gnorm = torch.as_tensor(gnorm, device=self.device).float()
        if handle is not None:
            handle.wait()
        center_sum, loss_sum = packed[:-1], packed[-1]
        # Global: the grad norm is of the all-reduced gradients and loss_sum is summed over ranks, so every rank
        # skips (or takes) the same steps and the ranks' weights never part.
        bad = ~(torch.isfinite(gnorm) & torch.isfinite(loss_sum))
        if acc.mixed_precision != "fp16":  # fp16: the GradScaler skips inf steps itself
            self.inner_optimizer.found_inf = bad.float()
        lr = self.sched["lr"][min(self.step, self.total_steps)]
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.inner_optimizer.found_inf = None
        # Explicit state updates, in order: EMA, then centre.
        model = self.raw_model
        # The authors' in-forward EMA at update n+1 uses the decay of n+1 (schedules.py); the log row of this step
        # (self.step after the increment below) reports the same value.
        self._update_ema(min(self.step + 1, self.total_steps))
        n = cfg.optim.grad_accum * acc.num_processes
        mean = center_sum / n
        mean = torch.where(bad, model.center.reshape(mean.shape).to(mean.dtype), mean)
        model.update_center(mean)
        self.nonfinite_total += bad.float()
        self.nonfinite_run = (self.nonfinite_run + 1) * bad.float()
        self.step += 1
        return gnorm, lr

    def _update_ema(self, i: int) -> None:
        """Teacher encoder and head <- EMA of the student's, with the decays of schedule step `i`, compensated."""
        from matpac_fast.ema import ema_update

        (t_enc, s_enc), (t_head, s_head) = self.raw_model.ema_pairs()
        res = list(self._ema_residual().values())
        # Compiled with the model: one pass over the weights instead of six (benchmarks/ema.py), same result.
        compiled = self.cfg.run.compile != "off"
        ema_update(t_enc, s_enc, self.sched["ema"][i], res[: len(t_enc)], compiled=compiled)
        ema_update(t_head, s_head, self.sched["head_ema"][i], res[len(t_enc) :], compiled=compiled)

    def _ema_residual(self) -> dict[str, torch.Tensor]:
        """The teacher EMA's Kahan terms (ema.py), by teacher parameter name, in ema_pairs' order: what fp32 rounding
        took from each teacher weight so far. Trainer state like the optimizer's, made at first use (the benchmarks'
        reference-design trainer never uses it) and checkpointed in ckpt.EMA_RESIDUAL."""
        if self._residual is None:
            m = self.raw_model
            named = [(f"teacher_encoder.{n}", p) for n, p in m.teacher_encoder.named_parameters()]
            if m.student_head is not None:
                named += [(f"teacher_head.{n}", p) for n, p in m.teacher_head.named_parameters()]
            self._residual = {n: torch.zeros_like(p) for n, p in named}
        return self._residual

    def micro_step(self, lms: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """One micro-batch `lms` (B, 1, F, T) already on the device: forward, backward and, when it completes the
        gradient accumulation, the optimizer step, EMA and centre update. No host synchronisation. Returns the
        micro-batch's (loss, stats); `self._micro == 0` afterwards means an optimizer step was taken."""
        acc = self.accelerator
        vis, mask = self._masks(lms.shape[0], self._micro)
        with acc.accumulate(self.model):
            with acc.autocast():
                loss, stats = self.model({"lms": lms, "vis_idx": vis, "mask_idx": mask}, self._step_state())
            c = stats["center_batch"].detach().float()
            self._center_sum = c.clone() if self._center_sum is None else self._center_sum + c  # clone: see train()
            self._loss_acc = self._loss_acc + loss.detach().float()
            packed = handle = None
            if acc.sync_gradients:
                packed = torch.cat([self._center_sum.reshape(-1), self._loss_acc.reshape(1)])
                handle = self._center_allreduce(packed)
            acc.backward(loss)
            self._micro += 1
            if acc.sync_gradients:
                self.last_gnorm, self.last_lr = self._optimizer_step(packed, handle)
                self._reset_accumulation()
        return loss, stats

    def _reset_accumulation(self) -> None:
        self._center_sum, self._micro = None, 0
        self._loss_acc = torch.zeros((), device=self.device)

    def _drop_partial_accumulation(self) -> None:
        """An epoch ended inside a gradient accumulation (its loader gave fewer batches than planned): drop the
        partial one (drop_last), so that no optimizer step mixes two epochs. Accelerate's accumulate() counter goes
        back too, so the next micro-batch starts a fresh accumulation and DDP syncs on its last micro-batch."""
        self.accelerator.step -= self._micro
        # The inner optimizer: Accelerate's wrapper zeroes only when sync_gradients, which is False mid-accumulation.
        self.inner_optimizer.zero_grad(set_to_none=True)
        self._reset_accumulation()

    # --------------------------------------------------------------------------------------------- the loop
    def train(self) -> dict:
        """Train to the last step (or a stop signal); returns {"step", "history", "stopped_early", "stop_signal"}
        (the signal number that stopped this process, None when it was not stopped or another process was signalled).
        The SIGTERM / SIGINT handlers are this call's only: the caller's come back when it returns (a notebook's
        Ctrl-C)."""
        self._maybe_resume()
        self._stop_requested = False  # a second train() on this Trainer is a new run of the loop
        previous = self._install_signal_handlers()
        unraisable = sys.unraisablehook
        sys.unraisablehook = functools.partial(_quiet_stop_in_data_wait, unraisable)
        try:
            return self._train()
        finally:
            sys.unraisablehook = unraisable
            for sig, handler in previous.items():
                with contextlib.suppress(ValueError, TypeError):  # TypeError: None, a handler set outside Python
                    signal.signal(sig, handler)

    def _train(self) -> dict:
        cfg, acc = self.cfg, self.accelerator
        if acc.is_main_process and self._resume is not None:
            self._truncate_history()
        writer = self._writer()
        if acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            run_cfg = {"train": cfg.to_dict(), "model": self.model_cfg.__dict__}
            # atomic: a half-written config.json would read as someone else's
            write_atomic(self.out / "config.json", json.dumps(run_cfg, indent=1, default=str))
        bar = self._progress()
        tput = Throughput()
        sums: dict[str, torch.Tensor] = {}
        n_sums = 0
        history: list[dict] = []
        per_epoch = self.steps_per_epoch * cfg.optim.grad_accum  # micro-batches trained per epoch (_epoch_batches)
        # the running sums as of the last optimizer step, and its epoch: the stop row in a data wait, and what is
        # left when an epoch ends inside a gradient accumulation (the dropped micro-batches were never stepped)
        step_sums, step_n, step_epoch = {}, 0, self.epoch
        done = self.step >= self.last_step
        self._start_stop_checks()
        if done and self._resume is not None and acc.is_main_process:
            kept = ("the checkpoint is kept as it is" if self._saved_step == self.step
                    else "the checkpoint is written into --out")
            print(f"note: the checkpoint is at step {self.step} and this run ends at step {self.last_step} "
                  f"(--max-steps / --epochs): nothing to train; {kept} and encoder.pt is written again",
                  file=sys.stderr, flush=True)
        while not done:
            if self.batch_in_epoch >= per_epoch:  # resumed from a checkpoint written at the end of an epoch
                self.epoch, self.batch_in_epoch = self.epoch + 1, 0
            batches = self._epoch_batches(per_epoch)
            self._wait_started = None
            try:
                for batch, wait in batches:
                    self.batch_in_epoch += 1
                    lms = batch["lms"].to(self.device, non_blocking=True)
                    self._check_input(lms, batch["key"])
                    loss, stats = self.micro_step(lms)
                    tput.add(lms.shape[0], wait)
                    for k in ("loss_pred", "loss_cls", "teacher_entropy", "teacher_max_prob", "center_norm"):
                        if k in stats:
                            v = stats[k].detach().float()
                            # clone: under CUDA graphs (--compile-mode reduce-overhead) an output is overwritten
                            # by the next replay, so a running sum must not alias one
                            sums[k] = sums[k] + v if k in sums else v.clone()
                    v = loss.detach().float()
                    sums["loss"] = sums["loss"] + v if "loss" in sums else v.clone()
                    n_sums += 1
                    if self._micro != 0:
                        continue
                    # ---- after an optimizer step
                    stop = self._should_stop()
                    if self.step % cfg.run.log_every == 0 or self.step == self.last_step or stop:
                        self._append_row(self._log(sums, n_sums, self.last_gnorm, self.last_lr, tput, writer, bar),
                                         history)
                        sums, n_sums = {}, 0
                        tput.reset()
                    step_sums, step_n, step_epoch = dict(sums), n_sums, self.epoch
                    if bar is not None:
                        bar.update(1)
                    if cfg.run.ckpt_every and self.step % cfg.run.ckpt_every == 0 and self.step < self.last_step:
                        self.save_checkpoint()
                    if self.step >= self.last_step or stop:
                        done = True
                        break
            except _StopInDataWait:  # a signal while waiting for data (one process): stop at the last finished step
                self._abandon_partial_step()
                done = True
                if step_n:  # the steps since the last row, as a stop after a step logs them (samples/s: to now)
                    if self._wait_started is not None:
                        tput.add(0, time.perf_counter() - self._wait_started)  # the interrupted wait is data wait
                    epoch, self.epoch = self.epoch, step_epoch  # the row's epoch is its steps' (a new one may
                    try:                                        # have begun with this wait)
                        row = self._log(step_sums, step_n, self.last_gnorm, self.last_lr, tput, writer, bar)
                    finally:
                        self.epoch = epoch
                    self._append_row(row, history)
            except _LoaderWorkerDied as e:
                batches.close()
                raise self._worker_died(str(e)) from None
            except _LoaderStalled:
                batches.close()
                raise self._loader_stalled() from None
            # (met mid-step, where torch's SIGCHLD handler raises it, a dead worker's RuntimeError goes to main(),
            # which says it in one line: no checkpoint can be written inside a step)
            finally:
                # its loader's workers (and pipe: commands) go now, not when the generator is collected: an
                # exception's traceback kept by a notebook would keep them alive
                batches.close()
            if done:
                break
            if self._micro:  # the loader gave fewer batches than planned, mid-accumulation
                self._drop_partial_accumulation()
                sums, n_sums = dict(step_sums), step_n  # its micro-batches' losses were never stepped
            if self.batch_in_epoch == 0:
                raise TrainingAborted(f"--shards {cfg.data.shards}: epoch {self.epoch} gave no batch on process "
                                      f"{acc.process_index}; check the shard set with verify-shards")
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        if bar is not None:
            bar.close()
        if self.step != self._saved_step:  # a resume with nothing to train keeps its checkpoint as it is
            self.save_checkpoint()
        if acc.is_main_process:
            self.export_encoder()
        if writer is not None:
            writer.close()
        acc.wait_for_everyone()
        return {"step": self.step, "history": history, "stopped_early": self._stop_requested,
                "stop_signal": self._stop_signal}

    def _epoch_batches(self, per_epoch: int):
        """(batch, host seconds waited for it) for the rest of the current epoch, up to `per_epoch` micro-batches:
        with --grad-accum A, floor(batches / A) * A of them, the rest never loaded (drop_last at the level of
        optimizer steps), so that no step mixes two epochs and a run trains exactly --epochs epochs."""
        it = self.data.epoch(self.epoch, skip=self.batch_in_epoch)
        try:
            while self.batch_in_epoch < per_epoch:
                t0 = time.perf_counter()
                if self._stop_requested and self.accelerator.num_processes == 1:
                    # asked for while computing (inside a gradient accumulation) or saving: the next read could
                    # stall as long as any, so stop before it
                    raise _StopInDataWait
                self._wait_started = t0
                self._in_data_wait = True
                try:
                    batch = next(it, None)
                except RuntimeError as e:
                    if str(e).startswith("DataLoader worker"):  # torch's words for a worker that died
                        raise _LoaderWorkerDied(str(e).strip().splitlines()[0]) from None
                    if str(e).startswith("DataLoader timed out"):  # --data-timeout: a stalled read, not a traceback
                        raise _LoaderStalled() from None
                    raise
                finally:
                    self._in_data_wait = False
                if self._stop_requested and self.accelerator.num_processes == 1:
                    # the handler's _StopInDataWait landed where Python swallows it (see _quiet_stop_in_data_wait):
                    # stop as it would have, at the last finished step (this batch is read again on resume)
                    raise _StopInDataWait
                self._wait_started = None
                if batch is None:
                    return
                yield batch, time.perf_counter() - t0
        finally:
            it.close()

    def _append_row(self, row: dict, history: list[dict]) -> None:
        history.append(row)
        if self.accelerator.is_main_process:  # appended as we go: a killed run keeps its trace
            # O_NOFOLLOW: a link planted after check_out is an error, never a write into its target
            with open(self.out / "history.jsonl", "a", opener=lambda p, fl: os.open(p, fl | os.O_NOFOLLOW, 0o666)) as f:
                f.write(_json_row(row) + "\n")

    def _worker_died(self, what: str) -> TrainingAborted:
        """A loader worker died between two optimizer steps (the out-of-memory killer, a kill): one line instead
        of torch's traceback, after a checkpoint of the last finished step when this is the only process (the
        weights are intact; with several, the others are inside a collective and cannot join one)."""
        hint = f"resume with --resume auto {_WORKER_DIED_ADVICE}"
        if self.accelerator.num_processes == 1:
            self._abandon_partial_step()
            if self.step != self._saved_step:  # nothing trained since the last one (or the resumed one): kept
                self.save_checkpoint()
            return TrainingAborted(f"{what}: a data-loader worker died (often the out-of-memory killer); checkpoint "
                                   f"at step {self.step}: {hint}")
        return TrainingAborted(f"{what}: a data-loader worker of process {self.accelerator.process_index} died "
                               f"(often the out-of-memory killer); {_after_a_dead_worker(self.out)}")

    def _loader_stalled(self) -> TrainingAborted:
        """No batch within --data-timeout: one line naming the likely cause, after a checkpoint of the last finished
        step when this is the only process (with several, the others wait in a collective and cannot join one)."""
        t = self.cfg.data.data_timeout
        what = (f"process {self.accelerator.process_index}'s loader gave no batch in {t:g} s (--data-timeout): a "
                "stalled shard read, e.g. a pipe: command or URL that stopped sending")
        if self.accelerator.num_processes == 1:
            self._abandon_partial_step()
            if self.step == 0:  # nothing trained: no checkpoint to write
                return TrainingAborted(f"{what}; nothing was trained yet: check the shards' source, then run again")
            if self.step != self._saved_step:
                self.save_checkpoint()
            return TrainingAborted(f"{what}; checkpoint at step {self.step}: --resume auto continues once the data "
                                   "flows (or raise --data-timeout)")
        return TrainingAborted(f"{what}; {_resume_advice(self.out)}")

    def _abandon_partial_step(self) -> None:
        """Back to the last finished optimizer step, for a checkpoint taken between two: the micro-batches of an
        unfinished gradient accumulation are forgotten, so that a resume reads them again."""
        if self._micro:
            self.batch_in_epoch -= self._micro
            self._drop_partial_accumulation()

    # ------------------------------------------------------------------------------------------ observability
    def _writer(self):
        if not self.accelerator.is_main_process:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard missing: metrics still go to history.jsonl and the console
            return None
        # A resumed run redoes the steps after its checkpoint: TensorBoard hides the killed run's points for them.
        purge = self.step + 1 if self._resume is not None else None
        return SummaryWriter(str(self.out / "tb"), purge_step=purge)

    def _truncate_history(self) -> None:
        """history.jsonl keeps the rows up to the resumed checkpoint's step (the steps after it are redone and
        logged again): rewritten atomically, a row cut short by a kill dropped."""
        path = self.out / "history.jsonl"
        if not path.exists():
            return
        keep = []
        try:
            text = ckpt.read_history(path)
        except OSError as e:  # not a regular file (a link to /dev/zero, a FIFO), too large
            raise ValueError(f"{path} is unreadable ({e.strerror or e}): move it away to resume without it") from None
        for line in text.splitlines():
            try:
                row = json.loads(line)
            except (ValueError, RecursionError):  # RecursionError: nested too deep, a damaged row like any other
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= self.step:
                keep.append(line + "\n")
        write_atomic(path, "".join(keep))

    def _progress(self):
        if not (self.accelerator.is_main_process and self.cfg.run.progress):
            return None
        from tqdm import tqdm

        return tqdm(total=self.last_step, initial=self.step, desc="train", unit="step", dynamic_ncols=True,
                    **bar_settings(sys.stderr))  # tqdm's default file

    def _log(self, sums, n, gnorm, lr, tput, writer, bar) -> dict:
        """The only host synchronisation of the loop: one all-reduce and one transfer of the summed statistics.
        Losses and teacher statistics are means over the global batch (METHOD.md §4.8), skipped shards and
        samples/s sums over ranks; grad norm, centre norm and the non-finite counters are the same on every rank."""
        acc = self.accelerator
        keys = sorted(sums)
        # Counts only: the clock is read after the transfer below, which waits for the device's queue. micro_step
        # never synchronises, so the host runs steps ahead; read before it, the time left out the queued steps
        # that `samples` counts, and samples/s and MFU came out high.
        per_rank = [float(self.data.skipped_shards()), float(tput.samples), tput.data_wait]
        summed = torch.cat([torch.stack([sums[k] for k in keys]) if keys else torch.zeros(0, device=self.device),
                            torch.tensor(per_rank, device=self.device)])
        if acc.num_processes > 1 and dist.is_initialized():
            dist.all_reduce(summed, op=dist.ReduceOp.SUM)
        values = torch.cat([summed, torch.stack([gnorm.float().to(self.device), self.nonfinite_total,
                                                 self.nonfinite_run])]).tolist()
        elapsed = tput.elapsed()  # after the host transfer: every counted sample's device work is done
        self._report_nonfinite_inputs()  # before an abort for non-finite losses: the clip may be their cause
        world = acc.num_processes
        row = {k: v / max(n, 1) / world for k, v in zip(keys, values[: len(keys)])}
        skipped_shards, samples, wait_sum, row["grad_norm"], nonfinite_total, nonfinite_run = values[len(keys):]
        sps_total = samples / elapsed  # the ranks leave the all-reduce together: one interval for all of them
        sps = sps_total / world  # per device, for the MFU
        i = min(self.step, self.total_steps)
        row.update(
            step=self.step,
            epoch=self.epoch,
            lr=lr,  # the lr of the last step, schedule index step - 1; the forward of that step used the same tau_t
            tau_t=self.sched["tau_t"][max(i - 1, 0)],
            ema=self.sched["ema"][i],
            head_ema=self.sched["head_ema"][i],
            samples_per_s=sps_total,
            data_wait=min(wait_sum / world / elapsed, 1.0),
            skipped_steps=int(nonfinite_total),
            skipped_shards=int(round(skipped_shards)),
        )
        u = mfu(sps, self.flops_per_sample, self.peak)
        if u is not None:
            row["mfu"] = u
        if int(nonfinite_run) >= self.cfg.run.max_nonfinite:
            raise TrainingAborted(self._nonfinite_advice(int(nonfinite_run)))
        k = self.model_cfg.n_prototypes
        # M2D (alpha 1) builds no heads: its teacher statistics are placeholder zeros, not a collapse
        ent = row.get("teacher_entropy") if self.model_cfg.use_heads else None
        if ent is not None and self.accelerator.is_main_process and (ent < 0.05 * math.log(k) or
                                                                      ent > 0.98 * math.log(k)):
            state = "near 0 (one prototype dominates)" if ent < 0.05 * math.log(k) else "near ln K (uniform)"
            print(f"warning: teacher entropy {ent:.3f} is {state} at step {self.step}: the classification "
                  f"task may be collapsing (METHOD.md §4)", file=sys.stderr)
        if writer is not None:
            for key, v in row.items():
                if key not in ("step",) and isinstance(v, (int, float)):
                    writer.add_scalar(f"train/{key}", v, self.step)
        if bar is not None:  # shown at the bar's next refresh: into a log, a row did not force one more copy
            bar.set_postfix(loss=f"{row.get('loss', float('nan')):.4f}", pred=f"{row.get('loss_pred', 0):.3f}",
                            cls=f"{row.get('loss_cls', 0):.3f}", sps=f"{row['samples_per_s']:.0f}",
                            refresh="mininterval" not in bar_settings(sys.stderr))
        return row

    def _check_input(self, lms: torch.Tensor, keys: list[str]) -> None:
        """Queue which clips of this micro-batch are finite, read with the next log row's transfer (no host sync
        here). make-shards never writes NaN or Inf, but a shard damaged after it can hold them, and one such clip
        makes its step's loss non-finite: the step is skipped, every epoch, and the skipped-step count alone does
        not lead to the clip."""
        self._input_flags.append((keys, torch.isfinite(lms).flatten(1).all(1)))

    def _report_nonfinite_inputs(self) -> None:
        """A warning naming each clip queued by _check_input that held NaN or Inf (once per clip and run: the CLI
        prints a warning text once)."""
        if not self._input_flags:
            return
        finite = torch.cat([f for _, f in self._input_flags]).tolist()
        keys = [k for ks, _ in self._input_flags for k in ks]
        self._input_flags.clear()
        for key, ok in zip(keys, finite):
            if not ok:
                warnings.warn(f"clip {key} of --shards {self.cfg.data.shards} holds NaN or Inf log-mel values: "
                              "every step it is in is skipped (skipped_steps); make-shards never writes such "
                              "values, so its shard was damaged since: check the set with verify-shards",
                              stacklevel=2)

    def _nonfinite_advice(self, n: int) -> str:
        """The abort line for `n` non-finite losses in a row: what to do depends on what exists (a checkpoint in
        --out to resume, with the free --lr / --clip-grad) and on what was used (fp16 overflows where bf16 does not)."""
        r, o = self.cfg.run, self.cfg.optim
        knobs = "a lower --lr" + (" and --clip-grad > 0 (the recipe's is 3.0)" if o.clip_grad == 0 else "")
        ckpts = ckpt.list_checkpoints(self.out)
        if ckpts:  # skipped steps leave the weights as they were: the latest checkpoint is still finite
            advice = (f"resume with {knobs} (--resume auto --lr X continues from {ckpts[-1].name}; --resume PATH "
                      "picks an earlier checkpoint)")
        else:
            advice = (f"there is no checkpoint to resume: start a new run with {knobs}, in a new --out (or delete "
                      f"{self.out / 'history.jsonl'} and {self.out / 'tb'} first)")
        if r.precision == "fp16":
            advice += "; or start a new run with --precision bf16 (fp16's range overflows sooner)"
        return f"{n} consecutive non-finite losses at step {self.step}: {advice}"

    # ----------------------------------------------------------------------------------------- checkpoints
    def _check_finite(self) -> None:
        """Non-finite weights are never checkpointed (keep-last would prune the good ones) nor exported."""
        tensors = [t for t in self.raw_model.state_dict().values() if t.is_floating_point()]
        if not torch.stack([torch.isfinite(t).all() for t in tensors]).all():
            raise TrainingAborted(
                f"the weights are not finite (NaN/inf) at step {self.step}: no checkpoint or encoder.pt written; "
                f"check --lr, --eps and --beta2, or resume from an earlier checkpoint (--resume PATH)"
            )

    def save_checkpoint(self) -> Path:
        acc = self.accelerator
        self._check_finite()
        final = ckpt.step_dir(self.out, self.step)
        tmp = final.with_name(final.name + ".tmp")
        # history.jsonl's skipped_shards is a running total over ranks and epochs: checkpointed, so that a resumed
        # run logs the same figures as an uninterrupted one (a collective: every rank saves).
        epoch_done = self.batch_in_epoch >= self.steps_per_epoch * self.cfg.optim.grad_accum
        skipped = torch.tensor(float(self.data.skipped_before_resume_point(epoch_done)), device=self.device)
        if acc.num_processes > 1 and dist.is_initialized():
            dist.all_reduce(skipped, op=dist.ReduceOp.SUM)
        try:
            if acc.is_main_process:
                ckpt.start_tmp(tmp)  # a new folder: never a leftover one, nor a link planted there
            acc.wait_for_everyone()
            acc.save_state(str(tmp))
            # save_state has no closing barrier and every rank writes its own RNG file into tmp: without this one,
            # the main process could rename tmp while another rank still writes (found as a stray step_X.tmp in a
            # 2-rank test, the final checkpoint then lacking that rank's RNG state).
            acc.wait_for_everyone()
            if acc.is_main_process:
                from safetensors.torch import save_file

                # the same on every rank (the EMA is computed from identical weights): written once
                save_file({k: v.detach().cpu() for k, v in self._ema_residual().items()},
                          str(tmp / ckpt.EMA_RESIDUAL))
                ckpt.write_state(
                    tmp,
                    {
                        "step": self.step,
                        "epoch": self.epoch,
                        "batch_in_epoch": self.batch_in_epoch,
                        "nonfinite_total": float(self.nonfinite_total),
                        "nonfinite_run": float(self.nonfinite_run),
                        "skipped_shards": int(round(skipped.item())),
                        "total_steps": self.total_steps,
                        "world_size": acc.num_processes,
                        "config": self.cfg.to_dict(),
                        "model_config": self.model_cfg.to_dict(),
                        "data_fingerprint": getattr(self.data, "fingerprint", None),
                        "data_reader": getattr(self.data, "reader", None),
                    },
                )
                ckpt.finalize(tmp, final)
        except KeyboardInterrupt:  # a second Ctrl-C: quit at once, without the half-written folder (GBs for a
            if acc.is_main_process:  # ViT-B, left until a resumed run's next checkpoint pruned it, or for good)
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        except Exception as e:  # a full disk: torch's, safetensors' or Python's error, by write_failure's reading
            why = ckpt.write_failure(e)
            if why is None:
                raise
            raise self._unwritten(tmp, why) from None
        if acc.is_main_process:
            ckpt.prune(self.out, self.cfg.run.keep_last)
        acc.wait_for_everyone()
        self._saved_step = self.step
        return final

    def _unwritten(self, tmp: Path, why: str) -> TrainingAborted:
        """A checkpoint that could not be written (`why`: write_failure's words, usually a full disk): one line
        saying what is kept and how to go on, after removing the half-written `tmp` (GBs for a large model, which
        kept the disk full: the next run failed in turn). Without this, torch's traceback, and the .tmp stayed."""
        if self.accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        left = (f"its half-written {tmp.name} could not be removed either: delete it" if tmp.exists()
                else f"its half-written {tmp.name} was removed")
        return TrainingAborted(f"the checkpoint of step {self.step} could not be written in {tmp.parent}: {why}; "
                               f"{left}; free space on that disk: {_resume_advice(self.out)}")

    def _read_resume(self) -> tuple[Path, dict] | None:
        """The checkpoint to resume and its state, after checking that this run's settings would continue it
        exactly (train_config.RESUME_FREE lists what may change): one-line ValueError otherwise."""
        from matpac_fast.train_config import json_kind, mistyped, resume_changes

        path = ckpt.resolve_resume(self.cfg.run.resume, self.out)
        if path is None:
            if self.cfg.run.resume == "auto" and self.accelerator.is_main_process:  # a typo'd --out reads the same
                print(f"note: --resume auto: no checkpoint in --out {self.out}, starting a new run", file=sys.stderr,
                      flush=True)
            return None
        state = self._checked(path, ckpt.read_state)
        later = [p.name for p in ckpt.list_checkpoints(self.out) if int(p.name[5:]) > int(state.get("step", 0))]
        if later:  # resuming would cut the history past `path` while --resume auto would still pick `later`
            raise ValueError(
                f"--resume {path}: {self.out} holds later checkpoints ({', '.join(later)}) of the run being "
                f"abandoned; move them out of {self.out / 'checkpoints'} (or delete them) first, then resume"
            )
        if state.get("world_size", 1) != self.accelerator.num_processes:
            raise ValueError(
                f"checkpoint {path} was written by {_processes(state['world_size'])}, this run has "
                f"{self.accelerator.num_processes}: resume with the same number of processes"
            )
        saved = dict(state.get("config") or {})
        if "model_config" in state:
            saved["model"] = state["model_config"]
        new = {**json.loads(json.dumps(self.cfg.to_dict(), default=str)), "model": self.model_cfg.to_dict()}
        for key, was, now in mistyped(saved, new):
            field = f"model_config.{key[6:]}" if key.startswith("model.") else f"config.{key}"
            raise ValueError(f"{path / ckpt.STATE_FILE}: {field} is {json.dumps(was)[:40]}, not {json_kind(now)} "
                             f"(this run: {json.dumps(now, default=str)[:40]}): the file is damaged or was edited; "
                             "pick an earlier checkpoint with --resume PATH")
        blocking, free = resume_changes(saved, new)
        if state.get("data_fingerprint") not in (None, getattr(self.data, "fingerprint", None),
                                                 getattr(self.data, "names_fingerprint", None),
                                                 getattr(self.data, "legacy_fingerprint", None),
                                                 getattr(self.data, "first_set_fingerprint", None)):
            blocking.append(f"--shards {saved.get('data', {}).get('shards')} -> {self.cfg.data.shards} (other "
                            "shard names or sizes, or a set re-made since: other shard contents)")
        if blocking:
            shown = ", ".join(blocking[:6]) + (f" and {len(blocking) - 6} more" if len(blocking) > 6 else "")
            raise ValueError(
                f"--resume: {path} was trained with other settings ({shown}); a resumed run must match them to "
                f"continue exactly: pass the checkpoint's values (its {ckpt.STATE_FILE} has them), or start a new "
                f"run with a new --out"
            )
        self._resume_notes = [c for c in free if not c.startswith(("--out ", "--resume ", "--progress "))]
        was, now = state.get("data_reader"), getattr(self.data, "reader", None)
        if was is not None and now is not None and was != now and self.accelerator.is_main_process:
            print(f"warning: --resume: the checkpoint's run read its shards {_READERS.get(was, was)}, this run reads "
                  f"them {_READERS.get(now, now)}: the run goes on, but its crops and order differ from an "
                  "uninterrupted run's (give the shards as that run did to continue it exactly)",
                  file=sys.stderr, flush=True)
        return path, state

    def _checked(self, path: Path, check):
        """`check(path)`, with `--resume auto`'s error naming the checkpoint before the damaged one."""
        try:
            return check(path)
        except ValueError as e:
            earlier = [p for p in ckpt.list_checkpoints(self.out) if p.name < path.name]
            hint = (f" (move {path.name} out of {path.parent}, then --resume auto continues from {earlier[-1].name})"
                    if self.cfg.run.resume == "auto" and earlier else "")
            raise ValueError(f"{e}{hint}") from None

    def _verify_resume(self) -> None:
        if self._resume is None:
            return
        path, state = self._resume
        self._checked(path, ckpt.verify)
        if state.get("total_steps", self.total_steps) != self.total_steps:
            raise ValueError(
                f"--resume: {path} schedules {state['total_steps']} steps, this run {self.total_steps} (has the "
                f"shard set changed size?): resume with the same shard set, or start a new run with a new --out"
            )

    @contextlib.contextmanager
    def _model_keys_of(self, path: Path):
        """Checkpoints written with --compile step before the plain model was registered hold "_orig_mod."-prefixed
        keys: load those through a holder module whose only child is the model under that name (in place)."""
        from safetensors import safe_open

        acc = self.accelerator
        if self.raw_model not in acc._models:
            yield
            return
        i = acc._models.index(self.raw_model)
        try:
            with safe_open(str(Path(path) / "model.safetensors"), framework="pt") as f:
                prefixed = all(k.startswith("_orig_mod.") for k in f.keys())
        except Exception:  # noqa: BLE001 - load_state reports an unreadable file in its own words
            prefixed = False
        if prefixed:
            holder = torch.nn.Module()
            holder._orig_mod = self.raw_model
            acc._models[i] = holder
        try:
            yield
        finally:
            acc._models[i] = self.raw_model

    def _maybe_resume(self) -> None:
        if self._resume is None:
            return
        path, state = self._resume
        try:
            with self._model_keys_of(path):
                self.accelerator.load_state(str(path))
            self._load_ema_residual(Path(path) / ckpt.EMA_RESIDUAL)
        except Exception as e:  # anything Accelerate/torch/safetensors raise on a file that passed verify()
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ValueError(f"checkpoint {path} cannot be loaded ({type(e).__name__}: {first}); pick an earlier "
                             "checkpoint with --resume PATH") from None
        self.step = int(state["step"])
        # Saved already only when it lies in this --out: one resumed from elsewhere (--resume PATH into a new
        # --out) is written here at the next save, even with nothing trained
        inside = Path(path).resolve().parent == ckpt.checkpoint_root(self.out).resolve()
        self._saved_step = self.step if inside else None
        self.epoch = int(state["epoch"])
        self.batch_in_epoch = int(state["batch_in_epoch"])
        self.nonfinite_total.fill_(state.get("nonfinite_total", 0.0))
        self.nonfinite_run.fill_(state.get("nonfinite_run", 0.0))
        if self.accelerator.is_main_process:
            # absent from checkpoints written before it was kept: the count starts from 0, as it did then
            self.data.restore_skipped(int(state.get("skipped_shards", 0)))
            notes = f" (changed: {', '.join(self._resume_notes)})" if self._resume_notes else ""
            # Inside an epoch the loader passes over that epoch's first batches (the order of an uninterrupted run):
            # drawn again from the clips' headers, or, for streamed shards, read again and dropped, which on a large
            # set is minutes before the next step; so it is said up front. At an epoch's end the next epoch starts.
            rereads = ""
            if 0 < self.batch_in_epoch < self.steps_per_epoch * self.cfg.optim.grad_accum:
                how = {"stream": " (streamed shards: read again and dropped)",
                       "indexed": " (their clips' headers are read, not their data)"}.get(self.data.reader, "")
                rereads = (f"; epoch {self.epoch}'s first {self.batch_in_epoch} batches are passed over first{how}, to "
                           "go on with the data of an uninterrupted run")
            print(f"resumed from {path} at step {self.step}{notes}{rereads}", file=sys.stderr)

    def _load_ema_residual(self, f: Path) -> None:
        """The EMA's Kahan terms of a checkpoint (safetensors: no pickle). A checkpoint from before they were kept
        has none: they start from zero, as that run's were."""
        if not f.exists():
            return
        from safetensors.torch import load_file

        saved, mine = load_file(str(f)), self._ema_residual()
        if saved.keys() != mine.keys() or any(saved[k].shape != v.shape for k, v in mine.items()):
            raise ValueError(f"{f.name} does not hold this model's teacher tensors")
        for k, v in mine.items():
            v.copy_(saved[k])

    def export_encoder(self) -> Path:
        from matpac_fast.encoder import export_encoder_state

        path = self.out / "encoder.pt"
        state = {k: v.detach().cpu().contiguous() for k, v in export_encoder_state(self.raw_model).items()}
        try:
            with atomic_write(path, "wb") as f:  # a kill while writing leaves the previous encoder.pt whole
                torch.save(state, f)
        except Exception as e:  # a full disk (ckpt.write_failure): one line; atomic_write removed encoder.pt.tmp
            why = ckpt.write_failure(e)
            if why is None:
                raise
            kept = (f"the checkpoint of step {self.step} is kept: free space on that disk, then --resume auto writes "
                    "encoder.pt from it" if self._saved_step == self.step else f"free space on that disk: "
                    f"{_resume_advice(self.out)}")
            raise TrainingAborted(f"{path} could not be written: {why}; {kept}") from None
        return path

    # ------------------------------------------------------------------------------------------------ signals
    def _install_signal_handlers(self) -> dict:
        """SIGTERM/SIGINT set a flag that the loop reads after each optimizer step. Loader workers ignore both
        (data._worker_signals), so a signal to the whole process group (`timeout`, Slurm, Ctrl-C) is handled here
        alone instead of killing a worker mid-epoch. A one-process run waiting for data stops at once (the wait
        is abandoned, the checkpoint is the last finished step). After the first SIGINT the caller's handler is
        back (Python's: a KeyboardInterrupt), so a second Ctrl-C quits at once, without a checkpoint: `main` says
        so in one line, a notebook keeps its kernel. SIGTERM stays graceful (launchers and Slurm may send it
        twice), except after a SIGINT under torchrun, which passes a second Ctrl-C on as SIGTERM. Returns the
        caller's handlers, which `train` puts back."""
        single = self.accelerator.num_processes == 1
        main = self.accelerator.is_main_process
        launched = "TORCHELASTIC_RUN_ID" in os.environ  # torchrun, or accelerate launch through it
        self._stop_signal = None  # the signal that asked for the stop
        previous: dict = {}

        def handler(signum, frame):
            first = not self._stop_requested
            if not first and signum == signal.SIGTERM and self._stop_signal == signal.SIGINT and launched:
                raise KeyboardInterrupt  # torchrun passes a second Ctrl-C on as SIGTERM: quit at once, as without it
            self._stop_signal = self._stop_signal or signum
            self._stop_requested = True
            if signum == signal.SIGINT:
                caller = previous.get(signal.SIGINT)
                if not (callable(caller) or caller in (signal.SIG_DFL, signal.SIG_IGN)):
                    caller = signal.default_int_handler  # None: set outside Python
                with contextlib.suppress(ValueError):
                    signal.signal(signal.SIGINT, caller)
            if first and main:
                # os.write, not print: the handler may interrupt a write to sys.stderr (the progress bar), and a
                # buffered stream refuses a reentrant call
                # with several processes the checkpoint needs them all: a launcher also sends this signal when
                # another process has died, and then there is none
                every = "" if single else " if every process is still running"
                again = "; Ctrl-C again quits at once, without one" if signum == signal.SIGINT else ""
                with contextlib.suppress(OSError):
                    os.write(2, f"\ntrain: stop requested: finishing the step, then a checkpoint{every}{again}\n"
                             .encode())
            if self._in_data_wait and single:
                raise _StopInDataWait

        for sig in (signal.SIGTERM, signal.SIGINT):
            if sig == signal.SIGINT and signal.getsignal(sig) == signal.SIG_IGN:
                # Ignored from the start: a run in the background of a script (`train.py &`), which the shell shields
                # from the terminal's Ctrl-C, meant for the script (a Ctrl-C there stopped this run too)
                continue
            try:
                previous[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread (e.g. inside a test runner thread)
                pass
        return previous

    def _start_stop_checks(self) -> None:
        """The first stop agreement comes after the first step: its span (start-up, a compile) says nothing of the
        pace, so the second comes one step later, then about every STOP_CHECK_S seconds (_should_stop)."""
        self._stop_check_at, self._stop_check_step, self._stop_check_time = self.step + 1, self.step, time.monotonic()

    def _should_stop(self) -> bool:
        """SIGTERM/SIGINT: finish the step, checkpoint, exit 0. Ranks agree through one tiny all-reduce, about every
        STOP_CHECK_S seconds of training (not every step: it is a host synchronisation). The seconds since the last
        agreement ride in the same all-reduce (their maximum), so every rank computes the same next step without
        another collective."""
        acc = self.accelerator
        if acc.num_processes == 1:
            return self._stop_requested
        if self.step < self._stop_check_at:
            return False
        now = time.monotonic()
        agreed = torch.tensor([float(self._stop_requested), now - self._stop_check_time], device=self.device)
        dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
        flag, seconds = agreed.tolist()
        self._stop_check_at = _next_stop_check(self.step, self.step - self._stop_check_step, seconds,
                                               self.cfg.run.log_every)
        self._stop_check_step, self._stop_check_time = self.step, now
        # Or'ed, not assigned: a signal whose handler ran when the all-reduce returned (Python runs handlers between
        # bytecodes, so one that arrived during the blocking call runs just after it) was cleared here, and with
        # ranks waiting in the same call at once, every rank could lose it. It goes into the next agreement.
        agreed = bool(flag)
        self._stop_requested = self._stop_requested or agreed
        return agreed


_PACKAGE_DIRS = tuple(str(Path(__file__).resolve().parent.parent / d) + os.sep for d in ("matpac_fast", "shard_tools"))


@contextlib.contextmanager
def _cli_warnings():
    """While the CLI runs, this project's warnings (a skipped shard, a stray .tar beside the set) print as one
    `warning: <text>` line each, once per distinct text (the loader sends its workers' warnings to this process,
    so two workers or two epochs meeting the same bad shard print it once). Other libraries' warnings keep their
    usual form, also once per text."""
    seen: set[str] = set()
    original = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        text = str(message)
        if text in seen:
            return
        seen.add(text)
        if not os.path.realpath(filename).startswith(_PACKAGE_DIRS):
            original(message, category, filename, lineno, file, line)
            return
        print(f"warning: {text}", file=file or sys.stderr, flush=True)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = original


def main(argv: list[str] | None = None) -> int:
    with _cli_warnings():
        return _main(argv)


def _lock(lock: ckpt.OutLock) -> None:
    """Take the --out lock (ValueError when another process holds it); a file system that cannot lock gets a
    warning, not a refusal."""
    problem = lock.acquire()
    if problem:
        print(f"warning: {problem}", file=sys.stderr, flush=True)


def _launch_rank() -> tuple[int, int]:
    """(rank, world size) as the launcher (torchrun, accelerate launch) set them, before any process group exists."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def _peer_failed(e: BaseException) -> bool:
    """A collective failed because another process went away (gloo: the peer closed its connection). Only once the
    process group exists: an error while creating it (a port in use, a store timeout) is this process's own."""
    text = str(e)
    return dist.is_available() and dist.is_initialized() and any(
        s in text for s in ("Connection closed by peer", "Connection reset by peer", "remote worker crashing"))


def _fail(line: str, rank: int, world: int, stopping: bool = False) -> int:
    """Print `line` once per run, not once per process. The main process prints it at once. Another process waits
    first: an error every process meets (options, --out, the checkpoint to resume, non-finite losses) is printed by
    the main process, after which the launcher (torchrun / accelerate launch) stops the rest, quietly; one only this
    process met (a shard it alone reads) is printed when the wait ends. Before the process group exists the
    processes may be seconds apart (imports), hence the longer wait there. `stopping`: the launcher's SIGTERM already
    came (it stops the others once one has exited): say nothing."""
    if rank != 0 and world > 1:
        if stopping:
            return 2
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError):
                signal.signal(sig, signal.SIG_DFL)  # the launcher's SIGTERM ends the wait, silently
        time.sleep(5.0 if dist.is_available() and dist.is_initialized() else 30.0)
    print(line, file=sys.stderr, flush=True)
    return 2


def _check_model_fits_shards(cfg: TrainConfig, model_cfg, stats: dict | None) -> None:
    """The model's input is the shards' log-mel: a --model n_mels other than the shard set's is refused, in one line,
    before anything is built (the loader's crop follows --model crop_frames, so the crop always fits)."""
    n_mels = ((stats or {}).get("frontend") or {}).get("n_mels")
    if n_mels is not None and int(n_mels) != model_cfg.n_mels:
        raise ValueError(
            f"--model n_mels={model_cfg.n_mels}: the shards of --shards {cfg.data.shards} hold "
            f"{int(n_mels)}-mel log-mels, the model's input: drop --model n_mels (or pass n_mels={int(n_mels)})"
        )


def _resolved_config(cfg: TrainConfig) -> tuple[dict, str | None]:
    """--print-config: the config as a run would use it, checked as a run checks it before its first step. A local
    (or synthetic) shard set goes through the run's own start-up: --out, the checkpoint to resume, the device and
    precision, the shard set (front end, `short`, batches per epoch against --grad-accum, the crop warning) and
    the model (a few seconds for a ViT-B; nothing is written). A remote set is not fetched: the options, --out, the
    checkpoint folder and the model fields are checked. Returns (config, a note when a field could not be resolved
    without the shards)."""
    shards, notes = cfg.data.shards, []
    _check_out_path(cfg.run.out)  # these two fetch nothing: checked for a remote set too
    ckpt.check_out(cfg.run.out, cfg.run.resume)
    no_gpu = cfg.run.cpu or not torch.cuda.is_available()
    if cfg.run.precision == "fp16" and no_gpu:
        notes.append("note: --precision fp16 needs a CUDA GPU, which this run would not have here: start it on a GPU "
                     "node")
    notes += _compile_notes(cfg)
    if shards.startswith("pipe:") or "://" in shards:
        if cfg.run.frontend == "m2d":
            notes.append(f"note: --print-config does not fetch --shards {shards}: norm_mean / norm_std are the m2d "
                         "front end's fallback pair; the run uses the set's stats.json mean / std")
        model = model_config(cfg, None)
        _check_model_fits_shards(cfg, model, None)
    else:
        model = Trainer(cfg, device_checks=False).model_cfg  # what only reading the clips can tell is left to the run
    if model.attn_impl in CUDA_ONLY_ATTN and no_gpu:  # the run refuses it here (Trainer's device check)
        notes.append(f"note: --model attn_impl={model.attn_impl} needs a CUDA GPU (that SDPA backend has no CPU "
                     "kernel), which this run would not have here: start it on a GPU node, or use sdpa, flash or math")
    return {**cfg.to_dict(), "model": model.to_dict()}, "\n".join(notes) or None


def _compile_notes(cfg: TrainConfig) -> list[str]:
    """Compile settings that do nothing without --compile: a note each, from --print-config and at a run's start
    (a run given --compile-mode reduce-overhead alone trained uncompiled without a word)."""
    notes = []
    if cfg.run.compile == "off" and cfg.run.compile_mode != "default":
        notes.append(f"note: --compile-mode {cfg.run.compile_mode} has no effect with --compile off: add --compile "
                     "block or step")
    if cfg.run.compile == "off" and cfg.inductor:
        notes.append(f"note: --inductor {' '.join(inductor_text(cfg.inductor))} has no effect with --compile off: add "
                     "--compile block or step")
    return notes


def _check_out_path(out: str) -> None:
    """--out names a folder that exists or can be made: one-line ValueError before any work (an empty --out, one
    under a file, or one in a folder without write permission used to end in a traceback after the data and model
    were set up)."""
    if not str(out).strip():
        raise ValueError("--out is empty: give the run's folder, e.g. --out runs/first (is a shell variable unset?)")
    path = Path(out)
    if path.is_dir():
        # Tried, not os.access: root passes that check on a read-only mount or an immutable folder.
        import tempfile

        try:
            with tempfile.TemporaryFile(dir=path):
                pass
        except OSError as e:
            raise ValueError(f"--out {out}: cannot write there ({e.strerror or e}); choose another --out") from None
        return
    if path.exists():
        return  # a file there is check_out's error
    parent = next(p for p in path.parents if p.exists())  # a relative path ends at ".", which exists
    if not parent.is_dir():
        raise ValueError(f"--out {out}: {parent} is a file, so no folder can be made under it; choose another --out")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out}: no permission to create it in {parent}; choose another --out")


def _paper_recipe_on_cpu(args, cfg: TrainConfig) -> str | None:
    """One note when the paper's recipe (a ViT-B at batch 256 per device, for GPUs) starts without a CUDA device."""
    if args.recipe != "paper" or cfg.run.preset == "tiny" or torch.cuda.is_available():
        return None
    return (f"note: no CUDA GPU: the paper recipe (preset {cfg.run.preset}, batch {cfg.data.batch_size} per device) is "
            "meant for GPUs and will be very slow on the CPU; --recipe tiny is the CPU-sized one")


def _launcher_argv() -> list[str]:
    """The parent process's command line (Linux /proc; empty where it cannot be read)."""
    try:
        raw = Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def _accelerate_launched() -> bool:
    """Started by `accelerate launch`'s one-process launcher (no torchrun: that sets TORCHELASTIC_RUN_ID), which
    turns a trainer that SIGINT ended into its own CalledProcessError traceback and status 1. A Ctrl-C to the
    terminal reaches accelerate too, which then ends by SIGINT itself, so a script running it stops anyway."""
    argv = _launcher_argv()
    names = [Path(a).name for a in argv]
    return ("accelerate-launch" in names or "accelerate.commands.launch" in argv
            or any(n == "accelerate" and a == "launch" for n, a in zip(names, argv[1:])))


def _accelerate_one_process_note(world: int) -> str | None:
    """`accelerate launch --num_processes N` (N > 1) that started one process: with --cpu whatever N (accelerate
    1.15's CPU launcher ignores it), and without --multi_gpu on a machine with fewer than 2 GPUs (its simple
    launcher; on this CPU machine `accelerate launch --num_processes 2 train.py` trained one process). Such a run
    trained alone while its user counted N processes, and the resume of its checkpoint with N processes was refused
    for "1 process", with nothing saying why. One warning line naming launchers that do start N. The simple launcher
    sets ACCELERATE_USE_CPU for every process it starts ("True" with --cpu); its launches of several processes go
    through torchrun (TORCHELASTIC_RUN_ID)."""
    use_cpu = os.environ.get("ACCELERATE_USE_CPU")
    if world != 1 or use_cpu is None or "TORCHELASTIC_RUN_ID" in os.environ:
        return None
    argv, asked = _launcher_argv(), None
    for i, a in enumerate(argv):
        name, eq, value = a.partition("=")
        if name in ("--num_processes", "--num-processes"):
            asked = value if eq else (argv[i + 1] if i + 1 < len(argv) else None)
    if asked is None or not asked.isdigit() or int(asked) < 2:
        return None
    how = (" --cpu", "its CPU launcher runs one") if use_cpu == "True" else (
        "", "without --multi_gpu it runs one on a machine with fewer than 2 GPUs")
    return (f"warning: accelerate launch{how[0]} started 1 process, not the {asked} of --num_processes ({how[1]}); "
            f"for {asked} CPU processes use torchrun --nproc_per_node {asked} train.py ..., or accelerate launch "
            f"--multi_gpu --num_processes {asked} --num_machines 1 --mixed_precision no --dynamo_backend no "
            "train.py ...")


def _main(argv: list[str] | None) -> int:
    rank, world = _launch_rank()
    die_with_launcher()  # train.py / matpac-train did it before the heavy imports; here for direct callers
    trainer = None
    lock = None
    try:
        cfg, args = resolve_args(argv)
        if args.print_config:
            resolved, note = _resolved_config(cfg)
            if rank == 0:
                if note:
                    print(note, file=sys.stderr, flush=True)
                print(json.dumps(resolved, indent=1))
            return 0
        # One writer per --out (a Slurm requeue or a double submit would interleave two runs' checkpoints and rows):
        # the main process locks it for the run's lifetime; all ranks of one job share it. An --out that does not
        # exist yet is locked when it is created, after the checks below: a bad option leaves no run directory.
        _check_out_path(cfg.run.out)  # first: Path("") is the current folder, which the lock below would write in
        if rank == 0:
            lock = ckpt.OutLock(cfg.run.out)
            if Path(cfg.run.out).is_dir():
                _lock(lock)
            for note in [_accelerate_one_process_note(world), _paper_recipe_on_cpu(args, cfg), *_compile_notes(cfg)]:
                if note:
                    print(note, file=sys.stderr, flush=True)
        ckpt.check_out(cfg.run.out, cfg.run.resume)  # never mix two runs in one folder
        # Validates data, model and the checkpoint to resume first: a bad option leaves no empty run directory.
        trainer = Trainer(cfg)
        try:
            os.makedirs(cfg.run.out, exist_ok=True)
        except OSError as e:  # what _check_out_path cannot foresee (a read-only mount, /proc, a full disk)
            raise ValueError(f"--out {cfg.run.out}: cannot create this folder ({e.strerror or e}); choose another "
                             "--out") from None
        if lock is not None:
            _lock(lock)
        result = trainer.train()
    except (ValueError, TrainingAborted) as e:
        return _fail(f"error: {e}", rank, world, stopping=trainer is not None and trainer._stop_requested)
    except OSError as e:
        if e.errno not in ckpt.DISK_FULL:
            raise
        # a full disk met outside a checkpoint (config.json, a history.jsonl row): one line, not a traceback
        where = f" writing {e.filename}" if e.filename else ""
        then = _resume_advice(cfg.run.out) if trainer is not None else "then run again"
        return _fail(f"error: the disk is full{where} ({e.strerror}); free space on that disk: {then}", rank, world)
    except KeyboardInterrupt:  # Ctrl-C before train() installs its handlers (start-up), or a second Ctrl-C
        if rank == 0:
            if trainer is not None and trainer._stop_requested:
                print(f"\ntrain: interrupted again: quit at once, without a checkpoint of this step; "
                      f"{_resume_advice(cfg.run.out)}", file=sys.stderr, flush=True)
            else:
                print("\ntrain: interrupted while starting: nothing was trained", file=sys.stderr, flush=True)
        return INTERRUPTED
    except RuntimeError as e:
        if world > 1 and _peer_failed(e):  # a traceback from inside gloo/NCCL would bury the real error
            # a process killed outright (the out-of-memory killer) prints nothing: the launcher's report says how
            return _fail(f"error: process {rank} stopped: another process failed (see its error, if any, and the "
                         f"launcher's report); {_resume_advice(cfg.run.out)}", rank, world,
                         stopping=trainer is not None and trainer._stop_requested)
        if str(e).startswith("DataLoader worker"):  # torch's SIGCHLD handler: raised wherever the main thread was
            return _fail(f"error: {str(e).strip().splitlines()[0]}: a data-loader worker died (often the out-of-memory "
                         f"killer); {_after_a_dead_worker(cfg.run.out)}", rank,
                         world)
        if isinstance(e, dist.DistError):  # e.g. the process group cannot be set up (a port in use, a timeout)
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            return _fail(f"error: process {rank}: {type(e).__name__}: {first}", rank, world)
        raise
    finally:
        if lock is not None:
            lock.release()
    if trainer.accelerator.is_main_process:
        last = result["history"][-1] if result["history"] else {}
        note = " (stopped by signal, checkpoint written)" if result["stopped_early"] else ""
        loss = f", loss {last['loss']:.4f}" if "loss" in last else ""
        if loss and last.get("step") != result["step"]:
            loss += f" (at step {last.get('step')})"
        print(f"done: step {result['step']}{note}{loss}; encoder: {Path(cfg.run.out) / 'encoder.pt'}")
    launched = "TORCHELASTIC_RUN_ID" in os.environ or _accelerate_launched()
    if result["stop_signal"] == signal.SIGINT and not launched:
        # A Ctrl-C's stop, checkpoint written: the status a Ctrl-C gives (the process then ends by SIGINT, see
        # interrupts.run_main), so that `train.py ... && matpac-eval ...` or a loop over runs stops here too. SIGTERM
        # (a scheduler's stop) exits 0, and so does a process under torchrun or accelerate launch, whose launcher
        # reports the run (accelerate's one-process launcher with a traceback for a trainer that SIGINT ended).
        return INTERRUPTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
